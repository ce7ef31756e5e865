//! The producer on the cluster layout's Redis Cluster (3 masters, 3 replicas) and Kafka
//! (3 brokers), issue 11 item 2: orders whose items live on three masters are all-or-nothing
//! and decided once, with the process killed at each point of the cross-slot protocol
//! (`FAILPOINTS=<point>=1*return`, an abort like `kill -9` there) and restarted.
//!
//! After each run, once idle: every order has exactly one outcome, the ledger holds one
//! reservation per reserved result, stock is conserved and `stock:{p}` equals `available`
//! on every product (a hold left taken or given back twice would show), no order record is
//! left claimed (`P`) and no hold is left taken (`H`) for an order that is not reserved.
//!
//! The Redis Cluster has one database: these tests empty it and take turns
//! ([`stock_e2e::CLUSTER_LOCK`]).

use redis::AsyncCommands;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use stock_common::events::{Item, Status};
use stock_common::redis_store::slots::slot;
use stock_common::redis_store::{stock_key, RedisStore};
use stock_e2e::harness::{self, cancelled, created, created_outcomes};
use stock_e2e::{wait_until, Stack, TestEnv, WorkerProcess, CLUSTER_LOCK};
use stockctl::admin;
use stockctl::rebuild::{rebuild_slots, Slots};

/// Three products whose stock keys live in the three masters' slot ranges of
/// `redis-cli --cluster create` (0-5460, 5461-10922, 10923-16383).
fn three_masters() -> [i64; 3] {
    let mut found = [None; 3];
    for p in 1..10_000i64 {
        let s = slot(&stock_key(p));
        let m = match s {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        };
        found[m].get_or_insert(p);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.map(|p| p.expect("a product per master"))
}

async fn cluster_env() -> TestEnv {
    let stack =
        Stack::cluster().expect("the cluster layout: STACK_LAYOUT=cluster bash deploy/stack-up.sh");
    TestEnv::on_with(stack, 4).await
}

/// The load: `n` orders of one unit of each of the three products (every fourth also
/// takes a second unit of the scarce one), and `singles` orders of the scarce product
/// alone, interleaved.
fn load(products: [i64; 3], n: usize, singles: usize) -> Vec<(String, Vec<u8>)> {
    let [a, b, c] = products;
    let mut msgs = Vec::new();
    for i in 0..n.max(singles) {
        if i < n {
            let id = format!("x-{i}");
            let mut items = vec![
                Item {
                    product_id: a,
                    quantity: 1,
                },
                Item {
                    product_id: b,
                    quantity: 1,
                },
                Item {
                    product_id: c,
                    quantity: 1 + i64::from(i % 4 == 0),
                },
            ];
            items.rotate_left(i % 3);
            msgs.push((id.clone(), created(&id, &items)));
        }
        if i < singles {
            let id = format!("s-{i}");
            let items = [Item {
                product_id: c,
                quantity: 1,
            }];
            msgs.push((id.clone(), created(&id, &items)));
        }
    }
    msgs
}

/// The address of the node at `index` of a `CLUSTER SLOTS` range (2: its master, 3: its
/// first replica), if the range has one.
fn node_at(range: &redis::Value, index: usize) -> Option<(String, u16)> {
    let parts: Vec<redis::Value> = redis::from_redis_value(range.clone()).expect("range");
    let node: Vec<redis::Value> = redis::from_redis_value(parts.get(index)?.clone()).expect("node");
    let host: String = redis::from_redis_value(node[0].clone()).expect("host");
    let port: u16 = redis::from_redis_value(node[1].clone()).expect("port");
    Some((host, port))
}

/// Every key of `pattern` on the cluster, with its value.
async fn keys_like(store: &RedisStore, pattern: &str) -> HashMap<String, String> {
    let masters: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut store.connection())
        .await
        .expect("cluster slots");
    let mut conn = store.connection();
    let mut out = HashMap::new();
    for r in &masters {
        let (host, port) = node_at(r, 2).expect("a master");
        let client = redis::Client::open(format!("redis://{host}:{port}")).expect("client");
        let mut node_conn = stock_common::redis_store::raw_connection(&client)
            .await
            .expect("master");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut node_conn)
            .await
            .expect("keys");
        for k in keys {
            if let Some(v) = conn.get::<_, Option<String>>(&k).await.expect("get") {
                out.insert(k, v);
            }
        }
    }
    out
}

/// The checks of the module docs, once every order of `ids` has its outcome.
async fn check_idle(
    env: &TestEnv,
    ids: &HashSet<String>,
    products: &[i64],
    outcomes: &harness::Outcomes,
) {
    let bad = harness::conflicting(outcomes);
    assert!(bad.is_empty(), "orders with two outcomes: {bad:?}");
    let reserved = ids
        .iter()
        .filter(|id| {
            created_outcomes(&outcomes[*id])
                .iter()
                .any(|r| r.status == Status::Reserved)
        })
        .count();
    let in_ledger: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_ledger WHERE status <> 'rejected'")
            .fetch_one(&env.pool)
            .await
            .expect("count");
    assert_eq!(
        reserved as i64, in_ledger,
        "every reserved result is one reservation in PostgreSQL (some since released)"
    );
    env.assert_invariants(products).await;
    let records = env.store.records().await.expect("records");
    let claimed: Vec<&String> = records
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v.starts_with("P|"))
        .collect();
    assert!(claimed.is_empty(), "orders left claimed: {claimed:?}");
    let holds = keys_like(&env.store, "stockpipe:hold:*").await;
    let reserved_ids: HashSet<&str> = ids
        .iter()
        .filter(|id| outcomes[*id].iter().any(|r| r.status == Status::Reserved))
        .map(String::as_str)
        .collect();
    for (k, v) in &holds {
        if v.starts_with("H|") {
            // stockpipe:hold:{tag}:<order id>:<token>
            let id = k
                .splitn(3, ':')
                .nth(2)
                .and_then(|r| r.split_once(':'))
                .map(|(_, rest)| rest);
            let id = id
                .and_then(|r| r.rsplit_once(':'))
                .map(|(id, _)| id)
                .unwrap_or("");
            assert!(
                reserved_ids.contains(id),
                "hold {k} = {v} taken for an order that is not reserved"
            );
        }
    }
    tracing::info!(reserved, holds = holds.len(), "cluster checks passed");
}

