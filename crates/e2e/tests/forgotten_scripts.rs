//! A Redis that forgot its scripts (a restart without them, a promoted replica): the
//! store's calls meet NOSCRIPT, load the script and run again.
//!
//! Alone in its binary: `SCRIPT FLUSH` is server-wide, so a test beside it on the same
//! Redis would lose its scripts between its own load and run and fail with NOSCRIPT
//! (it did, in CI, when this test lived in `order_records.rs`); `cargo test` runs test
//! binaries one after the other.

use stock_common::events::{Compensation, CompensationCause, INTERNAL_VERSION};
use stock_common::redis_store::{
    Guards, OrderRecord, ReserveOutcome, ReserveRequest, RestoreOutcome,
};
use stock_e2e::{forget_scripts, held_token, reserve_request, TestEnv};

/// The scripts go by EVALSHA alone: a Redis that forgot them answers NOSCRIPT, and the
/// store loads them and runs the pipeline again, once (reserve, give-back, record read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_forgot_its_scripts_still_decides_and_gives_back() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100)]).await;
    let store = &env.store;
    let reqs: Vec<ReserveRequest> = (0..3)
        .map(|n| reserve_request(&format!("nos-{n}"), 1, 2))
        .collect();

    forget_scripts(store).await;
    let reply = store
        .reserve_many(&reqs, &Guards::default())
        .await
        .expect("reserve after SCRIPT FLUSH");
    let tokens: Vec<String> = reply
        .outcomes
        .iter()
        .map(|o| {
            let (token, fresh) = held_token(o);
            assert!(fresh, "decided now, once");
            token
        })
        .collect();
    assert_eq!(
        env.redis_stock(1).await,
        Some(94),
        "3 orders of 2 taken once"
    );

    forget_scripts(store).await;
    let rec = store.order_record("nos-0").await.expect("record read");
    assert!(
        matches!(&rec, Some(OrderRecord::Held { token, .. }) if *token == tokens[0]),
        "{rec:?}"
    );

    forget_scripts(store).await;
    let back = vec![Compensation {
        v: INTERNAL_VERSION,
        order_id: "nos-1".into(),
        items: reqs[1].items.clone(),
        cause: CompensationCause::Cancelled,
        token: Some(tokens[1].clone()),
        gen: None,
        customer: None,
    }];
    let out = store.restore_many(&back).await.expect("restore");
    assert_eq!(out, vec![RestoreOutcome::Restored]);
    assert_eq!(env.redis_stock(1).await, Some(96), "given back once");

    forget_scripts(store).await;
    let again = store
        .reserve_many(&reqs, &Guards::default())
        .await
        .expect("redelivered");
    for (o, t) in again.outcomes.iter().zip(&tokens) {
        match o {
            ReserveOutcome::Decided { fresh, record } => {
                assert!(!fresh, "seen before: {record:?}");
                assert!(record.encode().contains(t.as_str()), "{record:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        env.redis_stock(1).await,
        Some(96),
        "a redelivery takes nothing"
    );
    env.cleanup().await;
}
