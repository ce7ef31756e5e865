//! Per-customer limits on the real stack (issue 13, contract "Per-customer limits"): never
//! over a limit, never counted twice, given back when an order is released, kept by a
//! replay and by a rebuild after Redis lost its data. Every test checks both stores'
//! counts (PostgreSQL's `customer_units`, Redis' buyers hash) against what the results say.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use stock_common::events::{Item, Reason, Status, StockResult};
use stock_common::pg_store;
use stock_common::redis_store::buyers_key;
use stock_devkit::worker_args::duration;
use stock_e2e::harness::{cancelled, conflicting, created, created_by, paid, Outcomes};
use stock_e2e::{reset_group_to_earliest, wait_until, TestEnv, Workers};
use stockctl::{admin, limits};

const WAIT: Duration = Duration::from_secs(120);

fn item(product_id: i64, quantity: i64) -> Item {
    Item {
        product_id,
        quantity,
    }
}

fn limit_exceeded(id: &str, product: i64) -> StockResult {
    StockResult::rejected(id, Reason::LimitExceeded, Some(product))
}

async fn set_limit(env: &TestEnv, product: i64, per_customer: Option<i64>, request: &str) {
    limits::set_limit(&env.pool, &env.store, product, per_customer, request)
        .await
        .expect("stockctl limit");
}

/// Sends `script`'s orders under one key: one partition, in this order.
async fn send_in_order(env: &TestEnv, script: Vec<(&str, Vec<u8>)>) {
    env.send_orders(
        script
            .into_iter()
            .map(|(_, v)| ("same-key".to_owned(), v))
            .collect(),
    )
    .await;
}

/// A product's counts in both stores: (PostgreSQL's, Redis'), customers holding > 0 units.
async fn counts(env: &TestEnv, product: i64) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let pg: BTreeMap<String, i64> = pg_store::top_customers(&env.pool, product, i64::MAX)
        .await
        .expect("customer units")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    let redis: BTreeMap<String, i64> = env
        .store
        .buyers(product)
        .await
        .expect("buyers")
        .map(|b| b.units.into_iter().collect())
        .unwrap_or_default();
    (pg, redis)
}

/// The units each customer holds of `product` according to the results: the quantity of
/// its orders whose last result is `reserved` or `confirmed`.
fn held_by_results(
    outcomes: &Outcomes,
    orders: &HashMap<String, (String, i64)>,
) -> BTreeMap<String, i64> {
    let mut held = BTreeMap::new();
    for (id, (customer, quantity)) in orders {
        let Some(rs) = outcomes.get(id) else { continue };
        if rs
            .last()
            .is_some_and(|r| matches!(r.status, Status::Reserved | Status::Confirmed))
        {
            *held.entry(customer.clone()).or_insert(0) += quantity;
        }
    }
    held
}

/// The drift check finds nothing: stock, limits and every customer's count equal.
async fn assert_no_drift(env: &TestEnv) {
    let r = admin::check_drift(&env.pool, &env.store, false)
        .await
        .expect("check");
    assert!(
        r.clean() && r.drift.is_empty() && r.limits.is_empty(),
        "drift: {:?} {:?} {:?}",
        r.drift,
        r.limits,
        r.violations
    );
}