/// While part of the cluster is out (`what`): every order of `others` gets its outcome,
/// and none of `touching` does, even after time for a few retries.
async fn only_the_touching_wait(
    collector: &harness::ResultCollector,
    others: &HashSet<String>,
    touching: &HashSet<String>,
    what: &str,
) {
    assert!(
        collector.wait_for(others, 1, Duration::from_secs(90)).await,
        "every order away from {what} is decided meanwhile"
    );
    // Time for the waiting ones to have been retried a few times.
    let _ = collector
        .wait_for(touching, 1, Duration::from_secs(3))
        .await;
    let seen = collector.snapshot();
    let answered: Vec<&String> = touching
        .iter()
        .filter(|id| seen.contains_key(*id))
        .collect();
    assert!(
        answered.is_empty(),
        "orders touching {what} wait: {answered:?}"
    );
}

/// A test's start with both workers: the three products (one per master) with `each`
/// units, a result collector, the producer and the consumer running, and a writer to the
/// orders topic.
async fn start_both(
    env: &TestEnv,
    each: i64,
) -> (
    [i64; 3],
    harness::ResultCollector,
    [WorkerProcess; 2],
    rdkafka::producer::FutureProducer,
) {
    let products = three_masters();
    env.load_stock(&products.map(|p| (p, each))).await;
    let collector = env.collector();
    let producer = WorkerProcess::spawn(&env.process_flags("producer"), &[("FAILPOINTS", "")]);
    let consumer = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    let kafka = stock_common::kafka::producer(&env.kafka).expect("producer");
    (products, collector, [producer, consumer], kafka)
}

/// The end of a test with both workers, once every order of `ids` has its outcome: the
/// pipeline goes idle, Redis equals PostgreSQL (`stockctl check`), the checks of the
/// module docs hold; then the workers stop cleanly and the test's topics go.
async fn idle_and_consistent(
    env: TestEnv,
    ids: &HashSet<String>,
    products: &[i64],
    collector: harness::ResultCollector,
    workers: [WorkerProcess; 2],
) {
    assert!(
        env.wait_idle("producer", "consumer").await,
        "pipeline goes idle"
    );
    let report = admin::check_drift(&env.pool, &env.store, false)
        .await
        .expect("drift check");
    assert!(report.drift.is_empty(), "drift: {:?}", report.drift);
    check_idle(&env, ids, products, &collector.snapshot()).await;
    for w in workers {
        let name = w.name.clone();
        assert!(w.terminate(), "{name} exits cleanly");
    }
    collector.stop().await;
    env.cleanup().await;
}

