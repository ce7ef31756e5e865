//! Issue 12, goal 6: order records live as fields of small hashes, bucketed by time window
//! and by a digest of the order id (`lua/record.lua`): buckets split as a window fills, so
//! each stays a listpack of at most 128 entries; every record is found again, changed in
//! place, and forgotten with its window; an id of any length costs the same.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use stock_common::events::{Compensation, CompensationCause, INTERNAL_VERSION};
use stock_common::redis_store::{
    record_field, Guards, OrderRecord, ReserveRequest, RestoreOutcome,
};
use stock_e2e::{held_token, reserve_request, TestEnv};

/// Every bucket key of the records, with its length and encoding.
async fn buckets(env: &TestEnv) -> Vec<(String, usize, String)> {
    let mut conn = env.store.connection();
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter: redis::AsyncIter<String> =
            redis::AsyncCommands::scan_match(&mut conn, "stockpipe:rec:*")
                .await
                .expect("scan");
        while let Some(k) = iter.next_item().await {
            keys.push(k.expect("scan"));
        }
    }
    let mut out = Vec::new();
    for k in keys.into_iter().filter(|k| !k.ends_with(":i")) {
        let len: usize = redis::cmd("HLEN")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .expect("HLEN");
        let enc: String = redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .expect("OBJECT ENCODING");
        out.push((k, len, enc));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_split_into_small_buckets_and_each_is_found_and_changed_in_place() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 1_000_000)]).await;
    let store = &env.store;
    const N: usize = 6000;
    // Ids of every length, some far longer than a listpack entry may be (64 bytes).
    let ids: Vec<String> = (0..N)
        .map(|n| match n % 100 {
            0 => format!("{}-{n}", "long-order-id".repeat(20)),
            1 => format!("é{n}"),
            _ => format!("rec-{n}"),
        })
        .collect();
    let reqs: Vec<ReserveRequest> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| reserve_request(id, 1, 1 + (n % 3) as i64))
        .collect();
    let mut tokens: HashMap<String, String> = HashMap::new();
    for chunk in reqs.chunks(500) {
        let reply = store
            .reserve_many(chunk, &Guards::default())
            .await
            .expect("reserve");
        for (r, o) in chunk.iter().zip(&reply.outcomes) {
            let (token, fresh) = held_token(o);
            assert!(fresh, "{} decided now", r.order_id);
            tokens.insert(r.order_id.clone(), token);
        }
    }

    // Split as they filled: no bucket above the listpack limit, all still listpacks.
    let b = buckets(&env).await;
    assert!(
        b.len() >= N / 128,
        "{} buckets for {N} records: the window did not split",
        b.len()
    );
    let total: usize = b.iter().map(|(_, n, _)| n).sum();
    assert_eq!(total, N, "each record in exactly one bucket");
    for (k, n, enc) in &b {
        assert!(*n <= 128, "{k} holds {n} records");
        assert_eq!(enc, "listpack", "{k} ({n} records)");
    }
    let all: HashSet<[u8; 12]> = store
        .records()
        .await
        .expect("records")
        .into_iter()
        .map(|(field, _)| field)
        .collect();
    assert_eq!(
        all,
        ids.iter()
            .map(|id| record_field(id))
            .collect::<HashSet<_>>()
    );

    // Each is found again: by a redelivery (the first decision, nothing taken twice) and
    // by a read.
    let before = env.redis_stock(1).await;
    for chunk in reqs.chunks(500) {
        let reply = store
            .reserve_many(chunk, &Guards::default())
            .await
            .expect("reserve again");
        for (r, o) in chunk.iter().zip(&reply.outcomes) {
            let (token, fresh) = held_token(o);
            assert!(!fresh, "{} seen", r.order_id);
            assert_eq!(token, tokens[&r.order_id]);
        }
    }
    assert_eq!(
        env.redis_stock(1).await,
        before,
        "a redelivery takes nothing"
    );
    for id in ids.iter().step_by(97) {
        let rec = store.order_record(id).await.expect("record");
        assert!(
            matches!(&rec, Some(OrderRecord::Held { token, .. }) if *token == tokens[id]),
            "{id}: {rec:?}"
        );
    }

    // A give-back changes the record in place, once.
    let back: Vec<Compensation> = reqs
        .iter()
        .step_by(50)
        .map(|r| Compensation {
            v: INTERNAL_VERSION,
            order_id: r.order_id.clone(),
            items: r.items.clone(),
            cause: CompensationCause::Cancelled,
            token: Some(tokens[&r.order_id].clone()),
            gen: None,
            customer: None,
        })
        .collect();
    let units: i64 = back.iter().map(|c| c.items[0].quantity).sum();
    let first = store.restore_many(&back).await.expect("restore");
    assert!(
        first.iter().all(|o| *o == RestoreOutcome::Restored),
        "{first:?}"
    );
    let again = store.restore_many(&back).await.expect("restore again");
    assert!(
        again.iter().all(|o| *o == RestoreOutcome::Already),
        "{again:?}"
    );
    assert_eq!(env.redis_stock(1).await, before.map(|s| s + units));
    for c in &back {
        let rec = store.order_record(&c.order_id).await.expect("record");
        assert!(
            matches!(rec, Some(OrderRecord::Returned { .. })),
            "{}: {rec:?}",
            c.order_id
        );
    }
    let total_after: usize = buckets(&env).await.iter().map(|(_, n, _)| n).sum();
    assert_eq!(total_after, N, "changed in place, not written twice");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_forgotten_with_its_window_and_the_order_is_decided_again() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100)]).await;
    let store = &env.store;
    // A memory of 2 s: windows of 1 s, each forgotten 3 s after it began.
    store.set_record_ttl_secs(2);
    let req = vec![reserve_request("short-1", 1, 1)];
    let reply = store
        .reserve_many(&req, &Guards::default())
        .await
        .expect("reserve");
    let (first, fresh) = held_token(&reply.outcomes[0]);
    assert!(fresh);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let expires = store
        .record_expiry("short-1")
        .await
        .expect("expiry")
        .expect("a record with an expiry");
    assert!(
        (now + 1..=now + 4).contains(&expires),
        "forgotten 2 to 3 s after it was written: {expires} at {now}"
    );
    let index_ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}:i", stock_common::redis_store::RECORD_BASE))
        .query_async(&mut store.connection())
        .await
        .expect("TTL");
    assert!(
        (1..=4).contains(&index_ttl),
        "the index lives as long as its windows: {index_ttl}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while store
        .order_record("short-1")
        .await
        .expect("record")
        .is_some()
    {
        assert!(Instant::now() < deadline, "the record outlived its window");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = store
        .reserve_many(&req, &Guards::default())
        .await
        .expect("reserve again");
    let (second, fresh) = held_token(&reply.outcomes[0]);
    assert!(
        fresh,
        "forgotten: decided again (the consumer gives it back)"
    );
    assert_ne!(first, second);
    assert!(
        buckets(&env).await.len() <= 1,
        "the old window's keys are gone"
    );
    env.cleanup().await;
}

/// A token names its pre-deduction by the exact sequence number, however far the sequence
/// has run: the scripts once wrote it with Lua's `tostring` (`%.14g`), which turns 10^14
/// and above into an exponent ("1e+15"), so that two pre-deductions could share a name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_name_a_large_sequence_exactly() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100)]).await;
    let store = &env.store;
    let start: u64 = 1_000_000_000_000_000 - 2;
    let _: () = redis::cmd("SET")
        .arg(stock_common::redis_store::SEQ_KEY)
        .arg(start)
        .query_async(&mut store.connection())
        .await
        .expect("SET seq");
    let gen = store
        .generation()
        .await
        .expect("generation")
        .expect("loaded");
    let req: Vec<ReserveRequest> = (0..4)
        .map(|i| reserve_request(&format!("big-{i}"), 1, 1))
        .collect();
    let reply = store
        .reserve_many(&req, &Guards::default())
        .await
        .expect("reserve");
    let tokens: Vec<String> = reply.outcomes.iter().map(|o| held_token(o).0).collect();
    let expected: Vec<String> = (1..=4).map(|i| format!("{gen}.{}", start + i)).collect();
    assert_eq!(tokens, expected);
    env.cleanup().await;
}
