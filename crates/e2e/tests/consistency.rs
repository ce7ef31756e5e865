//! The consistency holes of issue 9, each reproduced against the real stack: a replay after
//! the order memory expired, a rebuild racing a producer's decision in flight, an operator's
//! change overlapping a rebuild, a repair racing a give-back, a database that refuses a
//! batch, corrupt stock keys, and Redis' integer arithmetic.

use rdkafka::message::OwnedMessage;
use rdkafka::Timestamp;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use stock_common::events::{Item, Reason, Status, StockResult};
use stock_common::kafka::{self, OutMessage};
use stock_common::redis_store::{stock_key, Guards, OrderRecord, ReserveOutcome, ReserveRequest};
use stock_e2e::harness::{conflicting, created};
use stock_e2e::{
    free_port, held_token, http_get, read_topic, reserve_request, reset_group_to_earliest,
    wait_until, TestEnv,
};
use stockctl::admin::{self, AdminError};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

fn item(product_id: i64, quantity: i64) -> Item {
    Item {
        product_id,
        quantity,
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// An `orders` message as the producer's consumer would hand it over.
fn orders_message(env: &TestEnv, offset: i64, id: &str, items: &[Item]) -> OwnedMessage {
    OwnedMessage::new(
        Some(created(id, items)),
        Some(id.as_bytes().to_vec()),
        env.topics.orders.clone(),
        Timestamp::NotAvailable,
        0,
        offset,
        None,
    )
}

async fn set_raw(env: &TestEnv, product: i64, value: &str) {
    let _: () = redis::cmd("SET")
        .arg(stock_key(product))
        .arg(value)
        .query_async(&mut env.store.connection())
        .await
        .expect("set");
}

/// Hole 1: 50 orders reserved and 5 refused, the producer's memory of them expires, the
/// producer group is reset to the earliest offset and the stock of the refused product
/// comes back. The replay must deduct nothing and change no outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_order_memory_expired_changes_nothing() {
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100), (2, 0)]).await;
    let pargs = env.producer_args_with("producer", &[("--order-memory", "2s")]);
    let cargs = env.consumer_args("consumer");
    let collector = env.collector();

    let held = ids("held", 50);
    let refused = ids("refused", 5);
    let mut msgs: Vec<_> = held
        .iter()
        .map(|id| (id.clone(), created(id, &[item(1, 1)])))
        .collect();
    msgs.extend(
        refused
            .iter()
            .map(|id| (id.clone(), created(id, &[item(2, 1)]))),
    );
    let all: HashSet<String> = held.iter().chain(&refused).cloned().collect();
    let workers = stock_e2e::Workers::start_with(&pargs, &cargs).await;
    env.send_orders(msgs).await;
    assert!(collector.wait_for(&all, 1, WAIT).await);
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    // The memory of every order is gone (a deadline, not a sleep).
    assert!(
        wait_until(|| async {
            let mut gone = true;
            for id in &all {
                gone &= env.store.order_record(id).await.expect("record").is_none();
            }
            gone
        })
        .await
    );
    admin::restock(&env.pool, &env.store, 2, 10, "back-in-stock")
        .await
        .expect("restock");
    let group = format!("t-{}-producer", env.id);
    reset_group_to_earliest(
        &env.kafka,
        &group,
        &[&env.topics.orders, &env.topics.compensate],
        env.partitions,
    );
    let workers = stock_e2e::Workers::start_with(&pargs, &cargs).await;
    assert!(
        collector.wait_for(&all, 2, WAIT).await,
        "the replay repeats every outcome"
    );
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let outcomes = collector.snapshot();
    assert!(
        conflicting(&outcomes).is_empty(),
        "{:?}",
        conflicting(&outcomes)
    );
    for id in &held {
        assert_eq!(outcomes[id][0], StockResult::reserved(id));
    }
    for id in &refused {
        assert_eq!(
            outcomes[id][0],
            StockResult::rejected(id, Reason::InsufficientStock, Some(2))
        );
    }
    let row = env.stock_row(1).await;
    assert_eq!((row.available, row.reserved), (50, 50));
    assert_eq!(env.redis_stock(1).await, Some(50), "nothing deducted twice");
    let row = env.stock_row(2).await;
    assert_eq!((row.available, row.reserved), (10, 0));
    assert_eq!(env.redis_stock(2).await, Some(10));
    env.assert_invariants(&[1, 2]).await;
    collector.stop().await;
    env.cleanup().await;
}