/// Runs the load through a producer (killed at `failpoint` first, unless empty) and a
/// consumer on the cluster; `cancel` cancels the first reserved orders across slots once
/// answered (their give-backs cross slots too).
async fn run(failpoint: &str, cancel: usize) {
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let products = three_masters();
    let [a, b, c] = products;
    env.load_stock(&[(a, 60), (b, 60), (c, 40)]).await;
    let collector = env.collector();
    // The whole load waits before the producer starts: its first batch holds all of it,
    // refusals included, so the crash at a point of the protocol hits every kind of order.
    let kafka = stock_common::kafka::producer(&env.kafka).expect("producer");
    let msgs = load(products, 60, 30);
    let ids: HashSet<String> = msgs.iter().map(|(id, _)| id.clone()).collect();
    harness::publish(&kafka, &env.topics.orders, msgs)
        .await
        .expect("publish");
    let armed = if failpoint.is_empty() || failpoint.starts_with("producer.xslot.restore") {
        String::new()
    } else {
        format!("{failpoint}=1*return")
    };
    let mut producer =
        WorkerProcess::spawn(&env.process_flags("producer"), &[("FAILPOINTS", &armed)]);
    let consumer = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    if !armed.is_empty() {
        let code = producer.wait_exit(Duration::from_secs(60));
        assert!(code.is_some(), "the producer reaches {failpoint}");
        assert!(
            producer
                .log_text()
                .contains(&format!("failpoint {failpoint}: crash")),
            "died at {failpoint}: {}",
            producer.log.display()
        );
        producer = WorkerProcess::spawn(&env.process_flags("producer"), &[("FAILPOINTS", "")]);
    }
    assert!(
        collector.wait_for(&ids, 1, Duration::from_secs(120)).await,
        "every order gets an outcome"
    );
    if cancel > 0 {
        let snapshot = collector.snapshot();
        let mut to_cancel: Vec<String> = ids
            .iter()
            .filter(|id| id.starts_with("x-"))
            .filter(|id| {
                created_outcomes(&snapshot[*id])
                    .iter()
                    .any(|r| r.status == Status::Reserved)
            })
            .cloned()
            .collect();
        to_cancel.sort();
        to_cancel.truncate(cancel);
        if failpoint.starts_with("producer.xslot.restore") {
            // Armed now: the cancels' give-backs are its next cross-slot work.
            assert!(producer.terminate(), "producer exits cleanly");
            producer = WorkerProcess::spawn(
                &env.process_flags("producer"),
                &[("FAILPOINTS", &format!("{failpoint}=1*return"))],
            );
        }
        assert!(
            !to_cancel.is_empty(),
            "some orders across slots were reserved"
        );
        let msgs: Vec<_> = to_cancel
            .iter()
            .map(|id| (id.clone(), cancelled(id)))
            .collect();
        harness::publish(&kafka, &env.topics.orders, msgs)
            .await
            .expect("publish cancels");
        if failpoint.starts_with("producer.xslot.restore") {
            let code = producer.wait_exit(Duration::from_secs(60));
            assert!(code.is_some(), "the producer reaches {failpoint}");
            assert!(
                producer
                    .log_text()
                    .contains(&format!("failpoint {failpoint}: crash")),
                "died at {failpoint}"
            );
            producer = WorkerProcess::spawn(&env.process_flags("producer"), &[("FAILPOINTS", "")]);
        }
        let n = to_cancel.len();
        assert!(
            wait_until(|| {
                let snap = collector.snapshot();
                let to_cancel = &to_cancel;
                async move {
                    to_cancel
                        .iter()
                        .filter(|id| snap[*id].iter().any(|r| r.status == Status::Released))
                        .count()
                        == n
                }
            })
            .await,
            "every cancel is answered"
        );
    }
    assert!(
        env.wait_idle("producer", "consumer").await,
        "pipeline goes idle"
    );
    // Idle: every compensation applied.
    check_idle(&env, &ids, &products, &collector.snapshot()).await;
    assert!(producer.terminate(), "producer exits cleanly");
    assert!(consumer.terminate(), "consumer exits cleanly");
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_across_three_masters_are_all_or_nothing() {
    run("", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_claim() {
    run("producer.xslot.after_claim", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_hold() {
    run("producer.xslot.after_hold", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_decide() {
    run("producer.xslot.after_decide", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_a_give_back_after_release() {
    run("producer.xslot.restore_after_release", 10).await;
}

/// `deploy/cluster-fault.sh ARGS` (waits for its own outcome).
async fn fault(args: &[&str]) {
    let deploy = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"));
    if let Err(e) = stock_e2e::nemesis::faults::cluster_fault(&deploy, args).await {
        panic!("{e}");
    }
}

/// The port of the master that serves `product`'s stock key now.
async fn master_of(store: &RedisStore, product: i64) -> u16 {
    master_of_slot(store, slot(&stock_key(product))).await
}

/// A master killed (`kill -9`) while orders across all three masters flow: its replica
/// takes over (the producer retries its batch meanwhile, on a fresh connection), the old
/// master comes back as a replica. Decisions are published only once on a replica, and
/// claims reach the replicas before holds are taken (`WAIT`), so the failover loses no
/// decision and leaves no hold to no one. Its slots are then treated as lost all the same
/// (replication is asynchronous: `stockctl rebuild --master` of the promoted replica,
/// while orders flow) and loaded alone from PostgreSQL. Every order gets one outcome, the
/// ledger agrees, and Redis equals PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_during_load_loses_no_decision() {
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let products = three_masters();
    let [a, b, c] = products;
    env.load_stock(&[(a, 5_000), (b, 5_000), (c, 2_000)]).await;
    let collector = env.collector();
    let producer = WorkerProcess::spawn(&env.process_flags("producer"), &[("FAILPOINTS", "")]);
    let consumer = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    let kafka = stock_common::kafka::producer(&env.kafka).expect("producer");
    let all = load(products, 1_500, 600);
    let ids: HashSet<String> = all.iter().map(|(id, _)| id.clone()).collect();
    let victim = master_of(&env.store, b).await;
    let port = victim.to_string();
    let mut chunks = all.chunks(150);
    for (n, chunk) in chunks.by_ref().enumerate() {
        harness::publish(&kafka, &env.topics.orders, chunk.to_vec())
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(150)).await;
        if n == 3 {
            break;
        }
    }
    fault(&["kill-redis-master", &port]).await;
    for (n, chunk) in chunks.by_ref().enumerate() {
        harness::publish(&kafka, &env.topics.orders, chunk.to_vec())
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(150)).await;
        if n == 3 {
            break;
        }
    }
    fault(&["start-redis", &port]).await;
    let promoted = master_of(&env.store, b).await;
    assert_ne!(promoted, victim, "a replica took over");
    let served = slots_of(&env.store, promoted).await;
    let before = stock_common::pg_store::generation(&env.pool)
        .await
        .expect("generation")
        .gen;
    let report = rebuild_slots(
        &env.pool,
        &env.store,
        Slots::OfMaster("127.0.0.1".into(), promoted),
    )
    .await
    .expect("rebuild of the promoted replica's slots");
    assert_eq!(
        report.slots,
        stock_common::redis_store::slots::format_ranges(&served),
        "the failed-over slots alone are rebuilt"
    );
    assert!(report.generation > before, "a new generation");
    for chunk in chunks {
        harness::publish(&kafka, &env.topics.orders, chunk.to_vec())
            .await
            .expect("publish");
    }
    assert!(
        collector.wait_for(&ids, 1, Duration::from_secs(180)).await,
        "every order gets an outcome"
    );
    idle_and_consistent(env, &ids, &products, collector, [producer, consumer]).await;
}

/// Slots that lost their data are named by the producer's `/readyz` (how many of the
/// 16,384), and it is ready again once they are rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_counts_the_slots_that_are_not_loaded() {
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let products = three_masters();
    env.load_stock(&products.map(|p| (p, 10))).await;
    let port = stock_e2e::free_port();
    let producer = WorkerProcess::spawn(
        &env.process_flags("producer")
            .set("--metrics-addr", format!("127.0.0.1:{port}")),
        &[("FAILPOINTS", "")],
    );
    let ready = |want: u16| async move {
        stock_e2e::http_get(port, "/readyz")
            .await
            .is_some_and(|(c, _)| c == want)
    };
    assert!(wait_until(|| ready(200)).await, "ready once loaded");
    // Three slots lose their marker, as when their master comes back empty.
    for s in [0u16, 8000, 16383] {
        let key = stock_common::redis_store::slots::Shard::Slot(s).loaded_key();
        let _: i64 = env.store.connection().del(key).await.expect("del");
    }
    assert!(
        wait_until(|| ready(503)).await,
        "not ready with slots unloaded"
    );
    let (_, body) = stock_e2e::http_get(port, "/readyz").await.expect("readyz");
    assert!(body.contains("3 of 16384 slots are not loaded"), "{body}");
    let report = rebuild_slots(&env.pool, &env.store, Slots::Lost)
        .await
        .expect("rebuild");
    assert_eq!(
        report.slots, "0,8000,16383",
        "only the lost slots are rebuilt"
    );
    assert!(
        wait_until(|| ready(200)).await,
        "ready again after the rebuild"
    );
    assert!(producer.terminate(), "producer exits cleanly");
    env.cleanup().await;
}

/// The port of the master that serves hash slot `s` now.
async fn master_of_slot(store: &RedisStore, s: u16) -> u16 {
    slot_ranges(store)
        .await
        .into_iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&s))
        .map(|(.., port)| port)
        .unwrap_or_else(|| panic!("slot {s} has no master"))
}

/// Every slot range of the cluster with its master's port (`CLUSTER SLOTS`).
async fn slot_ranges(store: &RedisStore) -> Vec<(u16, u16, u16)> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut store.connection())
        .await
        .expect("cluster slots");
    ranges
        .into_iter()
        .map(|r| {
            let parts: Vec<redis::Value> = redis::from_redis_value(r).expect("range");
            let lo: u16 = redis::from_redis_value(parts[0].clone()).expect("start");
            let hi: u16 = redis::from_redis_value(parts[1].clone()).expect("end");
            let node: Vec<redis::Value> = redis::from_redis_value(parts[2].clone()).expect("node");
            let port: u16 = redis::from_redis_value(node[1].clone()).expect("port");
            (lo, hi, port)
        })
        .collect()
}

/// The slots master `port` serves.
async fn slots_of(store: &RedisStore, port: u16) -> std::collections::BTreeSet<u16> {
    slot_ranges(store)
        .await
        .into_iter()
        .filter(|(.., p)| *p == port)
        .flat_map(|(lo, hi, _)| lo..=hi)
        .collect()
}

/// After a partial rebuild (`report`) of exactly the slots of master `port`: those slots
/// were loaded in its generation; every other slot keeps the generation it was loaded in
/// (at most `before`) and names new pre-deductions in the new one.
async fn assert_rebuilt_alone(
    env: &TestEnv,
    port: u16,
    before: i64,
    report: &stockctl::rebuild::RebuildReport,
) {
    let lost = slots_of(&env.store, port).await;
    assert_eq!(
        report.slots,
        stock_common::redis_store::slots::format_ranges(&lost),
        "the emptied master's slots alone are rebuilt"
    );
    for (s, m) in env.store.slot_markers().await.expect("markers") {
        let m = m.unwrap_or_else(|| panic!("slot {s} not loaded after the rebuild"));
        assert_eq!(
            m.named, report.generation,
            "slot {s} names in the new generation"
        );
        if lost.contains(&s) {
            assert_eq!(
                m.loaded, report.generation,
                "slot {s} of the emptied master"
            );
        } else {
            assert!(
                m.loaded <= before,
                "slot {s} of a healthy master was loaded again: {m:?}"
            );
        }
    }
}

/// A master restarted empty (its slots lost their data and their loaded markers) while
/// orders flow: an order touching those slots (its product's stock, or its record's
/// bucket) waits, with the later events of the same order, and every other order is
/// decided meanwhile. `stockctl rebuild --lost` loads those slots alone (the other
/// masters' slots keep the generation they were loaded in, and only name new
/// pre-deductions in the new one), and the waiting orders are decided: the ones claimed
/// before the loss with holds on the healthy masters are claimed again, and the holds that
/// orders whose record was lost left elsewhere are given back. Every order has one
/// outcome, and Redis equals PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_emptied_stops_only_the_orders_that_touch_it() {
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let (products, collector, [producer, consumer], kafka) = start_both(&env, 1_000).await;
    let [a, b, _] = products;
    let single = |prefix: &str, n: usize| -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                let item = Item {
                    product_id: products[i % 3],
                    quantity: 1,
                };
                (id.clone(), created(&id, &[item]))
            })
            .collect()
    };
    let before = single("e0", 150);
    let before_ids: HashSet<String> = before.iter().map(|(id, _)| id.clone()).collect();
    harness::publish(&kafka, &env.topics.orders, before)
        .await
        .expect("publish");
    assert!(
        collector
            .wait_for(&before_ids, 1, Duration::from_secs(60))
            .await,
        "orders answered before the fault"
    );

    let victim = master_of(&env.store, b).await;
    fault(&["restart-redis-empty", &victim.to_string()]).await;
    let during = single("e1", 300);
    // Which orders touch the emptied master: their product's stock or their record.
    let mut touching = HashSet::new();
    // Orders whose record is on the emptied master: each gets a second `order_created`
    // with other items (product a) right after the rebuild, when the first still waits.
    let mut resent = Vec::new();
    for (i, (id, _)) in during.iter().enumerate() {
        let record = slot(&env.store.record_base(id));
        let record_here = master_of_slot(&env.store, record).await == victim;
        let stock = slot(&stock_key(products[i % 3]));
        let stock_here = master_of_slot(&env.store, stock).await == victim;
        if record_here || stock_here {
            touching.insert(id.clone());
        }
        if record_here && products[i % 3] != a && resent.len() < 20 {
            resent.push((id.clone(), products[i % 3]));
        }
    }
    assert!(
        !resent.is_empty(),
        "orders with their record on the emptied master"
    );
    let others: HashSet<String> = during
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| !touching.contains(id))
        .collect();
    assert!(!touching.is_empty() && !others.is_empty(), "both kinds");
    // A cancel for every waiting order: it must wait behind its order.
    let cancels: Vec<(String, Vec<u8>)> = touching
        .iter()
        .map(|id| (id.clone(), cancelled(id)))
        .collect();
    harness::publish(&kafka, &env.topics.orders, during.clone())
        .await
        .expect("publish");
    harness::publish(&kafka, &env.topics.orders, cancels)
        .await
        .expect("publish");
    only_the_touching_wait(&collector, &others, &touching, "the emptied master").await;

    let before_gen = stock_common::pg_store::generation(&env.pool)
        .await
        .expect("generation")
        .gen;
    let report = rebuild_slots(&env.pool, &env.store, Slots::Lost)
        .await
        .expect("rebuild");
    assert_rebuilt_alone(&env, victim, before_gen, &report).await;
    let other_items: Vec<(String, Vec<u8>)> = resent
        .iter()
        .map(|(id, _)| {
            let item = Item {
                product_id: a,
                quantity: 2,
            };
            (id.clone(), created(id, &[item]))
        })
        .collect();
    harness::publish(&kafka, &env.topics.orders, other_items)
        .await
        .expect("publish");
    let all: HashSet<String> = before_ids
        .iter()
        .cloned()
        .chain(during.iter().map(|(id, _)| id.clone()))
        .collect();
    assert!(
        collector.wait_for(&all, 1, Duration::from_secs(90)).await,
        "every order decided after the rebuild"
    );
    // Each waiting order's cancel came after its order: reserved, then released.
    let released = wait_until(|| async {
        let o = collector.snapshot();
        touching.iter().all(|id| {
            o[id].iter().all(|r| r.status != Status::Reserved)
                || o[id].iter().any(|r| r.status == Status::Released)
        })
    });
    assert!(
        released.await,
        "every waiting order's cancel applied after it"
    );
    // The first event's items decide an order, also when a later one (same id, other
    // items) came while it waited.
    for (id, first) in &resent {
        let items: String =
            sqlx::query_scalar("SELECT items::text FROM order_ledger WHERE order_id = $1")
                .bind(id)
                .fetch_one(&env.pool)
                .await
                .expect("ledger row");
        let items: Vec<Item> = serde_json::from_str(&items).expect("items");
        assert!(
            items.iter().all(|it| it.product_id == *first),
            "{id}: the ledger holds {items:?}, not the first event's product {first}"
        );
    }
    idle_and_consistent(env, &all, &products, collector, [producer, consumer]).await;
}

