//! Order lifecycle and Redis loss on the real stack (issue 3): pay, cancel, expiry (with
//! two consumer instances and payments racing the deadline), and a Redis that comes back
//! empty during a load.

use std::collections::HashSet;
use std::time::Duration;
use stock_common::events::{Item, Reason, Status, StockResult};
use stock_devkit::worker_args::duration;
use stock_e2e::harness::{cancelled, conflicting, created, paid};
use stock_e2e::{wait_until, TestEnv, Workers};

const WAIT: Duration = Duration::from_secs(90);

fn item(product_id: i64, quantity: i64) -> Item {
    Item {
        product_id,
        quantity,
    }
}

fn ignored(id: &str, reason: Reason) -> StockResult {
    StockResult::new(id, Status::Ignored, Some(reason), None)
}

/// The ledger's status (and release reason) of `order_id`.
async fn ledger_state(env: &TestEnv, order_id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, release_reason FROM order_ledger WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&env.pool)
        .await
        .expect("ledger row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_and_cancel_move_stock_and_answer_once() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 10)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    // Same key, same partition: these arrive in this order.
    let script: Vec<(&str, Vec<u8>)> = vec![
        ("a", created("a", &[item(1, 2)])),
        ("b", created("b", &[item(1, 3)])),
        ("c", created("c", &[item(1, 1)])),
        ("a", paid("a")),
        ("b", cancelled("b")),
        ("a", paid("a")),
        ("b", cancelled("b")),
        ("a", cancelled("a")),
        ("b", paid("b")),
        ("zzz", paid("zzz")),
        ("zzz", cancelled("zzz")),
    ];
    env.send_orders(script.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        .await;
    assert!(collector.wait_for_count(11, WAIT).await);
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let o = collector.snapshot();
    assert_eq!(
        o["a"],
        vec![
            StockResult::reserved("a"),
            StockResult::new("a", Status::Confirmed, None, None),
            ignored("a", Reason::AlreadyConfirmed),
            ignored("a", Reason::AlreadyConfirmed),
        ]
    );
    assert_eq!(
        o["b"],
        vec![
            StockResult::reserved("b"),
            StockResult::new("b", Status::Released, Some(Reason::Cancelled), None),
            ignored("b", Reason::AlreadyReleased),
            ignored("b", Reason::AlreadyReleased),
        ]
    );
    assert_eq!(o["c"], vec![StockResult::reserved("c")]);
    assert_eq!(
        o["zzz"],
        vec![
            ignored("zzz", Reason::NotReserved),
            ignored("zzz", Reason::NotReserved)
        ]
    );

    let row = env.stock_row(1).await;
    assert_eq!((row.available, row.reserved, row.sold), (7, 1, 2));
    // The cancelled stock is back in Redis too (compensation), once.
    assert_eq!(env.redis_stock(1).await, Some(7));
    assert_eq!(ledger_state(&env, "a").await, ("confirmed".into(), None));
    assert_eq!(
        ledger_state(&env, "b").await,
        ("released".into(), Some("cancelled".into()))
    );
    // Each order moved stock once: the history sums exactly the ledger's orders.
    env.assert_history_matches_ledger().await;
    env.assert_invariants(&[1]).await;
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_expire_once_and_race_payments_consistently() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 1000)]).await;
    let ttl = Duration::from_secs(2);
    let cargs = env.consumer_args_with(
        "consumer",
        &[
            ("--reservation-ttl", &duration(ttl)),
            ("--expiry-interval", "100ms"),
        ],
    );
    let pargs = env.producer_args("producer");
    // Two consumer instances (and two producers) in the same groups, both sweeping.
    let w1 = Workers::start_with(&pargs, &cargs).await;
    let w2 = Workers::start_with(&pargs, &cargs).await;
    let collector = env.collector();

    let ids: Vec<String> = (0..60).map(|i| format!("x-{i}")).collect();
    env.send_orders(
        ids.iter()
            .map(|id| (id.clone(), created(id, &[item(1, 2)])))
            .collect(),
    )
    .await;
    let all: HashSet<String> = ids.iter().cloned().collect();
    assert!(collector.wait_for(&all, 1, WAIT).await);
    // Pay half of them, spread over the deadline: some before it, some after.
    let started = tokio::time::Instant::now();
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| i.is_multiple_of(2)) {
        let at = started + Duration::from_millis(60 * i as u64);
        tokio::time::sleep_until(at).await;
        env.send_orders(vec![(id.clone(), paid(id))]).await;
    }
    // Every order ends settled: the unpaid ones expire, the paid ones answer.
    assert!(collector.wait_for(&all, 2, WAIT).await);
    assert!(
        wait_until(|| async {
            let r: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM order_ledger WHERE status = 'reserved' OR NOT announced",
            )
            .fetch_one(&env.pool)
            .await
            .expect("count");
            r == 0
        })
        .await,
        "every reservation settled and announced"
    );
    assert!(env.wait_idle("producer", "consumer").await);
    w1.stop().await;
    w2.stop().await;

    let o = collector.snapshot();
    let (mut confirmed, mut expired_then_paid) = (0, 0);
    for (i, id) in ids.iter().enumerate() {
        let distinct: HashSet<&StockResult> = o[id].iter().collect();
        let confirmed_r = StockResult::new(id, Status::Confirmed, None, None);
        let expired_r = StockResult::new(id, Status::Released, Some(Reason::Expired), None);
        let late_pay = ignored(id, Reason::AlreadyReleased);
        let got_confirmed = distinct.contains(&confirmed_r);
        let got_expired = distinct.contains(&expired_r);
        assert!(
            got_confirmed != got_expired,
            "{id}: exactly one of confirmed/expired, got {distinct:?}"
        );
        if i % 2 == 1 {
            assert!(got_expired, "unpaid {id} expires");
            assert_eq!(distinct.len(), 2, "{id}: {distinct:?}");
        } else if got_confirmed {
            confirmed += 1;
            assert_eq!(distinct.len(), 2, "paid then nothing: {distinct:?}");
        } else {
            expired_then_paid += 1;
            assert!(
                distinct.contains(&late_pay),
                "expired then paid is ignored/already_released: {distinct:?}"
            );
            assert_eq!(distinct.len(), 3, "{id}: {distinct:?}");
        }
    }
    // Exactly once in PostgreSQL, whatever the announcements: the history sums exactly the
    // ledger's orders, each settled once.
    env.assert_history_matches_ledger().await;
    tracing::info!(confirmed, expired_then_paid, "expiry race outcomes");
    assert!(confirmed > 0, "some payments came before the deadline");
    let row = env.stock_row(1).await;
    assert_eq!(
        (row.available, row.reserved, row.sold),
        (1000 - 2 * confirmed, 0, 2 * confirmed)
    );
    assert_eq!(
        env.redis_stock(1).await,
        Some(row.available),
        "expired stock is back in Redis, once"
    );
    env.assert_invariants(&[1]).await;
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loss_stops_selling_until_rebuilt_and_replays_keep_outcomes() {
    let env = TestEnv::new().await;
    let mut stock = vec![(1, 600)];
    stock.extend((2..=10).map(|p| (p, 150)));
    env.load_stock(&stock).await;
    let products: Vec<i64> = stock.iter().map(|s| s.0).collect();
    let workers = env.start_workers().await;
    let collector = env.collector();
    let order = |i: usize| {
        let id = format!("loss-{i}");
        let p = if i.is_multiple_of(2) {
            1
        } else {
            2 + (i as i64 % 9)
        };
        let body = created(&id, &[item(p, 1 + (i % 3) as i64)]);
        (id, body)
    };

    env.send_orders((0..3000).map(order).collect()).await;
    assert!(collector.wait_for_count(1000, WAIT).await);
    // Redis comes back empty in the middle of the load.
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut env.store.connection())
        .await
        .expect("flushdb");
    env.send_orders((3000..5000).map(order).collect()).await;

    // Nothing is sold or refused from an empty Redis: no stock key reappears by itself.
    assert!(!env.store.is_loaded().await.expect("loaded?"));
    assert_eq!(env.redis_stock(1).await, None);

    let report = stockctl::rebuild::rebuild(&env.pool, &env.store)
        .await
        .expect("rebuild");
    assert_eq!(report.products, products.len());
    assert!(
        report.held > 0,
        "reservations from before the loss were reloaded from the ledger"
    );
    let all: HashSet<String> = (0..5000).map(|i| format!("loss-{i}")).collect();
    assert!(
        collector.wait_for(&all, 1, WAIT).await,
        "the load completes after the rebuild"
    );
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let check = |o: &stock_e2e::harness::Outcomes| {
        let bad = conflicting(o);
        assert!(
            bad.is_empty(),
            "two outcomes: {:?}",
            &bad[..bad.len().min(3)]
        );
        let wrong: Vec<_> = o
            .values()
            .flatten()
            .filter(|r| r.reason == Some(Reason::UnknownProduct))
            .take(3)
            .collect();
        assert!(
            wrong.is_empty(),
            "refused because Redis was empty: {wrong:?}"
        );
    };
    let before = collector.snapshot();
    check(&before);
    env.assert_invariants(&products).await;
    let mut rows = Vec::new();
    for p in &products {
        rows.push((env.stock_row(*p).await, env.redis_stock(*p).await));
    }

    // Replay everything, including the orders from before the loss.
    stock_e2e::reset_group_to_earliest(
        &env.kafka,
        &format!("t-{}-producer", env.id),
        &[&env.topics.orders, &env.topics.compensate],
        env.partitions,
    );
    stock_e2e::reset_group_to_earliest(
        &env.kafka,
        &format!("t-{}-consumer", env.id),
        &[&env.topics.deduct],
        env.partitions,
    );
    let results_before: usize = before.values().map(Vec::len).sum();
    let workers = env.start_workers().await;
    assert!(
        collector.wait_for_count(results_before + 5000, WAIT).await,
        "replayed outcomes arrive"
    );
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;
    check(&collector.snapshot());
    for (i, p) in products.iter().enumerate() {
        assert_eq!(
            (env.stock_row(*p).await, env.redis_stock(*p).await),
            rows[i],
            "product {p} after the replay"
        );
    }
    env.assert_invariants(&products).await;
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restock_while_orders_flow_never_sells_stock_postgres_lacks() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 50)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();
    let ids: Vec<String> = (0..600).map(|i| format!("rs-{i}")).collect();
    let all: HashSet<String> = ids.iter().cloned().collect();
    let kafka = env.kafka.clone();
    let topic = env.topics.orders.clone();
    let msgs: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| (id.clone(), created(id, &[item(1, 1)])))
        .collect();
    let load = tokio::spawn(async move {
        let producer = stock_common::kafka::producer(&kafka).expect("producer");
        for chunk in msgs.chunks(50) {
            stock_e2e::harness::publish(&producer, &topic, chunk.to_vec())
                .await
                .expect("publish");
        }
    });
    // Five restocks of 30 while the orders flow; the third is retried with its id.
    for n in 0..5 {
        let id = format!("restock-{}-{n}", env.id);
        stockctl::admin::restock(&env.pool, &env.store, 1, 30, &id)
            .await
            .expect("restock");
        if n == 2 {
            stockctl::admin::restock(&env.pool, &env.store, 1, 30, &id)
                .await
                .expect("retried restock");
        }
    }
    load.await.expect("load");
    assert!(collector.wait_for(&all, 1, WAIT).await);
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let row = env.stock_row(1).await;
    assert_eq!(row.total_added, 200, "the retried restock added once");
    let o = collector.snapshot();
    let reserved = ids
        .iter()
        .filter(|id| o[*id][0].status == Status::Reserved)
        .count() as i64;
    // PostgreSQL never had to refuse what Redis granted: Redis only ever offered stock
    // that PostgreSQL already held.
    let refused_in_pg: i64 =
        // (A Redis refusal is a ledger row without a token: it never held stock.)
        sqlx::query_scalar(
            "SELECT count(*) FROM order_ledger WHERE status = 'rejected' AND token IS NOT NULL",
        )
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(
        refused_in_pg, 0,
        "no order was granted stock PostgreSQL lacked"
    );
    assert_eq!(row.reserved, reserved);
    assert!(reserved <= 200);
    env.assert_invariants(&[1]).await;
    collector.stop().await;
    env.cleanup().await;
}