/// Hole 2: a producer pauses exactly between its scripts and its deliveries, a rebuild
/// runs meanwhile, then its deducts and refusal land. Every order keeps one outcome and
/// Redis ends equal to PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_fences_out_decisions_taken_before_it() {
    let env = TestEnv::new().await;
    env.load_stock(&[(5, 10), (6, 0)]).await;
    let pargs = env.producer_args("producer");
    let cargs = env.consumer_args("consumer");

    // The paused producer: its scripts ran (Redis 10 -> 7, one refusal recorded) ...
    let paused = stock_producer::worker::Worker::new(&pargs)
        .await
        .expect("producer");
    let msgs = vec![
        orders_message(&env, 0, "late-1", &[item(5, 1)]),
        orders_message(&env, 1, "late-2", &[item(5, 2)]),
        orders_message(&env, 2, "late-x", &[item(6, 1)]),
    ];
    let (_, out): (_, Vec<OutMessage>) = paused.prepare(&msgs).await.expect("prepare");
    // Its Kafka consumer leaves the group (an idle member would stall the group's join).
    drop(paused);
    assert_eq!(env.redis_stock(5).await, Some(7));

    // ... a rebuild loads Redis from PostgreSQL, which has none of them, and stock of the
    // refused order's product comes back ...
    stockctl::rebuild::rebuild(&env.pool, &env.store)
        .await
        .expect("rebuild");
    assert_eq!(env.redis_stock(5).await, Some(10));
    admin::restock(&env.pool, &env.store, 6, 5, "r6")
        .await
        .expect("restock");

    // ... then its deliveries land, and the refused order is sent once more.
    let kp = kafka::producer(&env.kafka).expect("producer");
    kafka::publish_all(
        &kp,
        &out,
        &kafka::StallWatch::off(),
        &CancellationToken::new(),
    )
    .await
    .expect("publish");
    let collector = env.collector();
    let workers = stock_e2e::Workers::start_with(&pargs, &cargs).await;
    env.send_orders(vec![("late-x".into(), created("late-x", &[item(6, 1)]))])
        .await;
    let all: HashSet<String> = ["late-1", "late-2", "late-x"].map(String::from).into();
    assert!(collector.wait_for(&all, 1, WAIT).await);
    assert!(
        collector
            .wait_for(&["late-x".to_owned()].into(), 2, WAIT)
            .await
    );
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;

    let outcomes = collector.snapshot();
    assert!(
        conflicting(&outcomes).is_empty(),
        "{:?}",
        conflicting(&outcomes)
    );
    assert_eq!(outcomes["late-1"][0], StockResult::reserved("late-1"));
    assert_eq!(outcomes["late-2"][0], StockResult::reserved("late-2"));
    assert_eq!(outcomes["late-x"][0].status, Status::Rejected);
    let row = env.stock_row(5).await;
    assert_eq!((row.available, row.reserved), (7, 3));
    assert_eq!(env.redis_stock(5).await, Some(7), "Redis equals available");
    assert_eq!(env.redis_stock(6).await, Some(5));
    env.assert_invariants(&[5, 6]).await;
    collector.stop().await;
    env.cleanup().await;
}

/// Hole 3: a restock commits in PostgreSQL after a rebuild took its snapshot and before
/// Redis is loaded. Redis must still get it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restock_overlapping_a_rebuild_reaches_redis() {
    let env = TestEnv::new().await;
    env.load_stock(&[(8, 10)]).await;
    let started = Instant::now();
    env.store.stop_selling().await.expect("stop");
    let snap = stockctl::rebuild::fence_and_snapshot(&env.pool)
        .await
        .expect("snapshot");
    let (pool, store) = (env.pool.clone(), env.store.clone());
    let restock =
        tokio::spawn(async move { admin::restock(&pool, &store, 8, 5, "during-rebuild").await });
    assert!(wait_until(|| async { env.stock_row(8).await.available == 15 }).await);
    stockctl::rebuild::load(&env.pool, &env.store, &snap, started)
        .await
        .expect("load");
    let c = restock.await.expect("join").expect("restock");
    assert_eq!(
        (c.postgres, c.redis),
        (admin::Step::Applied, admin::Step::Applied)
    );
    assert_eq!(env.redis_stock(8).await, Some(15));
    env.assert_invariants(&[8]).await;
    env.cleanup().await;
}