/// Issue 13's headline: 1,000 customers each send 5 concurrent orders of 1 unit for a
/// product limited to 2 per customer, with stock for all: exactly 2,000 reserved, 2 per
/// customer, every other order `limit_exceeded`; both stores count 2 for each customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_customers_get_two_each() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 10_000)]).await;
    set_limit(&env, 1, Some(2), "limit-1").await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    let mut orders = HashMap::new();
    let mut msgs = Vec::new();
    // Round by round, so that each customer's orders are spread over the whole load (and
    // over every partition: the key is the order id).
    for round in 0..5 {
        for c in 0..1000 {
            let (id, customer) = (format!("o-{c}-{round}"), format!("c-{c}"));
            msgs.push((id.clone(), created_by(&id, &customer, &[item(1, 1)])));
            orders.insert(id, (customer, 1));
        }
    }
    let ids: HashSet<String> = orders.keys().cloned().collect();
    env.send_orders(msgs).await;
    assert!(collector.wait_for(&ids, 1, WAIT).await);
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let outcomes = collector.snapshot();
    let reserved = env.assert_one_outcome_each(&ids, &outcomes).await;
    assert_eq!(reserved, 2000);
    for id in &ids {
        let r = &outcomes[id][0];
        assert!(
            *r == StockResult::reserved(id) || *r == limit_exceeded(id, 1),
            "{r:?}"
        );
    }
    let held = held_by_results(&outcomes, &orders);
    assert_eq!(held.len(), 1000);
    assert!(held.values().all(|&n| n == 2), "every customer holds 2");
    let (pg, redis) = counts(&env, 1).await;
    assert_eq!(pg, held, "PostgreSQL counts what the results say");
    assert_eq!(redis, held, "Redis counts what the results say");
    let row = env.stock_row(1).await;
    assert_eq!((row.available, row.reserved), (8000, 2000));
    env.assert_invariants(&[1]).await;
    assert_no_drift(&env).await;
    env.assert_history_matches_ledger().await;
    collector.stop().await;
    env.cleanup().await;
}

/// All items or none, and the rule of a decision: an order whose second item would take
/// its customer over that product's limit reserves nothing; an order without a customer
/// for a limited product is `invalid_order` (for an unlimited one it is served); a limit
/// of 0 refuses everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_over_one_limit_reserves_nothing() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100), (2, 100), (3, 100)]).await;
    set_limit(&env, 1, Some(1), "limit-1").await;
    set_limit(&env, 3, Some(0), "limit-3").await;
    let workers = env.start_workers().await;
    let collector = env.collector();

    // Same key: one partition, in this order.
    let script: Vec<(&str, Vec<u8>)> = vec![
        ("a", created_by("a", "c", &[item(1, 1)])),
        ("b", created_by("b", "c", &[item(2, 3), item(1, 1)])),
        ("d", created("d", &[item(2, 1), item(1, 1)])),
        ("e", created("e", &[item(2, 1)])),
        ("f", created_by("f", "c", &[item(3, 1)])),
        ("g", created_by("g", "other", &[item(2, 2), item(1, 1)])),
    ];
    let ids: HashSet<String> = script.iter().map(|(k, _)| k.to_string()).collect();
    send_in_order(&env, script).await;
    assert!(collector.wait_for(&ids, 1, WAIT).await);
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let o = collector.snapshot();
    assert_eq!(o["a"], vec![StockResult::reserved("a")]);
    assert_eq!(o["b"], vec![limit_exceeded("b", 1)]);
    assert_eq!(
        o["d"],
        vec![StockResult::rejected("d", Reason::InvalidOrder, None)]
    );
    assert_eq!(o["e"], vec![StockResult::reserved("e")]);
    assert_eq!(o["f"], vec![limit_exceeded("f", 3)]);
    assert_eq!(o["g"], vec![StockResult::reserved("g")]);
    let row2 = env.stock_row(2).await;
    assert_eq!(
        row2.reserved, 3,
        "e and g only: b took nothing of product 2"
    );
    assert_eq!(env.redis_stock(2).await, Some(97));
    let (pg, redis) = counts(&env, 1).await;
    let want: BTreeMap<String, i64> = [("c".to_owned(), 1), ("other".to_owned(), 1)].into();
    assert_eq!((pg, redis), (want.clone(), want));
    env.assert_invariants(&[1, 2, 3]).await;
    assert_no_drift(&env).await;
    collector.stop().await;
    env.cleanup().await;
}

