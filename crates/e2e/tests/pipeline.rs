//! The core pipeline end to end on the real stack (issue 2).

use std::collections::HashSet;
use std::time::Duration;
use stock_common::events::{Item, Reason, Status, StockResult};
use stock_e2e::harness::{self, conflicting, created, Outcomes};
use stock_e2e::{read_topic, wait_until, TestEnv};

const WAIT: Duration = Duration::from_secs(90);

fn item(product_id: i64, quantity: i64) -> Item {
    Item {
        product_id,
        quantity,
    }
}

fn first_outcomes(outcomes: &Outcomes, ids: &HashSet<String>) -> Vec<StockResult> {
    ids.iter()
        .map(|id| {
            outcomes
                .get(id)
                .and_then(|r| r.first())
                .cloned()
                .unwrap_or_else(|| panic!("no outcome for {id}"))
        })
        .collect()
}

fn count(rs: &[StockResult], status: Status, reason: Option<Reason>) -> usize {
    rs.iter()
        .filter(|r| r.status == status && r.reason == reason)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_sku_sells_exactly_its_stock() {
    let env = TestEnv::new().await;
    env.load_stock(&[(42, 100)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    let ids: HashSet<String> = (0..1000).map(|i| format!("hot-{i}")).collect();
    // Published from several tasks at once, as concurrent checkouts would.
    let mut sends = Vec::new();
    let all: Vec<String> = ids.iter().cloned().collect();
    for chunk in all.chunks(250) {
        let msgs: Vec<_> = chunk
            .iter()
            .map(|id| (id.clone(), created(id, &[item(42, 1)])))
            .collect();
        let kafka = env.kafka.clone();
        let topic = env.topics.orders.clone();
        sends.push(tokio::spawn(async move {
            let p = stock_common::kafka::producer(&kafka).expect("producer");
            harness::publish(&p, &topic, msgs).await.expect("publish");
        }));
    }
    for s in sends {
        s.await.expect("send");
    }
    assert!(
        collector.wait_for(&ids, 1, WAIT).await,
        "every order gets an outcome"
    );
    workers.stop().await;

    let outcomes = collector.snapshot();
    let firsts = first_outcomes(&outcomes, &ids);
    assert_eq!(count(&firsts, Status::Reserved, None), 100);
    assert_eq!(
        count(&firsts, Status::Rejected, Some(Reason::InsufficientStock)),
        900
    );
    assert!(firsts
        .iter()
        .filter(|r| r.status == Status::Rejected)
        .all(|r| r.product_id == Some(42)));
    assert!(conflicting(&outcomes).is_empty());
    let row = env.stock_row(42).await;
    assert_eq!((row.available, row.reserved, row.sold), (0, 100, 0));
    assert_eq!(env.redis_stock(42).await, Some(0));
    env.assert_invariants(&[42]).await;
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_item_orders_are_all_or_nothing() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 10), (2, 1), (3, 5)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    env.send_orders(vec![
        (
            "short".into(),
            created("short", &[item(1, 2), item(2, 2), item(3, 1)]),
        ),
        (
            "unknown".into(),
            created("unknown", &[item(3, 1), item(999, 1)]),
        ),
        ("fits".into(), created("fits", &[item(1, 3), item(2, 1)])),
    ])
    .await;
    let ids: HashSet<String> = ["short", "unknown", "fits"].map(String::from).into();
    assert!(collector.wait_for(&ids, 1, WAIT).await);
    workers.stop().await;

    let o = collector.snapshot();
    assert_eq!(
        o["short"][0],
        StockResult::rejected("short", Reason::InsufficientStock, Some(2))
    );
    assert_eq!(
        o["unknown"][0],
        StockResult::rejected("unknown", Reason::UnknownProduct, Some(999))
    );
    assert_eq!(o["fits"][0], StockResult::reserved("fits"));
    // Nothing of the refused orders was taken, in PostgreSQL or Redis.
    for (p, available, reserved) in [(1, 7, 3), (2, 0, 1), (3, 5, 0)] {
        let row = env.stock_row(p).await;
        assert_eq!(
            (row.available, row.reserved),
            (available, reserved),
            "product {p}"
        );
        assert_eq!(
            env.redis_stock(p).await,
            Some(available),
            "redis product {p}"
        );
    }
    env.assert_invariants(&[1, 2, 3]).await;
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_orders_and_deducts_deduct_once() {
    let env = TestEnv::new().await;
    env.load_stock(&[(7, 50)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    let ids: HashSet<String> = (0..100).map(|i| format!("dup-{i}")).collect();
    let mut msgs = Vec::new();
    for id in &ids {
        msgs.push((id.clone(), created(id, &[item(7, 1)])));
    }
    // Every order event twice; the second copy of each even with other items.
    for id in &ids {
        msgs.push((id.clone(), created(id, &[item(7, 5)])));
    }
    env.send_orders(msgs).await;
    assert!(collector.wait_for(&ids, 2, WAIT).await);

    // Now every deduct command the producer wrote, delivered again.
    let deducts = read_topic(&env.kafka, &env.topics.deduct, 1, WAIT).await;
    assert!(!deducts.is_empty());
    let all = read_topic(
        &env.kafka,
        &env.topics.deduct,
        usize::MAX,
        Duration::from_secs(5),
    )
    .await;
    let copies: Vec<(String, Vec<u8>)> = all
        .iter()
        .map(|m| {
            use rdkafka::Message;
            (
                String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                m.payload().unwrap_or_default().to_vec(),
            )
        })
        .collect();
    let n_copies = copies.len();
    let producer = stock_common::kafka::producer(&env.kafka).expect("producer");
    harness::publish(&producer, &env.topics.deduct, copies)
        .await
        .expect("publish");
    assert!(
        collector.wait_for_count(200 + n_copies, WAIT).await,
        "re-emitted results arrive"
    );
    workers.stop().await;

    let outcomes = collector.snapshot();
    assert!(
        conflicting(&outcomes).is_empty(),
        "{:?}",
        conflicting(&outcomes)
    );
    let firsts = first_outcomes(&outcomes, &ids);
    assert_eq!(count(&firsts, Status::Reserved, None), 50);
    assert_eq!(
        count(&firsts, Status::Rejected, Some(Reason::InsufficientStock)),
        50
    );
    let row = env.stock_row(7).await;
    assert_eq!((row.available, row.reserved), (0, 50));
    assert_eq!(env.redis_stock(7).await, Some(0));
    let (held, refused): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE token IS NOT NULL), count(*) FILTER (WHERE token IS NULL)
         FROM order_ledger",
    )
    .fetch_one(&env.pool)
    .await
    .expect("count");
    assert_eq!(
        (held, refused),
        (50, 50),
        "half reserved, half refused by Redis: each recorded once"
    );
    env.assert_invariants(&[7]).await;
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_compensated_exactly_once() {
    let env = TestEnv::new().await;
    env.load_stock(&[(5, 5)]).await;
    env.set_redis_stock(5, 10).await; // Redis believes in 5 units PostgreSQL does not have
    let workers = env.start_workers().await;
    let collector = env.collector();

    let ids: HashSet<String> = (0..10).map(|i| format!("drift-{i}")).collect();
    env.send_orders(
        ids.iter()
            .map(|id| (id.clone(), created(id, &[item(5, 1)])))
            .collect(),
    )
    .await;
    assert!(collector.wait_for(&ids, 1, WAIT).await);
    let firsts = first_outcomes(&collector.snapshot(), &ids);
    assert_eq!(count(&firsts, Status::Reserved, None), 5);
    assert_eq!(
        count(&firsts, Status::Rejected, Some(Reason::InsufficientStock)),
        5
    );

    // Each rejected order's stock comes back to Redis once.
    let comps = read_topic(&env.kafka, &env.topics.compensate, 5, WAIT).await;
    assert_eq!(comps.len(), 5);
    assert!(
        wait_until(|| async { env.redis_stock(5).await == Some(5) }).await,
        "redis back to 5"
    );

    // ... however often the compensations are redelivered.
    let copies: Vec<(String, Vec<u8>)> = comps
        .iter()
        .flat_map(|m| {
            use rdkafka::Message;
            let k = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let v = m.payload().unwrap_or_default().to_vec();
            [(k.clone(), v.clone()), (k.clone(), v.clone()), (k, v)]
        })
        .collect();
    let producer = stock_common::kafka::producer(&env.kafka).expect("producer");
    harness::publish(&producer, &env.topics.compensate, copies)
        .await
        .expect("publish");
    assert!(
        env.wait_idle("producer", "consumer").await,
        "producer consumed every compensation copy"
    );
    workers.stop().await;
    assert_eq!(env.redis_stock(5).await, Some(5));
    let row = env.stock_row(5).await;
    assert_eq!((row.available, row.reserved), (0, 5));
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_earliest_changes_nothing() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 30), (2, 30), (3, 5)]).await;
    env.set_redis_stock(2, 35).await; // some compensations in the history too
    let workers = env.start_workers().await;
    let collector = env.collector();
    let ids: HashSet<String> = (0..200).map(|i| format!("r-{i}")).collect();
    let mut msgs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let items = if i.is_multiple_of(3) {
            vec![item(1, 1), item(2, 1)]
        } else {
            vec![item(1 + (i % 2) as i64, 1)]
        };
        msgs.push((id.clone(), created(id, &items)));
    }
    msgs.push(("paid-one".into(), created("paid-one", &[item(3, 1)])));
    env.send_orders(msgs).await;
    let mut all_ids = ids.clone();
    all_ids.insert("paid-one".into());
    assert!(collector.wait_for(&all_ids, 1, WAIT).await);
    env.send_orders(vec![("paid-one".into(), harness::paid("paid-one"))])
        .await;
    assert!(
        collector
            .wait_for(&HashSet::from(["paid-one".to_owned()]), 2, WAIT)
            .await
    );
    // Let compensations settle, then stop.
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;
    let products = [1, 2, 3];
    let mut before_rows = Vec::new();
    let mut before_redis = Vec::new();
    for p in products {
        before_rows.push(env.stock_row(p).await);
        before_redis.push(env.redis_stock(p).await);
    }
    assert_eq!(before_rows[2].sold, 1, "paid-one was confirmed");
    let before = collector.snapshot();
    let results_before: usize = before.values().map(Vec::len).sum();

    // Reset both groups to the earliest offsets and run again.
    let pgroup = format!("t-{}-producer", env.id);
    let cgroup = format!("t-{}-consumer", env.id);
    stock_e2e::reset_group_to_earliest(
        &env.kafka,
        &pgroup,
        &[&env.topics.orders, &env.topics.compensate],
        env.partitions,
    );
    stock_e2e::reset_group_to_earliest(&env.kafka, &cgroup, &[&env.topics.deduct], env.partitions);
    let workers = env.start_workers().await;
    // The replay re-emits at least every result once more.
    assert!(
        collector.wait_for_count(results_before * 2, WAIT).await,
        "replayed results arrive"
    );
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    for (i, p) in products.into_iter().enumerate() {
        assert_eq!(
            env.stock_row(p).await,
            before_rows[i],
            "PostgreSQL row of {p} after the replay"
        );
        assert_eq!(
            env.redis_stock(p).await,
            before_redis[i],
            "Redis stock of {p} after the replay"
        );
    }
    let after = collector.snapshot();
    for (id, rs) in &after {
        let was: HashSet<&StockResult> = before[id].iter().collect();
        let now: HashSet<&StockResult> = rs.iter().collect();
        assert_eq!(was, now, "results of {id} changed in the replay");
    }
    // once in the run, and again from each replayed topic (orders and deduct)
    assert!(
        after["paid-one"]
            .iter()
            .filter(|r| r.status == Status::Confirmed)
            .count()
            >= 2
    );
    env.assert_invariants(&[1, 3]).await; // product 2 keeps the drift the test set up
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_and_dead_lettered() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 10)]).await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    let many: Vec<Item> = (1..=101).map(|p| item(p, 1)).collect();
    env.send_orders(vec![
        ("junk".into(), b"\x00\x01 definitely not json".to_vec()),
        ("zero".into(), created("zero", &[item(1, 0)])),
        ("many".into(), created("many", &many)),
        ("has space".into(), created("has space", &[item(1, 1)])),
        (
            "typeless".into(),
            br#"{"type":"order_shipped","order_id":"typeless"}"#.to_vec(),
        ),
        (
            "bad-pay x".into(),
            br#"{"type":"order_paid","order_id":"bad pay x"}"#.to_vec(),
        ),
        ("after".into(), created("after", &[item(1, 1)])),
    ])
    .await;
    let ids: HashSet<String> = ["zero", "many", "has space", "bad pay x", "after"]
        .map(String::from)
        .into();
    assert!(collector.wait_for(&ids, 1, WAIT).await);
    let o = collector.snapshot();
    for id in ["zero", "many", "has space"] {
        assert_eq!(
            o[id][0],
            StockResult::rejected(id, Reason::InvalidOrder, None)
        );
    }
    assert_eq!(
        o["bad pay x"][0],
        StockResult::new(
            "bad pay x",
            Status::Ignored,
            Some(Reason::NotReserved),
            None
        )
    );
    assert_eq!(
        o["after"][0],
        StockResult::reserved("after"),
        "the worker carried on"
    );

    let dead = read_topic(&env.kafka, &env.topics.dlq, 2, WAIT).await;
    assert_eq!(dead.len(), 2);
    let junk = dead
        .iter()
        .find(|m| stock_e2e::header(m, "dlq.reason").is_some_and(|r| r.starts_with("not JSON")))
        .expect("junk dead-lettered");
    {
        use rdkafka::Message;
        assert_eq!(
            junk.payload(),
            Some(&b"\x00\x01 definitely not json"[..]),
            "original bytes kept"
        );
        assert_eq!(
            stock_e2e::header(junk, "dlq.source.topic").as_deref(),
            Some(env.topics.orders.as_str())
        );
        assert!(stock_e2e::header(junk, "dlq.source.partition").is_some());
        assert!(stock_e2e::header(junk, "dlq.source.offset").is_some());
    }
    assert!(dead
        .iter()
        .any(|m| stock_e2e::header(m, "dlq.reason").is_some_and(|r| r.contains("order_shipped"))));
    workers.stop().await;
    let row = env.stock_row(1).await;
    assert_eq!((row.available, row.reserved), (9, 1));
    env.assert_invariants(&[1]).await;
    collector.stop().await;
    env.cleanup().await;
}