/// Hole 4: an expiry's give-back is committed in PostgreSQL and not yet applied in Redis
/// (the producer is down) when `check --repair` runs. The give-back must not count twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_racing_a_give_back_counts_it_once() {
    let env = TestEnv::new().await;
    env.load_stock(&[(9, 10)]).await;
    let pargs = env.producer_args("producer");
    let cargs = env.consumer_args_with("consumer", &[("--reservation-ttl", "1s")]);
    let collector = env.collector();

    // The producer decides the order (Redis 10 -> 8) and stops before it ever runs its
    // loop: nothing will apply give-backs until it comes back.
    let producer = stock_producer::worker::Worker::new(&pargs)
        .await
        .expect("producer");
    let msgs = vec![orders_message(&env, 0, "exp", &[item(9, 2)])];
    let (_, out): (_, Vec<OutMessage>) = producer.prepare(&msgs).await.expect("prepare");
    drop(producer);
    let kp = kafka::producer(&env.kafka).expect("producer");
    kafka::publish_all(
        &kp,
        &out,
        &kafka::StallWatch::off(),
        &CancellationToken::new(),
    )
    .await
    .expect("publish");
    assert_eq!(env.redis_stock(9).await, Some(8));

    // Only the consumer runs: it reserves, the reservation expires, and its give-back
    // waits in the topic.
    let shutdown = CancellationToken::new();
    let consumer = stock_consumer::worker::Worker::new(&cargs)
        .await
        .expect("consumer");
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    let one: HashSet<String> = ["exp".to_owned()].into();
    assert!(
        collector.wait_for(&one, 2, WAIT).await,
        "reserved, then released/expired"
    );
    shutdown.cancel();
    task.await.expect("join").expect("consumer");
    assert_eq!(env.stock_row(9).await.available, 10);
    assert_eq!(env.redis_stock(9).await, Some(8));

    let r = admin::check_drift(&env.pool, &env.store, true)
        .await
        .expect("repair");
    assert_eq!(r.repaired.len(), 1);
    assert_eq!(env.redis_stock(9).await, Some(10));

    // The producer comes back and reads the give-back: Redis stays at 10.
    let workers = stock_e2e::Workers::start_with(&pargs, &cargs).await;
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;
    assert_eq!(env.redis_stock(9).await, Some(10), "given back once");
    env.assert_invariants(&[9]).await;
    collector.stop().await;
    env.cleanup().await;
}

/// Hole 5: PostgreSQL refuses every batch with an error the consumer does not classify.
/// The decided order is never dead-lettered: it waits, and gets its outcome once the
/// database accepts it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_database_never_drops_a_decided_order() {
    let env = TestEnv::new().await;
    env.load_stock(&[(3, 10)]).await;
    sqlx::query(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
    )
    .execute(&env.pool)
    .await
    .expect("function");
    sqlx::query("CREATE TRIGGER refuse BEFORE INSERT ON order_ledger FOR EACH ROW EXECUTE FUNCTION refuse()")
        .execute(&env.pool)
        .await
        .expect("trigger");
    let collector = env.collector();
    let workers = env.start_workers().await;
    env.send_orders(vec![("kept".into(), created("kept", &[item(3, 4)]))])
        .await;
    // The deduct is out, the database refuses it: nothing reaches the dead-letter topic.
    assert!(!read_topic(&env.kafka, &env.topics.deduct, 1, WAIT)
        .await
        .is_empty());
    let dead = read_topic(&env.kafka, &env.topics.dlq, 1, Duration::from_secs(5)).await;
    assert!(dead.is_empty(), "a decided order was dead-lettered");
    assert!(collector.snapshot().is_empty());

    sqlx::query("DROP TRIGGER refuse ON order_ledger")
        .execute(&env.pool)
        .await
        .expect("drop trigger");
    let one: HashSet<String> = ["kept".to_owned()].into();
    assert!(collector.wait_for(&one, 1, WAIT).await);
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;
    assert_eq!(
        collector.snapshot()["kept"][0],
        StockResult::reserved("kept")
    );
    assert_eq!(env.stock_row(3).await.available, 6);
    env.assert_invariants(&[3]).await;
    collector.stop().await;
    env.cleanup().await;
}