/// Pre-deductions decided before a master restarted empty and not yet applied by
/// PostgreSQL (the consumer is down): `stockctl rebuild --lost` loads that master's slots
/// alone, from a PostgreSQL that does not hold them. The consumer then finds each such
/// order taken before some of its slots were loaded, and has it decided again: an order
/// across slots that still holds stock on the healthy masters names its old token, whose
/// holds there go back before its record is claimed again; the holds of an order whose
/// record was on the emptied master were given back by the rebuild itself — but not those
/// of orders PostgreSQL holds: paid orders (sold, found by the cluster nemesis) and
/// reserved ones (their record is loaded again). The producer is killed once in the
/// window between giving an old token's holds back and claiming again
/// (`producer.xslot.after_stale_release`) and restarted. Every order ends with one
/// outcome, and Redis equals PostgreSQL: nothing held twice, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_deductions_cut_by_a_partial_rebuild_are_decided_again() {
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let products = three_masters();
    let [a, b, c] = products;
    env.load_stock(&[(a, 1_000), (b, 1_000), (c, 1_000)]).await;
    let collector = env.collector();
    let producer = WorkerProcess::spawn(&env.process_flags("producer"), &[("FAILPOINTS", "")]);
    let kafka = stock_common::kafka::producer(&env.kafka).expect("producer");
    // First, with the consumer up: orders reserved, and a third of them paid (their holds
    // on the healthy masters are PostgreSQL's: sold, or still reserved).
    let settled = wave(products, "held", 90);
    let settled_ids: HashSet<String> = settled.iter().map(|(id, _)| id.clone()).collect();
    let consumer = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    harness::publish(&kafka, &env.topics.orders, settled)
        .await
        .expect("publish");
    assert!(
        collector
            .wait_for(&settled_ids, 1, Duration::from_secs(60))
            .await,
        "the first orders are answered"
    );
    let pays: Vec<(String, Vec<u8>)> = settled_ids
        .iter()
        .filter(|id| id.ends_with('0') || id.ends_with('2') || id.ends_with('4'))
        .map(|id| (id.clone(), harness::paid(id)))
        .collect();
    let paid_ids: HashSet<String> = pays.iter().map(|(id, _)| id.clone()).collect();
    harness::publish(&kafka, &env.topics.orders, pays)
        .await
        .expect("publish");
    assert!(
        collector
            .wait_for(&paid_ids, 2, Duration::from_secs(60))
            .await,
        "the pays are answered"
    );
    assert!(
        env.wait_idle("producer", "consumer").await,
        "pipeline goes idle"
    );
    assert!(consumer.terminate(), "consumer stops");
    // Orders of the three products, and orders of one (their records on every master).
    let mut msgs = load(products, 100, 0);
    for i in 0..150 {
        let id = format!("one-{i}");
        let item = Item {
            product_id: products[i % 3],
            quantity: 1,
        };
        msgs.push((id.clone(), created(&id, &[item])));
    }
    let ids: HashSet<String> = msgs.iter().map(|(id, _)| id.clone()).collect();
    harness::publish(&kafka, &env.topics.orders, msgs)
        .await
        .expect("publish");
    // Every order decided in Redis and its deduct published: the producer's offsets are
    // at the end of the orders topic.
    let group = format!("t-{}-producer", env.id);
    let published = wait_until(|| async {
        stock_e2e::committed_total(&env.kafka, &group, &env.topics.orders)
            >= stock_e2e::end_offsets_total(&env.kafka, &env.topics.orders)
    });
    assert!(
        published.await,
        "the producer decided and published every order"
    );
    let victim = master_of(&env.store, b).await;
    fault(&["restart-redis-empty", &victim.to_string()]).await;
    let before = stock_common::pg_store::generation(&env.pool)
        .await
        .expect("generation")
        .gen;
    let report = rebuild_slots(&env.pool, &env.store, Slots::Lost)
        .await
        .expect("rebuild");
    assert_rebuilt_alone(&env, victim, before, &report).await;
    assert!(
        report.orphans > 0,
        "the holds of orders whose record was on the emptied master were given back"
    );
    // The producer dies once at the stale release's window: holds given back (`S`), the
    // claim not yet replaced; restarted, it finishes.
    assert!(producer.terminate(), "producer stops");
    let point = "producer.xslot.after_stale_release";
    let mut producer = WorkerProcess::spawn(
        &env.process_flags("producer"),
        &[("FAILPOINTS", &format!("{point}=1*return"))],
    );
    let consumer = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    assert!(
        producer.wait_exit(Duration::from_secs(60)).is_some(),
        "the producer reaches {point}"
    );
    assert!(
        producer
            .log_text()
            .contains(&format!("failpoint {point}: crash")),
        "died at {point}: {}",
        producer.log.display()
    );
    producer = WorkerProcess::spawn(&env.process_flags("producer"), &[("FAILPOINTS", "")]);
    assert!(
        collector.wait_for(&ids, 1, Duration::from_secs(120)).await,
        "every order gets an outcome"
    );
    let ids: HashSet<String> = ids.union(&settled_ids).cloned().collect();
    let outcomes = collector.snapshot();
    let refused: Vec<&String> = ids
        .iter()
        .filter(|id| {
            !created_outcomes(&outcomes[*id])
                .iter()
                .all(|r| r.status == Status::Reserved)
        })
        .collect();
    assert!(refused.is_empty(), "stock suffices for all: {refused:?}");
    assert!(
        env.wait_idle("producer", "consumer").await,
        "pipeline goes idle"
    );
    let drift = admin::check_drift(&env.pool, &env.store, false)
        .await
        .expect("drift check");
    assert!(drift.drift.is_empty(), "drift: {:?}", drift.drift);
    check_idle(&env, &ids, &products, &outcomes).await;
    // An order touching the emptied master (every order of the three products; one of b;
    // one whose record lived there) was decided again, in the new generation; any other
    // kept its first pre-deduction.
    let lost = slots_of(&env.store, victim).await;
    let tokens: Vec<(String, String)> = sqlx::query_as("SELECT order_id, token FROM order_ledger")
        .fetch_all(&env.pool)
        .await
        .expect("tokens");
    let mut again = 0;
    for (id, token) in tokens.iter().filter(|(id, _)| !id.starts_with("held-")) {
        let touched = id.starts_with("x-")
            || id
                .strip_prefix("one-")
                .and_then(|n| n.parse::<usize>().ok())
                .map(|n| products[n % 3])
                == Some(b)
            || lost.contains(&stock_common::redis_store::slots::of_record(id));
        let gen = stock_common::events::Token::parse(token)
            .expect("token")
            .gen;
        if touched {
            again += 1;
            assert_eq!(
                gen, report.generation,
                "{id} touched the emptied master: decided again"
            );
        } else {
            assert!(
                gen < report.generation,
                "{id} was held by healthy masters alone: kept"
            );
        }
    }
    assert!(
        again > 100 && again < tokens.len() - settled_ids.len(),
        "both kinds: {again} of {}",
        tokens.len()
    );
    assert!(producer.terminate(), "producer exits cleanly");
    assert!(consumer.terminate(), "consumer exits cleanly");
    collector.stop().await;
    env.cleanup().await;
}