/// A cancel and an expiry give the customer's units back (once, in both stores); a paid
/// order keeps counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_expiry_give_the_quota_back() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100)]).await;
    set_limit(&env, 1, Some(2), "limit-1").await;
    let ttl = Duration::from_secs(4);
    let cargs = env.consumer_args_with(
        "consumer",
        &[
            ("--reservation-ttl", &duration(ttl)),
            ("--expiry-interval", "100ms"),
        ],
    );
    let workers = Workers::start_with(&env.producer_args("producer"), &cargs).await;
    let collector = env.collector();
    let one = |id: &str| (id.to_owned(), created_by(id, "c", &[item(1, 1)]));
    let wait = |ids: &[&str], n: usize| {
        let ids: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
        let collector = &collector;
        async move { assert!(collector.wait_for(&ids, n, WAIT).await, "{ids:?}") }
    };

    env.send_orders(vec![one("a"), one("b")]).await;
    wait(&["a", "b"], 1).await;
    env.send_orders(vec![one("x1")]).await;
    wait(&["x1"], 1).await;
    env.send_orders(vec![("a".into(), cancelled("a"))]).await;
    wait(&["a"], 2).await;
    env.send_orders(vec![one("d")]).await;
    wait(&["d"], 1).await;
    // b and d expire: the customer holds nothing.
    wait(&["b", "d"], 2).await;
    assert!(
        wait_until(|| async { counts(&env, 1).await == Default::default() }).await,
        "every unit given back: {:?}",
        counts(&env, 1).await
    );
    env.send_orders(vec![one("e"), one("f")]).await;
    wait(&["e", "f"], 1).await;
    env.send_orders(vec![("e".into(), paid("e")), ("f".into(), paid("f"))])
        .await;
    wait(&["e", "f"], 2).await;
    env.send_orders(vec![one("x2")]).await;
    wait(&["x2"], 1).await;
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let o = collector.snapshot();
    let released = |id: &str, reason| StockResult::new(id, Status::Released, Some(reason), None);
    let confirmed = |id: &str| StockResult::new(id, Status::Confirmed, None, None);
    assert_eq!(o["x1"], vec![limit_exceeded("x1", 1)]);
    assert_eq!(
        o["a"],
        vec![StockResult::reserved("a"), released("a", Reason::Cancelled)]
    );
    assert_eq!(
        o["d"][0],
        StockResult::reserved("d"),
        "the cancel gave one back"
    );
    assert_eq!(o["b"][1], released("b", Reason::Expired));
    assert_eq!(o["d"][1], released("d", Reason::Expired));
    assert_eq!(o["e"], vec![StockResult::reserved("e"), confirmed("e")]);
    assert_eq!(o["f"], vec![StockResult::reserved("f"), confirmed("f")]);
    assert_eq!(o["x2"], vec![limit_exceeded("x2", 1)], "paid orders count");
    let (pg, redis) = counts(&env, 1).await;
    let want: BTreeMap<String, i64> = [("c".to_owned(), 2)].into();
    assert_eq!((pg, redis), (want.clone(), want));
    let row = env.stock_row(1).await;
    assert_eq!((row.available, row.reserved, row.sold), (98, 0, 2));
    env.assert_invariants(&[1]).await;
    assert_no_drift(&env).await;
    collector.stop().await;
    env.cleanup().await;
}

