//! The producer's sold-out marker (issue 5): refusals of a sold-out product skip the stock
//! read, yet stay exact: recorded once, and never applied once stock has come back.

use std::collections::HashSet;
use std::time::Duration;
use stock_common::events::{
    Compensation, CompensationCause, Item, Reason, Status, INTERNAL_VERSION,
};
use stock_common::redis_store::{stock_key, Guards, OrderRecord, ReserveOutcome, SoldOutMarker};
use stock_e2e::harness::{conflicting, created};
use stock_e2e::{reserve_request, TestEnv};
use stockctl::admin;

const WAIT: Duration = Duration::from_secs(90);

/// The decision, with the token of a pre-deduction left out (tokens are unique).
fn record(outcome: &ReserveOutcome) -> OrderRecord {
    match outcome {
        ReserveOutcome::Decided {
            record: OrderRecord::Held { items, .. },
            ..
        } => OrderRecord::Held {
            token: String::new(),
            items: items.clone(),
            customer: None,
        },
        ReserveOutcome::Decided { record, .. } => record.clone(),
        other => panic!("not decided: {other:?}"),
    }
}

fn refused(product: i64) -> OrderRecord {
    OrderRecord::Refused {
        reason: Reason::InsufficientStock,
        product_id: Some(product),
        claim: None,
    }
}

fn held(product: i64) -> OrderRecord {
    OrderRecord::Held {
        token: String::new(),
        items: vec![Item {
            product_id: product,
            quantity: 1,
        }],
        customer: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marker_refuses_without_reading_stock_and_goes_stale_when_stock_returns() {
    let env = TestEnv::new().await;
    env.load_stock(&[(7, 2)]).await;
    let store = &env.store;
    let mut marker = SoldOutMarker::default();

    let first: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|id| reserve_request(id, 7, 1))
        .collect();
    let reply = store
        .reserve_many(&first, &marker.guards(&first))
        .await
        .expect("reserve");
    let got: Vec<_> = reply.outcomes.iter().map(record).collect();
    assert_eq!(got, vec![held(7), held(7), refused(7)]);
    marker.learn(&reply);
    assert_eq!(marker.len(), 1, "product 7 is known sold out");

    // The guard holds: the order is refused without reading `stock:{7}`. Shown by a
    // value the stock path would reject as corrupt (written without an epoch change,
    // as no legitimate writer does).
    let _: () = redis::cmd("SET")
        .arg(stock_key(7))
        .arg("not-a-number")
        .query_async(&mut store.connection())
        .await
        .expect("set");
    let d = vec![reserve_request("d", 7, 1)];
    let guards = marker.guards(&d);
    assert_eq!(guards.sold_out, vec![true]);
    let reply = store.reserve_many(&d, &guards).await.expect("reserve");
    assert_eq!(record(&reply.outcomes[0]), refused(7));
    let _: () = redis::cmd("SET")
        .arg(stock_key(7))
        .arg(0)
        .query_async(&mut store.connection())
        .await
        .expect("set");

    // Stock comes back (an operator's restock): the epoch moves, the same stale guard is
    // ignored and stock decides.
    admin::restock(&env.pool, store, 7, 1, "restock-1")
        .await
        .expect("restock");
    let e = vec![reserve_request("e", 7, 1)];
    let reply = store.reserve_many(&e, &guards).await.expect("reserve");
    assert_eq!(record(&reply.outcomes[0]), held(7));
    marker.learn(&reply);
    assert_eq!(marker.len(), 1, "e took the last unit: sold out again");

    // A compensation gives b's unit back: the epoch moves again.
    let stale = marker.guards(&[reserve_request("f", 7, 1)]);
    let restored = store
        .restore_many(&[Compensation {
            v: INTERNAL_VERSION,
            order_id: "b".into(),
            items: first[1].items.clone(),
            cause: CompensationCause::Cancelled,
            token: None,
            gen: None,
            customer: None,
        }])
        .await
        .expect("restore");
    assert_eq!(restored.len(), 1);
    let f = vec![reserve_request("f", 7, 1)];
    let reply = store.reserve_many(&f, &stale).await.expect("reserve");
    assert_eq!(record(&reply.outcomes[0]), held(7));

    // A refusal by the marker is an order's one decision: replayed, even with stock
    // available and no guard, it stays refused.
    admin::restock(&env.pool, store, 7, 5, "restock-2")
        .await
        .expect("restock");
    let reply = store
        .reserve_many(&d, &Guards::default())
        .await
        .expect("reserve");
    assert_eq!(
        reply.outcomes[0],
        ReserveOutcome::Decided {
            record: refused(7),
            fresh: false
        }
    );
    assert_eq!(env.redis_stock(7).await, Some(5));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sold_out_product_sells_again_after_a_restock() {
    let env = TestEnv::new().await;
    env.load_stock(&[(42, 50)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    let wave = |prefix: &str, n: usize| -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                let body = created(
                    &id,
                    &[Item {
                        product_id: 42,
                        quantity: 1,
                    }],
                );
                (id, body)
            })
            .collect()
    };
    let first = wave("w1", 300);
    let first_ids: HashSet<String> = first.iter().map(|(id, _)| id.clone()).collect();
    env.send_orders(first).await;
    assert!(collector.wait_for(&first_ids, 1, WAIT).await);

    admin::restock(&env.pool, &env.store, 42, 30, "flash-restock")
        .await
        .expect("restock");
    let second = wave("w2", 100);
    let second_ids: HashSet<String> = second.iter().map(|(id, _)| id.clone()).collect();
    env.send_orders(second).await;
    assert!(collector.wait_for(&second_ids, 1, WAIT).await);
    workers.stop().await;

    let outcomes = collector.snapshot();
    let reserved = |ids: &HashSet<String>| {
        ids.iter()
            .filter(|id| outcomes[*id][0].status == Status::Reserved)
            .count()
    };
    assert_eq!(reserved(&first_ids), 50);
    assert_eq!(
        reserved(&second_ids),
        30,
        "the restocked units are sold, not refused by a stale marker"
    );
    assert!(conflicting(&outcomes).is_empty());
    let row = env.stock_row(42).await;
    assert_eq!((row.available, row.reserved), (0, 80));
    assert_eq!(env.redis_stock(42).await, Some(0));
    env.assert_invariants(&[42]).await;
    collector.stop().await;
    env.cleanup().await;
}