/// Orders of one to three of `products` (rotating), ids `<prefix>-<i>`.
fn wave(products: [i64; 3], prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let items: Vec<Item> = (0..=(i % 3))
                .map(|k| Item {
                    product_id: products[(i + k) % 3],
                    quantity: 1,
                })
                .collect();
            (id.clone(), created(&id, &items))
        })
        .collect()
}

/// The crash windows of `stockctl rebuild --lost`: killed (an abort, like `kill -9`) after
/// stopping the lost slots, after the fence, and after naming the other slots in the new
/// generation, in turn, while orders flow; then run whole. After each crash the lost slots
/// are still stopped and every other slot is loaded (they keep selling); the run after it
/// fences again and finishes. Once idle: every order has one outcome, Redis equals
/// PostgreSQL, and no hold is left for an order that is not reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_rebuild_killed_at_each_step_is_run_again() {
    use std::os::unix::process::ExitStatusExt;
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let (products, collector, [producer, consumer], kafka) = start_both(&env, 2_000).await;
    let [_, b, _] = products;
    let mut ids: HashSet<String> = HashSet::new();
    let mut send = |msgs: Vec<(String, Vec<u8>)>| {
        ids.extend(msgs.iter().map(|(id, _)| id.clone()));
        let (kafka, topic) = (kafka.clone(), env.topics.orders.clone());
        async move {
            harness::publish(&kafka, &topic, msgs)
                .await
                .expect("publish")
        }
    };
    send(wave(products, "w0", 120)).await;
    let victim = master_of(&env.store, b).await;
    let lost = slots_of(&env.store, victim).await;
    fault(&["restart-redis-empty", &victim.to_string()]).await;
    for (n, point) in [
        "rebuild.after_stop",
        "rebuild.after_fence",
        "rebuild.after_naming",
    ]
    .into_iter()
    .enumerate()
    {
        send(wave(products, &format!("w{}", n + 1), 60)).await;
        let (status, text) = env
            .stockctl(&["rebuild", "--lost"], &format!("{point}=1*return"))
            .await;
        assert_eq!(
            status.signal(),
            Some(6),
            "stockctl aborted at {point}, exit status {status:?}: {text}"
        );
        assert!(
            text.contains(&format!("failpoint {point}: crash")),
            "stockctl names the failpoint: {text}"
        );
        let markers = loop {
            match env.store.slot_markers().await {
                Ok(m) => break m,
                Err(e) => {
                    tracing::warn!(error = %e, "markers not readable yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        for (s, m) in markers {
            assert_eq!(
                m.is_none(),
                lost.contains(&s),
                "after a crash at {point}, slot {s}: only the lost slots are stopped ({m:?})"
            );
        }
    }
    let (status, text) = env.stockctl(&["rebuild", "--lost"], "").await;
    assert!(
        status.success(),
        "stockctl rebuild --lost: {status:?}: {text}"
    );
    assert!(text.contains("rebuilt"), "{text}");
    send(wave(products, "w4", 60)).await;
    assert!(
        collector.wait_for(&ids, 1, Duration::from_secs(120)).await,
        "every order gets an outcome"
    );
    idle_and_consistent(env, &ids, &products, collector, [producer, consumer]).await;
}

/// The ports of the replicas of the master on `port` (`CLUSTER NODES`).
async fn replicas_of(store: &RedisStore, port: u16) -> Vec<u16> {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut store.connection())
        .await
        .expect("cluster nodes");
    let port_of =
        |addr: &str| -> Option<u16> { addr.split('@').next()?.rsplit_once(':')?.1.parse().ok() };
    let lines: Vec<Vec<&str>> = nodes
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let id = lines
        .iter()
        .find(|f| f.len() > 3 && port_of(f[1]) == Some(port))
        .map(|f| f[0])
        .expect("the master's id");
    lines
        .iter()
        .filter(|f| f.len() > 3 && f[3] == id)
        .filter_map(|f| port_of(f[1]))
        .collect()
}

/// A shard down — its master and its replica killed, so no failover happens — while
/// orders flow: the producer finds which master does not answer, leaves the orders that
/// touch its slots (their stock's, or their record's) waiting with their later events,
/// and decides every other order meanwhile. Once the shard is back (with its data), the
/// waiting orders are decided: every order has one outcome, and Redis equals PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_down_stops_only_the_orders_that_touch_it() {
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let (products, collector, [producer, consumer], kafka) = start_both(&env, 2_000).await;
    let [_, b, _] = products;
    let first = wave(products, "d0", 60);
    let first_ids: HashSet<String> = first.iter().map(|(id, _)| id.clone()).collect();
    harness::publish(&kafka, &env.topics.orders, first)
        .await
        .expect("publish");
    assert!(
        collector
            .wait_for(&first_ids, 1, Duration::from_secs(60))
            .await,
        "orders answered before the fault"
    );
    let victim = master_of(&env.store, b).await;
    let lost = slots_of(&env.store, victim).await;
    let replicas = replicas_of(&env.store, victim).await;
    assert!(!replicas.is_empty(), "the master has a replica to kill too");
    fault(&["kill-redis-shard", &victim.to_string()]).await;
    let during = wave(products, "d1", 240);
    let touches = |id: &str, i: usize| {
        let items: Vec<i64> = (0..=(i % 3)).map(|k| products[(i + k) % 3]).collect();
        lost.contains(&stock_common::redis_store::slots::of_record(id))
            || items.iter().any(|p| lost.contains(&slot(&stock_key(*p))))
    };
    let (mut touching, mut others) = (HashSet::new(), HashSet::new());
    for (i, (id, _)) in during.iter().enumerate() {
        if touches(id, i) {
            touching.insert(id.clone());
        } else {
            others.insert(id.clone());
        }
    }
    assert!(!touching.is_empty() && !others.is_empty(), "both kinds");
    harness::publish(&kafka, &env.topics.orders, during.clone())
        .await
        .expect("publish");
    only_the_touching_wait(&collector, &others, &touching, "the dead shard").await;
    fault(&["start-redis", &victim.to_string()]).await;
    for r in &replicas {
        fault(&["start-redis", &r.to_string()]).await;
    }
    let all: HashSet<String> = first_ids
        .iter()
        .cloned()
        .chain(during.iter().map(|(id, _)| id.clone()))
        .collect();
    assert!(
        collector.wait_for(&all, 1, Duration::from_secs(120)).await,
        "every order decided once the shard is back"
    );
    idle_and_consistent(env, &all, &products, collector, [producer, consumer]).await;
}