/// Holes 6 and 9: a corrupt `stock:{p}` stops only its product; `/readyz` and the dead
/// letter name the key; `show` shows it, `set` refuses it clearly, `check --repair`
/// repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stock_key_stops_only_its_product_and_can_be_repaired() {
    let env = TestEnv::new().await;
    env.load_stock(&[(10, 5), (11, 5)]).await;
    set_raw(&env, 10, "abc").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let pargs = env.producer_args_with("producer", &[("--metrics-addr", &addr)]);
    let collector = env.collector();
    let workers = stock_e2e::Workers::start_with(&pargs, &env.consumer_args("consumer")).await;
    env.send_orders(vec![
        ("bad".into(), created("bad", &[item(10, 1)])),
        ("good".into(), created("good", &[item(11, 1)])),
    ])
    .await;
    let good: HashSet<String> = ["good".to_owned()].into();
    assert!(collector.wait_for(&good, 1, WAIT).await, "product 11 sells");
    let dead = read_topic(&env.kafka, &env.topics.dlq, 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    let reason = stock_e2e::header(&dead[0], "dlq.reason").unwrap_or_default();
    assert!(reason.contains("stock:{10}"), "{reason}");
    let (code, body) = http_get(port, "/readyz").await.expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("stock:{10}"), "{body}");

    let report = admin::show(&env.pool, &env.store, 10, 5)
        .await
        .expect("show works on a corrupt key");
    assert_eq!(report.redis_corrupt.as_deref(), Some("abc"));
    let res = admin::set_stock(&env.pool, &env.store, 10, 2, true).await;
    assert!(matches!(res, Err(AdminError::RedisCorrupt(10))), "{res:?}");
    let r = admin::check_drift(&env.pool, &env.store, true)
        .await
        .expect("repair");
    assert!(r.clean(), "{r:?}");
    assert_eq!(env.redis_stock(10).await, Some(5));
    assert!(
        wait_until(|| async { http_get(port, "/readyz").await.map(|r| r.0) == Some(200) }).await
    );
    assert!(env.wait_idle("producer", "consumer").await);
    workers.stop().await;
    env.assert_invariants(&[10, 11]).await;
    collector.stop().await;
    env.cleanup().await;
}