/// Duplicated events and a replay of the whole `orders` topic change no count and no
/// outcome; a rebuild after Redis came back empty loads every customer's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_duplicates_and_rebuild_keep_every_count() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 1000), (2, 1000)]).await;
    set_limit(&env, 1, Some(2), "limit-1").await;
    let pargs = env.producer_args("producer");
    let cargs = env.consumer_args("consumer");
    let workers = Workers::start_with(&pargs, &cargs).await;
    let collector = env.collector();

    let mut orders = HashMap::new();
    let mut msgs = Vec::new();
    for c in 0..50 {
        for n in 0..3 {
            let (id, customer) = (format!("o-{c}-{n}"), format!("c-{c}"));
            let body = created_by(&id, &customer, &[item(2, 1), item(1, 1)]);
            // Every event twice.
            msgs.push((id.clone(), body.clone()));
            msgs.push((id.clone(), body));
            orders.insert(id, (customer, 1));
        }
    }
    // One customer with a single order (holds 1 whatever the timing).
    msgs.push(("o-solo".into(), created_by("o-solo", "solo", &[item(1, 1)])));
    orders.insert("o-solo".to_owned(), ("solo".to_owned(), 1));
    // Some cancels: customer c-<k> for even k cancels its first order.
    for c in (0..50).step_by(2) {
        let id = format!("o-{c}-0");
        msgs.push((id.clone(), cancelled(&id)));
    }
    let ids: HashSet<String> = orders.keys().cloned().collect();
    env.send_orders(msgs).await;
    assert!(collector.wait_for(&ids, 1, WAIT).await);
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;
    let first = collector.snapshot();
    let before = counts(&env, 1).await;
    assert_eq!(before.0, before.1);
    assert_eq!(before.0, held_by_results(&first, &orders));
    let rows_before = (env.stock_row(1).await, env.stock_row(2).await);

    // Replay every order event from the start.
    reset_group_to_earliest(
        &env.kafka,
        &format!("t-{}-producer", env.id),
        &[&env.topics.orders],
        env.partitions,
    );
    let workers = Workers::start_with(&pargs, &cargs).await;
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;
    let replayed = collector.snapshot();
    assert!(
        conflicting(&replayed).is_empty(),
        "{:?}",
        conflicting(&replayed)
    );
    assert_eq!(counts(&env, 1).await, before, "the replay changed a count");
    assert_eq!(
        (env.stock_row(1).await, env.stock_row(2).await),
        rows_before,
        "the replay changed stock"
    );

    // Redis comes back empty; the rebuild brings every count back.
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut env.store.connection())
        .await
        .expect("flushdb");
    stockctl::rebuild::rebuild(&env.pool, &env.store)
        .await
        .expect("rebuild");
    assert_eq!(counts(&env, 1).await, before, "the rebuild lost a count");
    assert_no_drift(&env).await;

    // And the limit holds after it: a customer at 2 is refused, one at 1 is served.
    let at_two = before
        .1
        .iter()
        .find(|(_, n)| **n == 2)
        .map(|(c, _)| c.clone());
    let at_two = at_two.expect("a customer at 2");
    assert_eq!(before.1.get("solo"), Some(&1));
    let at_one = "solo".to_owned();
    let workers = Workers::start_with(&pargs, &cargs).await;
    env.send_orders(vec![
        (
            "late-1".into(),
            created_by("late-1", &at_two, &[item(1, 1)]),
        ),
        (
            "late-2".into(),
            created_by("late-2", &at_one, &[item(1, 1)]),
        ),
    ])
    .await;
    let late: HashSet<String> = ["late-1".to_owned(), "late-2".to_owned()].into();
    assert!(collector.wait_for(&late, 1, WAIT).await);
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;
    let o = collector.snapshot();
    assert_eq!(o["late-1"], vec![limit_exceeded("late-1", 1)]);
    assert_eq!(o["late-2"], vec![StockResult::reserved("late-2")]);
    env.assert_invariants(&[1, 2]).await;
    assert_no_drift(&env).await;
    collector.stop().await;
    env.cleanup().await;
}