/// Per-customer limits on the cluster (issue 13): a customer's count lives in the limited
/// product's slot, and orders across slots hold and count it there (`hold.lua`), give it
/// back on refusal and cancel (`release.lua`). 60 customers send 4 orders each, half of
/// them across three masters, for a product limited to 2: each customer ends with at most
/// 2 units in the results, and both stores count exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_across_slots() {
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let [a, b, c] = three_masters();
    env.load_stock(&[(a, 1000), (b, 1000), (c, 1000)]).await;
    stockctl::limits::set_limit(&env.pool, &env.store, c, Some(2), "limit-c")
        .await
        .expect("limit");
    let collector = env.collector();
    let producer = WorkerProcess::spawn(&env.process_flags("producer"), &[]);
    let consumer = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    let mut msgs = Vec::new();
    let mut customer_of = HashMap::new();
    let item = |product_id, quantity| Item {
        product_id,
        quantity,
    };
    for n in 0..4 {
        for k in 0..60 {
            let (id, customer) = (format!("o-{k}-{n}"), format!("c-{k}"));
            let items = if n % 2 == 0 {
                vec![item(c, 1)]
            } else {
                vec![item(a, 1), item(b, 1), item(c, 1)]
            };
            msgs.push((id.clone(), harness::created_by(&id, &customer, &items)));
            customer_of.insert(id, customer);
        }
    }
    // Without a customer, an order for the limited product is invalid, across slots too.
    let items = [item(a, 1), item(c, 1)];
    msgs.push(("anonymous".into(), created("anonymous", &items)));
    let ids: HashSet<String> = msgs.iter().map(|(id, _)| id.clone()).collect();
    env.send_orders(msgs).await;
    assert!(collector.wait_for(&ids, 1, Duration::from_secs(120)).await);
    // Every customer cancels its first reserved order: the units come back.
    let snap = collector.snapshot();
    let mut cancels = Vec::new();
    for k in 0..60 {
        let first = (0..4)
            .map(|n| format!("o-{k}-{n}"))
            .find(|id| snap[id].iter().any(|r| r.status == Status::Reserved));
        if let Some(id) = first {
            cancels.push((id.clone(), cancelled(&id)));
        }
    }
    let cancelled_ids: HashSet<String> = cancels.iter().map(|(id, _)| id.clone()).collect();
    env.send_orders(cancels).await;
    assert!(
        collector
            .wait_for(&cancelled_ids, 2, Duration::from_secs(120))
            .await
    );
    assert!(env.wait_idle("producer", "consumer").await);
    let o = collector.snapshot();
    assert_eq!(
        o["anonymous"][0],
        stock_common::events::StockResult::rejected(
            "anonymous",
            stock_common::events::Reason::InvalidOrder,
            None
        )
    );
    let mut held: std::collections::BTreeMap<String, i64> = Default::default();
    for (id, customer) in &customer_of {
        let rs = &o[id];
        assert_eq!(created_outcomes(rs).len(), 1, "{id}: {rs:?}");
        let r = &rs[0];
        assert!(
            r.status == Status::Reserved
                || r.reason == Some(stock_common::events::Reason::LimitExceeded)
                    && r.product_id == Some(c),
            "{r:?}"
        );
        if rs.last().is_some_and(|r| r.status == Status::Reserved) {
            *held.entry(customer.clone()).or_default() += 1;
        }
    }
    assert!(held.values().all(|&n| n <= 2), "nobody above the limit");
    let pg: std::collections::BTreeMap<String, i64> =
        stock_common::pg_store::top_customers(&env.pool, c, i64::MAX)
            .await
            .expect("units")
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
    let redis: std::collections::BTreeMap<String, i64> = env
        .store
        .buyers(c)
        .await
        .expect("buyers")
        .map(|b| b.units.into_iter().collect())
        .unwrap_or_default();
    assert_eq!(pg, held, "PostgreSQL counts what the results say");
    assert_eq!(redis, held, "Redis counts what the results say");
    let report = admin::check_drift(&env.pool, &env.store, false)
        .await
        .expect("check");
    assert!(report.clean() && report.limits.is_empty(), "{report:?}");
    env.assert_invariants(&[a, b, c]).await;
    assert!(producer.terminate(), "producer exits cleanly");
    assert!(consumer.terminate(), "consumer exits cleanly");
    collector.stop().await;
    env.cleanup().await;
}