/// Hole 7: stock above 2^53 is taken exactly (Lua's numbers are doubles), and a request id
/// left half-done on one product cannot finish on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_stock_is_exact_and_a_request_id_keeps_its_product() {
    let env = TestEnv::new().await;
    let huge: i64 = (1 << 53) + 1;
    env.load_stock(&[(12, huge), (13, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);
    let row = admin::set_stock(pool, store, 12, 0, true)
        .await
        .expect("take all of 2^53 + 1");
    assert_eq!(row.available, 0);
    assert_eq!(env.redis_stock(12).await, Some(0));

    // A set of product 12 took from Redis and died before PostgreSQL ...
    admin::set_stock(pool, store, 12, 10, true)
        .await
        .expect("set");
    let taken = store.adjust(12, -4, "half", None).await.expect("take");
    assert_eq!(taken, stock_common::redis_store::AdjustOutcome::Applied);
    // ... its id retried on product 13 is refused, and product 13 is untouched.
    let res = admin::set_stock_with_request(pool, store, 13, 6, true, "half").await;
    assert!(
        matches!(res, Err(AdminError::RequestReused { .. })),
        "{res:?}"
    );
    assert_eq!(env.stock_row(13).await.available, 10);
    assert_eq!(env.redis_stock(13).await, Some(10));
    // The same id on its own product finishes the change.
    admin::set_stock_with_request(pool, store, 12, 6, true, "half")
        .await
        .expect("finish");
    assert_eq!(env.stock_row(12).await.available, 6);
    env.assert_invariants(&[12, 13]).await;
    env.cleanup().await;
}

/// One call takes each product's stock exactly, order after order: a hot product taken by
/// every order of the call, a product above 2^53 (where Lua's doubles are not exact:
/// reserve.lua keeps what it read as a double, and Redis' DECRBY computes the value), and
/// a product that runs short midway, which refuses the orders it cannot serve. A second
/// call finds every order decided and takes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_takes_each_products_stock_exactly() {
    let env = TestEnv::new().await;
    let huge: i64 = (1 << 53) + 3;
    env.load_stock(&[(21, 150), (22, huge), (23, 5)]).await;
    let store = &env.store;
    let mut reqs: Vec<ReserveRequest> = (0..100)
        .map(|i| reserve_request(&format!("hot-{i}"), 21, 1))
        .collect();
    for i in 0..3 {
        reqs.insert(10 * i + 5, reserve_request(&format!("huge-{i}"), 22, 2));
        reqs.insert(10 * i + 7, reserve_request(&format!("short-{i}"), 23, 2));
    }
    let reply = store
        .reserve_many(&reqs, &Guards::default())
        .await
        .expect("reserve");
    for (r, o) in reqs.iter().zip(&reply.outcomes) {
        if r.order_id == "short-2" {
            assert!(
                matches!(
                    o,
                    ReserveOutcome::Decided {
                        record: OrderRecord::Refused {
                            reason: Reason::InsufficientStock,
                            product_id: Some(23),
                            ..
                        },
                        fresh: true
                    }
                ),
                "{}: {o:?}",
                r.order_id
            );
        } else {
            assert!(held_token(o).1, "{} decided now", r.order_id);
        }
    }
    assert_eq!(env.redis_stock(21).await, Some(50));
    assert_eq!(env.redis_stock(22).await, Some(huge - 6));
    assert_eq!(env.redis_stock(23).await, Some(1));
    // Again: every order seen, nothing taken twice.
    let again = store
        .reserve_many(&reqs, &Guards::default())
        .await
        .expect("reserve again");
    assert!(again
        .outcomes
        .iter()
        .all(|o| matches!(o, ReserveOutcome::Decided { fresh: false, .. })));
    assert_eq!(env.redis_stock(21).await, Some(50));
    assert_eq!(env.redis_stock(22).await, Some(huge - 6));
    assert_eq!(env.redis_stock(23).await, Some(1));
    env.cleanup().await;
}

/// A batch spread over the producer's connections (`--redis-connections`, whose calls Redis
/// may run interleaved) is answered order by order in the batch's order, and decides each
/// order once: 3,000 orders in eight round trips on eight connections, even ones for a
/// product with stock, odd ones for a product without, and one order twice, in the first
/// and the last round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_several_connections_is_decided_once_in_its_order() {
    let env = TestEnv::new().await;
    env.load_stock(&[(31, 10_000), (32, 0)]).await;
    let args = stock_common::config::RedisArgs {
        connections: 8,
        ..env.redis.clone()
    };
    let store = stock_common::redis_store::RedisStore::connect_producer(&args)
        .await
        .expect("redis");
    let mut reqs: Vec<ReserveRequest> = (0..3000)
        .map(|i| reserve_request(&format!("lane-{i}"), 31 + i64::from(i % 2 == 1), 1))
        .collect();
    reqs[2990] = reqs[10].clone();
    let reply = store
        .reserve_many(&reqs, &Guards::default())
        .await
        .expect("reserve");
    assert_eq!(reply.outcomes.len(), reqs.len());
    let mut tokens = HashSet::new();
    for (i, o) in reply.outcomes.iter().enumerate() {
        match o {
            ReserveOutcome::Decided {
                record: OrderRecord::Held { token, .. },
                ..
            } => {
                assert_eq!(reqs[i].items[0].product_id, 31, "order {i} held: {o:?}");
                if i != 2990 {
                    assert!(tokens.insert(token.clone()), "token {token} given twice");
                }
            }
            ReserveOutcome::Decided {
                record:
                    OrderRecord::Refused {
                        reason: Reason::InsufficientStock,
                        product_id: Some(32),
                        ..
                    },
                fresh: true,
            } => assert_eq!(reqs[i].items[0].product_id, 32, "order {i} refused"),
            other => panic!("order {i}: {other:?}"),
        }
    }
    // The order sent twice: decided once, the other copy answered with that decision.
    let (a, b) = (
        held_token(&reply.outcomes[10]),
        held_token(&reply.outcomes[2990]),
    );
    assert_eq!(a.0, b.0, "one token for the order sent twice");
    assert!(a.1 != b.1, "exactly one copy decided it: {a:?} {b:?}");
    // 1,500 even orders, one of them the second copy of order 10.
    assert_eq!(tokens.len(), 1499);
    assert_eq!(env.redis_stock(31).await, Some(10_000 - 1499));
    assert_eq!(env.redis_stock(32).await, Some(0));
    env.cleanup().await;
}