/// An operator lowers a limit below what a customer holds: the customer keeps it and is
/// refused next; removing the limit drops every count; adding it back counts again from
/// the ledger, in both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_and_removing_a_limit_never_takes_back() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100)]).await;
    set_limit(&env, 1, Some(3), "limit-a").await;
    let workers = env.start_workers().await;
    let collector = env.collector();
    let run = |batch: Vec<(&str, &str)>| {
        let msgs: Vec<(String, Vec<u8>)> = batch
            .iter()
            .map(|(id, c)| (id.to_string(), created_by(id, c, &[item(1, 1)])))
            .collect();
        let ids: HashSet<String> = batch.iter().map(|(id, _)| id.to_string()).collect();
        let (env, collector) = (&env, &collector);
        async move {
            env.send_orders(msgs).await;
            assert!(collector.wait_for(&ids, 1, WAIT).await);
        }
    };
    run(vec![("c1", "c"), ("c2", "c"), ("c3", "c")]).await;
    let change = limits::set_limit(&env.pool, &env.store, 1, Some(1), "limit-b")
        .await
        .expect("lower");
    assert_eq!(
        change.redis,
        admin::Step::Applied,
        "a change applies in place"
    );
    run(vec![("c4", "c"), ("d1", "d")]).await;
    run(vec![("d2", "d")]).await;
    let want: BTreeMap<String, i64> = [("c".to_owned(), 3), ("d".to_owned(), 1)].into();
    assert_eq!(
        counts(&env, 1).await,
        (want.clone(), want),
        "nothing taken back"
    );

    let removed = limits::set_limit(&env.pool, &env.store, 1, None, "limit-c")
        .await
        .expect("remove");
    assert_eq!(removed.redis, admin::Step::Applied);
    assert_eq!(env.store.buyers(1).await.expect("buyers"), None);
    run(vec![("c5", "c")]).await;
    let added = limits::set_limit(&env.pool, &env.store, 1, Some(4), "limit-d")
        .await
        .expect("add back");
    assert_eq!(
        added.redis,
        admin::Step::Loaded,
        "a new limit comes by a load"
    );
    // Retried with the same request id: nothing more.
    let again = limits::set_limit(&env.pool, &env.store, 1, Some(4), "limit-d")
        .await
        .expect("retry");
    assert_eq!(again.postgres, admin::Step::Already);
    let want: BTreeMap<String, i64> = [("c".to_owned(), 4), ("d".to_owned(), 1)].into();
    assert_eq!(
        counts(&env, 1).await,
        (want.clone(), want),
        "counted from the ledger"
    );
    // `stockctl show` tells the limit in both stores and the customers nearest it.
    let shown = admin::show(&env.pool, &env.store, 1, 1)
        .await
        .expect("show");
    assert_eq!(
        (
            shown.limit.per_customer,
            shown.limit.redis,
            shown.limit.customers
        ),
        (Some(4), Some(4), 2)
    );
    assert_eq!(shown.limit.nearest, vec![("c".to_owned(), 4)]);
    run(vec![("c6", "c")]).await;
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let o = collector.snapshot();
    for id in ["c1", "c2", "c3", "d1", "c5"] {
        assert_eq!(o[id], vec![StockResult::reserved(id)], "{id}");
    }
    for id in ["c4", "d2", "c6"] {
        assert_eq!(o[id], vec![limit_exceeded(id, 1)], "{id}");
    }
    let row = env.stock_row(1).await;
    assert_eq!(row.reserved, 5);
    env.assert_invariants(&[1]).await;
    assert_no_drift(&env).await;
    collector.stop().await;
    env.cleanup().await;
}

/// A customer's count in a buyers hash that is not an integer stops that customer's orders
/// of that product only: the order is dead-lettered naming the key (nothing taken), and
/// the other orders of the same batch, of the same product, are decided and take their
/// stock. (The reserve script used to run into HINCRBY's refusal midway and fail the whole
/// batch, again at every retry.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_customer_count_stops_only_that_customer() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100)]).await;
    set_limit(&env, 1, Some(5), "limit-1").await;
    let _: () = redis::cmd("HSET")
        .arg(buyers_key(1))
        .arg("c")
        .arg("not a number")
        .query_async(&mut env.store.connection())
        .await
        .expect("hset");
    let workers = env.start_workers().await;
    let collector = env.collector();
    let script: Vec<(&str, Vec<u8>)> = vec![
        ("before", created_by("before", "other", &[item(1, 1)])),
        ("bad", created_by("bad", "c", &[item(1, 2)])),
        ("after", created_by("after", "other", &[item(1, 3)])),
    ];
    send_in_order(&env, script).await;
    let good: HashSet<String> = ["before".to_owned(), "after".to_owned()].into();
    assert!(collector.wait_for(&good, 1, WAIT).await, "the others sell");
    let dead = stock_e2e::read_topic(&env.kafka, &env.topics.dlq, 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    let reason = stock_e2e::header(&dead[0], "dlq.reason").unwrap_or_default();
    assert!(reason.contains(&buyers_key(1)), "{reason}");
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let o = collector.snapshot();
    assert_eq!(o["before"], vec![StockResult::reserved("before")]);
    assert_eq!(o["after"], vec![StockResult::reserved("after")]);
    assert!(!o.contains_key("bad"), "{:?}", o.get("bad"));
    assert_eq!(env.redis_stock(1).await, Some(96), "bad took nothing");
    assert_eq!(env.stock_row(1).await.reserved, 4);
    let other: Option<i64> = redis::cmd("HGET")
        .arg(buyers_key(1))
        .arg("other")
        .query_async(&mut env.store.connection())
        .await
        .expect("hget");
    assert_eq!(other, Some(4), "the other customer's units counted");
    collector.stop().await;
    env.cleanup().await;
}