/// `stockctl check` reads the settings of every node of the cluster, masters and replicas
/// (a replica is promoted with its own): the layout's pass on all six, and one replica set
/// to `appendfsync everysec` is named by its address, as a note, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_reads_every_node_of_the_cluster() {
    let _turn = CLUSTER_LOCK.lock().await;
    let env = cluster_env().await;
    let risks = env.store.persistence_risks().await.expect("risks");
    assert!(risks.is_empty(), "the layout's settings: {risks:?}");

    // A replica: the fourth entry of a CLUSTER SLOTS range.
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut env.store.connection())
        .await
        .expect("cluster slots");
    let (host, port) = node_at(&ranges[0], 3).expect("the layout gives each master a replica");
    let client = redis::Client::open(format!("redis://{host}:{port}")).expect("client");
    let mut node = stock_common::redis_store::raw_connection(&client)
        .await
        .expect("the replica");
    let set = |value: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("appendfsync").arg(value);
        cmd
    };
    let _: () = set("everysec")
        .query_async(&mut node)
        .await
        .expect("CONFIG SET");
    let risks = env.store.persistence_risks().await;
    let _: () = set("always")
        .query_async(&mut node)
        .await
        .expect("CONFIG SET back");
    let risks = risks.expect("risks");
    assert_eq!(risks.len(), 1, "{risks:?}");
    match &risks[0] {
        stock_common::redis_store::Risk::Note(what) => assert!(
            what.starts_with(&format!("{host}:{port}: appendfsync is everysec")),
            "{what}"
        ),
        other => panic!("a note naming the replica: {other:?}"),
    }
    let report = admin::check_drift(&env.pool, &env.store, false)
        .await
        .expect("check");
    assert!(
        report.redis_risks.is_empty(),
        "the check reads the nodes: {:?}",
        report.redis_risks
    );
    env.cleanup().await;
}