/// The consumer decides a batch of decisions without reading the ledger first, and falls
/// back to reading it when the insert shows an order it already holds (issue 12): a
/// redelivered batch, a batch half old and half new, and a pre-deduction of a replaced
/// generation for an order the ledger holds each get the recorded outcome, change nothing
/// of what was applied, and never ask for the order to be decided again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_seen_before_are_answered_from_the_ledger() {
    use stock_common::events::{CompensationCause, DeductCommand, INTERNAL_VERSION};
    use stock_consumer::store::apply_batch;
    let env = TestEnv::new().await;
    env.load_stock(&[(71, 1000)]).await;
    let pool = &env.pool;
    let gen = stock_common::pg_store::generation(pool)
        .await
        .expect("generation")
        .gen;
    let reserve = |id: &str, token: String| DeductCommand::Reserve {
        v: INTERNAL_VERSION,
        order_id: id.to_owned(),
        items: vec![item(71, 2)],
        token: Some(token),
        customer: None,
    };
    let ttl = Duration::from_secs(900);
    let first: Vec<DeductCommand> = (0..100)
        .map(|i| reserve(&format!("s-{i}"), format!("{gen}.{i}")))
        .collect();
    let once = apply_batch(pool, &first, ttl).await.expect("first batch");
    assert_eq!(once.inserts.len(), 100);
    let row = env.stock_row(71).await;
    assert_eq!((row.available, row.reserved), (800, 200));

    // The same batch again: the recorded outcomes, nothing applied.
    let again = apply_batch(pool, &first, ttl).await.expect("redelivery");
    assert_eq!(again.results, once.results);
    assert!(again.inserts.is_empty() && again.compensations.is_empty());
    assert_eq!(env.stock_row(71).await, row);

    // Half old, half new: only the new half is applied.
    let mixed: Vec<DeductCommand> = (50..150)
        .map(|i| reserve(&format!("s-{i}"), format!("{gen}.{i}")))
        .collect();
    let plan = apply_batch(pool, &mixed, ttl).await.expect("mixed");
    assert_eq!(plan.inserts.len(), 50);
    assert_eq!(&plan.results[..50], &once.results[50..]);
    let row = env.stock_row(71).await;
    assert_eq!((row.available, row.reserved), (700, 300));

    // A pre-deduction of an older generation for an order the ledger holds: its recorded
    // outcome, not a request to decide it again.
    let stale = vec![reserve("s-7", format!("{}.999", gen - 1))];
    let plan = apply_batch(pool, &stale, ttl).await.expect("stale");
    assert_eq!(plan.results, vec![StockResult::reserved("s-7")]);
    assert!(
        !plan
            .compensations
            .iter()
            .any(|c| c.cause == CompensationCause::Redecide),
        "{:?}",
        plan.compensations
    );
    assert_eq!(env.stock_row(71).await, row);
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM order_ledger")
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(ledger, 150);
    env.assert_history_matches_ledger().await;
    env.cleanup().await;
}
