//! Every crash window of `docs/DESIGN.md`, crashed (or stalled) on purpose at its failpoint
//! (issue 9).
//!
//! Each worker test starts the worker under test as a process with
//! `FAILPOINTS=<name>=1*return` (abort at the first hit, like `kill -9` there), the other
//! worker as usual, and sends a small load with scarce stock (plus pays and cancels, or a
//! short reservation TTL for the sweeper's windows; for the compensation windows the
//! producer starts with only the sweeper's compensations waiting). Some cases shape the
//! load so that the crash must hit the window it names ([`Case`], [`AtCrash`]): a first
//! batch of three round trips, a batch of guarded sold-out refusals, compensations read
//! but not applied. Once the worker has died at the point, it is restarted without
//! failpoints; when every order has its outcomes and the pipeline is idle, the test checks:
//! * the process died by the failpoint's abort (SIGABRT, and its log names the point), or,
//!   for `<worker>.delivery_hang` (its delivery reports never come), exited on its own
//!   naming a stalled Kafka client (`--kafka-stall-timeout`);
//! * every `order_created` has exactly one distinct outcome, and every result that came
//!   more than once came with the same content;
//! * the results agree with the PostgreSQL ledger (reserved ⇔ in the ledger, confirmed or
//!   released as the ledger says), and every expired release is announced;
//! * stock is conserved and never negative, and Redis `stock:{p}` equals `available`.
//!
//! The rebuild's windows: `stockctl rebuild` dies at `rebuild.after_stop` or
//! `rebuild.after_fence` while both workers run; selling must stay stopped until a
//! rebuild run without failpoints finishes, then the same checks. The generation
//! protocol's window: a producer stalled (`sleep`) between its scripts and its deliveries
//! across a whole rebuild.
//!
//! The binaries must carry the failpoints: `cargo build --workspace --bins` builds
//! them so (stock-e2e enables `stock-common/failpoints`); `cargo build -p stock-producer`
//! does not.

use redis::AsyncCommands;
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;
use stock_common::events::{Compensation, CompensationCause, Item, Reason, Status, StockResult};
use stock_common::redis_store::{
    record_field, reserve_trip_size, stock_key, EPOCH_KEY, LOADED_KEY,
};
use stock_e2e::harness::{
    cancelled, conflicting, created, created_outcomes, paid, Outcomes, ResultCollector,
};
use stock_e2e::{end_offsets_total, read_topic, wait_until, TestEnv, WorkerProcess};

const ORDERS: usize = 200;
const PRODUCTS: i64 = 4;
const STOCK_EACH: i64 = 25;
/// How long the victim gets to reach its failpoint.
const CRASH_DEADLINE: Duration = Duration::from_secs(60);
/// Tests running at once (each runs two worker processes; the machine is small).
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
/// Reservation TTL of the sweeper tests (the sweeper runs every second).
const SHORT_TTL: &str = "2s";
/// Reservation TTL while the producer is to be stopped before the releases: time enough
/// for every order's outcome and a clean stop.
const STOP_TTL: &str = "8s";
/// How a failpoint's `return` ends a process.
const SIGABRT: i32 = 6;
/// What `stock:{1}` holds while the sold-out case checks that only the guard decides.
const UNREADABLE: &str = "unreadable";

/// What the load asks besides `order_created`.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// A quarter of the orders paid, a quarter cancelled; reservations never expire.
    PayAndCancel,
    /// A quarter of the orders paid; every other reservation expires after [`SHORT_TTL`].
    Expiry,
    /// Orders only; the producer is stopped once they are answered, every reservation
    /// expires (after [`STOP_TTL`]) meanwhile, and the victim producer starts with the
    /// sweeper's compensations waiting: its first batch runs restore.lua.
    Compensations,
}

impl Load {
    /// Whether every reservation not paid is released by the sweeper.
    fn expires(self) -> bool {
        matches!(self, Load::Expiry | Load::Compensations)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum FollowUp {
    None,
    Pay,
    Cancel,
}

struct Order {
    id: String,
    /// Its place in the load (`fp-<index>`).
    index: usize,
    /// The product of its first item (the one a sold-out refusal names).
    first_product: i64,
    follow_up: FollowUp,
}

/// The load: `n` orders on `PRODUCTS` products (every fifth on two), 1 or 2 units each,
/// against `STOCK_EACH` units per product: most are refused, in Redis.
fn orders(load: Load, n: usize) -> (Vec<Order>, Vec<(String, Vec<u8>)>) {
    let mut list = Vec::with_capacity(n);
    let mut msgs = Vec::with_capacity(n * 2);
    for i in 0..n {
        let id = format!("fp-{i}");
        let p = 1 + (i as i64 % PRODUCTS);
        let mut items = vec![Item {
            product_id: p,
            quantity: 1 + (i % 2) as i64,
        }];
        if i.is_multiple_of(5) {
            items.push(Item {
                product_id: 1 + (p % PRODUCTS),
                quantity: 1,
            });
        }
        msgs.push((id.clone(), created(&id, &items)));
        // Same key, same partition: the follow-up reaches the workers after the order.
        let follow_up = match (i % 4, load) {
            (_, Load::Compensations) => FollowUp::None,
            (1, _) => FollowUp::Pay,
            (3, Load::PayAndCancel) => FollowUp::Cancel,
            _ => FollowUp::None,
        };
        match follow_up {
            FollowUp::Pay => msgs.push((id.clone(), paid(&id))),
            FollowUp::Cancel => msgs.push((id.clone(), cancelled(&id))),
            FollowUp::None => {}
        }
        list.push(Order {
            id,
            index: i,
            first_product: p,
            follow_up,
        });
    }
    (list, msgs)
}

/// The worker process `name`, with `extra` flags; `FAILPOINTS` is always set (empty: none
/// armed), so that none leaks in from the test's own environment.
fn spawn(env: &TestEnv, name: &str, failpoints: &str, extra: &[(&str, &str)]) -> WorkerProcess {
    let flags = extra
        .iter()
        .fold(env.process_flags(name), |f, (k, v)| f.set(k, v));
    WorkerProcess::spawn(&flags, &[("FAILPOINTS", failpoints)])
}

fn released(r: &StockResult, reason: Reason) -> bool {
    r.status == Status::Released && r.reason == Some(reason)
}

/// Whether `order` has every result it will get: its outcome, the follow-up's answer, and
/// (with expiry) the release of a reservation that was not paid.
fn answered(order: &Order, results: &[StockResult], load: Load) -> bool {
    let outcome = created_outcomes(results).into_iter().next();
    let Some(outcome) = outcome else {
        return false;
    };
    let follow_up_answered = results.iter().any(|r| {
        matches!(r.status, Status::Confirmed | Status::Ignored) || released(r, Reason::Cancelled)
    });
    if order.follow_up != FollowUp::None && !follow_up_answered {
        return false;
    }
    let settled = results
        .iter()
        .any(|r| matches!(r.status, Status::Confirmed | Status::Released));
    !(load.expires() && outcome.status == Status::Reserved && !settled)
}

/// One crash test: who dies where, armed how, under what load.
#[derive(Clone, Copy)]
struct Case {
    victim: &'static str,
    failpoint: &'static str,
    /// The fail crate's actions for the point (`1*return`: crash at its first hit).
    actions: &'static str,
    load: Load,
    /// How many orders the load has.
    orders: usize,
    /// More flags for the victim's first run (the one that crashes).
    victim_flags: &'static [(&'static str, &'static str)],
    /// The whole load is in `orders` before the victim starts, so its first batch holds
    /// as much of it as `BATCH_SIZE` allows.
    sent_first: bool,
    /// Product 1 starts at 0 stock, and one order for it (`fp-pre`) is answered before the
    /// load: the victim producer's sold-out marker knows product 1, so the load's orders
    /// whose first item it is are refused by the guard.
    sold_out_first: bool,
    /// What the test checks once the victim died, before restarting it.
    at_crash: AtCrash,
    /// How the victim ends.
    dies: Death,
}

/// How the victim's first run ends.
#[derive(Clone, Copy, PartialEq)]
enum Death {
    /// Aborted by the failpoint (`return`: SIGABRT), its log naming the point.
    Abort,
    /// Exited on its own with an error naming a stalled Kafka client (the point hangs the
    /// delivery reports; the worker's `--kafka-stall-timeout` must notice).
    Stalled,
}

/// What must hold at the moment of the crash, which tells that the crash hit the window.
#[derive(Clone, Copy, PartialEq)]
enum AtCrash {
    /// Only the abort itself.
    Abort,
    /// Redis got none of the waiting compensations (`Load::Compensations`).
    NothingRestored,
    /// The first round trip of the batch was answered: at least a round trip's orders
    /// ([`reserve_trip_size`]) decided; the batch had more.
    FirstTripAnswered,
    /// The crashed batch recorded sold-out refusals through the guard (its epoch was
    /// still the one the marker was learnt in, and product 1's stock could not be read),
    /// and none of them has a result yet.
    GuardedRefusals,
}

impl Case {
    const fn new(victim: &'static str, failpoint: &'static str, load: Load) -> Case {
        Case {
            victim,
            failpoint,
            actions: "1*return",
            load,
            orders: ORDERS,
            victim_flags: &[],
            sent_first: false,
            sold_out_first: false,
            at_crash: AtCrash::Abort,
            dies: Death::Abort,
        }
    }
}

/// Crashes `victim` at `failpoint` under `load`, restarts it, and checks the guarantees.
async fn crash_at(victim: &'static str, failpoint: &'static str, load: Load) {
    crash(Case::new(victim, failpoint, load)).await;
}

/// The sum of `stock:{p}` over `products` (missing keys count 0).
async fn redis_total(env: &TestEnv, products: &[i64]) -> i64 {
    env.store
        .stock_levels(products)
        .await
        .expect("redis")
        .iter()
        .flatten()
        .sum()
}

/// Every order record in Redis: record field (`record_field` of the order id) → record as
/// stored.
async fn order_records(env: &TestEnv) -> HashMap<[u8; 12], String> {
    env.store
        .records()
        .await
        .expect("records")
        .into_iter()
        .collect()
}

/// The sold-out marker's epoch as reserve.lua computes it: `<loaded marker>#<counter>`.
async fn stock_epoch(env: &TestEnv) -> String {
    let mut conn = env.store.connection();
    let marker: Option<String> = conn.get(LOADED_KEY).await.expect("get");
    let counter: Option<String> = conn.get(EPOCH_KEY).await.expect("get");
    format!(
        "{}#{}",
        marker.expect("redis loaded"),
        counter.unwrap_or_else(|| "0".into())
    )
}

/// Waits until `proc` logged that its failpoints are compiled in.
async fn wait_armed(proc: &WorkerProcess) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !proc.log_text().contains("failpoints compiled in") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} was built without failpoints: build the binaries with \
             `cargo build --workspace --bins` (log: {})",
            proc.name,
            proc.log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Crashes the victim as `case` says, restarts it, and checks the guarantees.
async fn crash(case: Case) {
    let Case {
        victim,
        failpoint,
        load,
        ..
    } = case;
    let _slot = SLOTS.acquire().await.expect("semaphore never closed");
    let env = TestEnv::new().await;
    let stock: Vec<(i64, i64)> = (1..=PRODUCTS)
        .map(|p| {
            let n = if case.sold_out_first && p == 1 {
                0
            } else {
                STOCK_EACH
            };
            (p, n)
        })
        .collect();
    env.load_stock(&stock).await;
    let products: Vec<i64> = stock.iter().map(|s| s.0).collect();
    let consumer_extra: &[(&str, &str)] = match load {
        Load::Expiry => &[("--reservation-ttl", SHORT_TTL)],
        Load::Compensations => &[("--reservation-ttl", STOP_TTL)],
        Load::PayAndCancel => &[],
    };
    let extra = |name: &str| {
        if name == "consumer" {
            consumer_extra
        } else {
            &[]
        }
    };
    let armed = format!("{failpoint}={}", case.actions);
    let mut victim_flags: Vec<(&str, &str)> = extra(victim).to_vec();
    victim_flags.extend_from_slice(case.victim_flags);

    let other = if victim == "producer" {
        "consumer"
    } else {
        "producer"
    };
    let other_proc = spawn(&env, other, "", extra(other));
    let collector = env.collector();
    let (mut list, msgs) = orders(load, case.orders);
    let mut redis_before = None;
    let mut epoch_before = None;
    let mut crashing = if load == Load::Compensations {
        assert_eq!(victim, "producer", "compensations are the producer's");
        let first = spawn(&env, victim, "", extra(victim));
        env.send_orders(msgs).await;
        let ids: HashSet<String> = list.iter().map(|o| o.id.clone()).collect();
        assert!(
            collector.wait_for(&ids, 1, Duration::from_secs(90)).await,
            "every order answered"
        );
        assert!(first.terminate(), "{victim} exits cleanly on SIGTERM");
        // Every reservation released and announced while the producer is down.
        let released_all = wait_until(|| async {
            let o = collector.snapshot();
            list.iter()
                .all(|ord| o.get(&ord.id).is_some_and(|rs| answered(ord, rs, load)))
        });
        assert!(released_all.await, "every reservation expires");
        let short = redis_total(&env, &products).await;
        let rows = stockctl::admin::stock_rows(&env.pool, &products)
            .await
            .expect("rows");
        let available: i64 = rows.iter().map(|r| r.available).sum();
        assert!(
            short < available,
            "compensations wait for the producer (Redis {short} < available {available})"
        );
        redis_before = Some(short);
        spawn(&env, victim, &armed, &victim_flags)
    } else if case.sent_first {
        env.send_orders(msgs).await;
        spawn(&env, victim, &armed, &victim_flags)
    } else {
        let crashing = spawn(&env, victim, &armed, &victim_flags);
        if case.sold_out_first {
            assert_eq!(victim, "producer", "the sold-out marker is the producer's");
            // Its first batch: product 1 seen at 0 (the point's first hit is `off`).
            let pre = Order {
                id: "fp-pre".into(),
                index: usize::MAX,
                first_product: 1,
                follow_up: FollowUp::None,
            };
            let item = Item {
                product_id: 1,
                quantity: 1,
            };
            env.send_orders(vec![(pre.id.clone(), created(&pre.id, &[item]))])
                .await;
            let ids = HashSet::from([pre.id.clone()]);
            assert!(
                collector.wait_for(&ids, 1, Duration::from_secs(60)).await,
                "the order for the sold-out product answered"
            );
            epoch_before = Some(stock_epoch(&env).await);
            // Product 1's stock made unreadable (not an integer), the epoch left alone: an
            // order for it that read stock would stay undecided (`corrupt`, no record), so
            // a refusal recorded for it now can only be the guard's. Put back before the
            // restart.
            let _: () = env
                .store
                .connection()
                .set(stock_key(1), UNREADABLE)
                .await
                .expect("set");
            list.push(pre);
        }
        env.send_orders(msgs).await;
        crashing
    };

    // The binary has failpoints (logged at start), and the victim dies at the point.
    wait_armed(&crashing).await;
    let Some(status) = crashing.exit_status(CRASH_DEADLINE).await else {
        panic!(
            "{victim} did not reach {failpoint} within {CRASH_DEADLINE:?} (log: {})",
            crashing.log.display()
        );
    };
    let log = crashing.log_text();
    match case.dies {
        Death::Abort => {
            assert_eq!(
                status.signal(),
                Some(SIGABRT),
                "{victim} aborted (SIGABRT) at {failpoint}, exit status {status:?}; log: {}",
                crashing.log.display()
            );
            assert!(
                log.contains(&format!("failpoint {failpoint}: crash")),
                "{victim}'s log names the failpoint: {}",
                crashing.log.display()
            );
        }
        Death::Stalled => {
            assert_eq!(
                status.code(),
                Some(1),
                "{victim} exited with an error, status {status:?}; log: {}",
                crashing.log.display()
            );
            assert!(
                log.contains("kafka client stalled"),
                "{victim}'s log gives the stalled client as the cause: {}",
                crashing.log.display()
            );
        }
    }
    let seen_at_crash = collector.snapshot();
    match case.at_crash {
        AtCrash::Abort => {}
        AtCrash::NothingRestored => {
            let now = redis_total(&env, &products).await;
            assert_eq!(
                Some(now),
                redis_before,
                "the compensations were read but none applied when {victim} died"
            );
        }
        AtCrash::FirstTripAnswered => {
            let decided = order_records(&env).await.len();
            let r = &env.redis;
            let trip =
                reserve_trip_size(case.orders, r.connections.into(), r.orders_per_call.into());
            assert!(
                decided >= trip && case.orders > trip,
                "the crashed batch's first round trip ({trip} orders) was answered: \
                 {decided} records of {} orders",
                case.orders
            );
            tracing::info!(decided, orders = case.orders, "orders decided at the crash");
        }
        AtCrash::GuardedRefusals => {
            assert_eq!(
                Some(stock_epoch(&env).await),
                epoch_before,
                "the stock epoch is the one the marker was learnt in, so the crashed batch \
                 refused product 1's orders by the guard"
            );
            let mut conn = env.store.connection();
            let raw: String = conn.get(stock_key(1)).await.expect("get");
            assert_eq!(raw, UNREADABLE, "no stock was added to product 1");
            let _: () = conn.set(stock_key(1), 0).await.expect("set");
            let records = order_records(&env).await;
            let guarded: Vec<&Order> = list
                .iter()
                .filter(|o| o.first_product == 1 && o.id != "fp-pre")
                .filter(|o| records.contains_key(&record_field(&o.id)))
                .collect();
            assert!(
                !guarded.is_empty(),
                "the crashed batch held orders whose first item is the sold-out product"
            );
            for o in guarded {
                assert_eq!(
                    records[&record_field(&o.id)],
                    "X|insufficient_stock|1",
                    "{}",
                    o.id
                );
                assert!(
                    !seen_at_crash.contains_key(&o.id),
                    "{}: a guarded refusal's result is not delivered before the crash",
                    o.id
                );
            }
        }
    }

    // Restarted without failpoints, the pipeline answers everything and goes idle.
    let restarted = spawn(&env, victim, "", extra(victim));
    let label = format!("{victim} at {failpoint}");
    settle_and_check(
        &env,
        collector,
        &list,
        load,
        &products,
        vec![restarted, other_proc],
    )
    .await;
    tracing::info!(
        %label,
        seen_at_crash = seen_at_crash.len(),
        "failpoint test passed"
    );
    env.cleanup().await;
}

/// Once the load is sent: waits until every order has all its results and the pipeline is
/// idle, stops `procs` (each must exit cleanly), and checks every guarantee.
async fn settle_and_check(
    env: &TestEnv,
    collector: ResultCollector,
    list: &[Order],
    load: Load,
    products: &[i64],
    procs: Vec<WorkerProcess>,
) {
    let all_answered = wait_until(|| async {
        let o = collector.snapshot();
        list.iter()
            .all(|ord| o.get(&ord.id).is_some_and(|rs| answered(ord, rs, load)))
    });
    assert!(all_answered.await, "every order answered after the restart");
    assert!(
        env.wait_idle("producer", "consumer").await,
        "pipeline goes idle"
    );
    // A compensation may still be on its way when the last result is read: guarantee 3
    // is for "no compensation in flight", so give it that moment before asserting.
    let consistent = wait_until(|| async {
        stockctl::admin::check_invariants(&env.pool, &env.store, products)
            .await
            .is_ok_and(|v| v.is_empty())
    })
    .await;
    for p in procs {
        let name = p.name.clone();
        assert!(p.terminate(), "{name} exits cleanly on SIGTERM");
    }
    if !consistent {
        env.assert_invariants(products).await;
    }

    let outcomes = collector.snapshot();
    collector.stop().await;
    check_results(env, list, &outcomes, load).await;
    env.assert_invariants(products).await;
    let results: usize = outcomes.values().map(Vec::len).sum();
    tracing::info!(results, "guarantees hold");
}

/// `stockctl rebuild` run as a process with `failpoints` armed: how it ended, and its
/// stdout and stderr.
async fn stockctl_rebuild(env: &TestEnv, failpoints: &str) -> (std::process::ExitStatus, String) {
    env.stockctl(&["rebuild"], failpoints).await
}

/// PostgreSQL's `redis_generation`: (generation, loading).
async fn generation(env: &TestEnv) -> (i64, bool) {
    sqlx::query_as("SELECT gen, loading FROM redis_generation")
        .fetch_one(&env.pool)
        .await
        .expect("redis_generation")
}

/// While both workers run and orders flow, `stockctl rebuild` dies at `failpoint`:
/// selling stays stopped (new orders get no outcome, the loaded marker is absent) until
/// `stockctl rebuild` runs again; then, once idle, every guarantee holds.
async fn rebuild_dies_at(failpoint: &str) {
    let _slot = SLOTS.acquire().await.expect("semaphore never closed");
    let env = TestEnv::new().await;
    let stock: Vec<(i64, i64)> = (1..=PRODUCTS).map(|p| (p, STOCK_EACH)).collect();
    env.load_stock(&stock).await;
    let products: Vec<i64> = stock.iter().map(|s| s.0).collect();
    let load = Load::PayAndCancel;
    let producer = spawn(&env, "producer", "", &[]);
    let consumer = spawn(&env, "consumer", "", &[]);
    let collector = env.collector();
    let (list, msgs) = orders(load, ORDERS);
    let (early, late): (Vec<&Order>, Vec<&Order>) = list.iter().partition(|o| o.index < ORDERS / 2);
    let late_ids: HashSet<&str> = late.iter().map(|o| o.id.as_str()).collect();
    let (late_msgs, early_msgs): (Vec<_>, Vec<_>) = msgs
        .into_iter()
        .partition(|(id, _)| late_ids.contains(id.as_str()));

    // The first half flows: some reserved, some paid or cancelled, some still in flight.
    env.send_orders(early_msgs).await;
    assert!(
        collector
            .wait_for_count(early.len() / 4, Duration::from_secs(60))
            .await,
        "orders flow"
    );
    let (gen0, loading0) = generation(&env).await;
    assert!(!loading0, "the first load finished");
    let (status, text) = stockctl_rebuild(&env, &format!("{failpoint}=1*return")).await;
    assert!(
        text.contains("failpoints compiled in"),
        "stockctl was built without failpoints: build with `cargo build --workspace --bins`: \
         {text}"
    );
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "stockctl aborted at {failpoint}, exit status {status:?}: {text}"
    );
    assert!(
        text.contains(&format!("failpoint {failpoint}: crash")),
        "stockctl names the failpoint: {text}"
    );
    let (gen1, loading1) = generation(&env).await;
    match failpoint {
        "rebuild.after_stop" => assert_eq!(
            (gen1, loading1),
            (gen0, false),
            "died before the fence: generation not advanced"
        ),
        "rebuild.after_fence" => assert_eq!(
            (gen1, loading1),
            (gen0 + 1, true),
            "died after the fence: generation advanced, loading"
        ),
        other => panic!("not a rebuild failpoint: {other}"),
    }

    // Selling stays stopped: the second half gets no outcome while Redis is not loaded.
    env.send_orders(late_msgs).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !env.store.is_loaded().await.expect("redis"),
        "{LOADED_KEY} stays absent until a rebuild finishes"
    );
    let o = collector.snapshot();
    let sold: Vec<&str> = late
        .iter()
        .filter(|ord| o.contains_key(&ord.id))
        .map(|ord| ord.id.as_str())
        .collect();
    assert!(
        sold.is_empty(),
        "no outcome while Redis is not loaded: {sold:?}"
    );

    // Run again without failpoints: it finishes, in a generation of its own.
    let (status, text) = stockctl_rebuild(&env, "").await;
    assert!(status.success(), "stockctl rebuild: {status:?}: {text}");
    assert_eq!(
        generation(&env).await,
        (gen1 + 1, false),
        "the second rebuild advanced the generation once more"
    );
    assert!(env.store.is_loaded().await.expect("redis"), "selling again");

    settle_and_check(
        &env,
        collector,
        &list,
        load,
        &products,
        vec![producer, consumer],
    )
    .await;
    tracing::info!(failpoint, "rebuild failpoint test passed");
    env.cleanup().await;
}

/// One distinct outcome per order, repeats with the same content, and agreement with the
/// ledger.
async fn check_results(env: &TestEnv, list: &[Order], outcomes: &Outcomes, load: Load) {
    let bad = conflicting(outcomes);
    assert!(
        bad.is_empty(),
        "orders with two outcomes: {:?}",
        &bad[..bad.len().min(5)]
    );
    let ledger: HashMap<String, (String, Option<String>, bool)> =
        sqlx::query_as("SELECT order_id, status, release_reason, announced FROM order_ledger")
            .fetch_all(&env.pool)
            .await
            .expect("ledger")
            .into_iter()
            .map(|(id, status, reason, announced)| (id, (status, reason, announced)))
            .collect();
    for order in list {
        let rs = &outcomes[&order.id];
        // Each answer (outcome, confirmation, release, ignore) once, however often repeated.
        for status in [
            Status::Reserved,
            Status::Rejected,
            Status::Confirmed,
            Status::Released,
            Status::Ignored,
        ] {
            let distinct: HashSet<&StockResult> =
                rs.iter().filter(|r| r.status == status).collect();
            assert!(
                distinct.len() <= 1,
                "{}: results of one kind differ: {rs:?}",
                order.id
            );
        }
        let reserved = rs.iter().any(|r| r.status == Status::Reserved);
        let confirmed = rs.iter().any(|r| r.status == Status::Confirmed);
        let release = rs.iter().find(|r| r.status == Status::Released);
        let row = ledger.get(&order.id);
        match row.map(|(s, reason, announced)| (s.as_str(), reason.as_deref(), *announced)) {
            Some(("confirmed", _, _)) => assert!(
                reserved && confirmed && release.is_none(),
                "{}: confirmed in the ledger, results {rs:?}",
                order.id
            ),
            Some(("released", reason, announced)) => {
                assert!(
                    reserved
                        && !confirmed
                        && release.and_then(|r| r.reason).map(Reason::as_str) == reason,
                    "{}: released ({reason:?}) in the ledger, results {rs:?}",
                    order.id
                );
                assert!(announced, "{}: release announced", order.id);
            }
            Some(("reserved", _, _)) => {
                assert!(
                    !load.expires(),
                    "{}: still reserved after its TTL",
                    order.id
                );
                assert!(
                    reserved && !confirmed && release.is_none(),
                    "{}: reserved in the ledger, results {rs:?}",
                    order.id
                );
            }
            _ => assert!(
                !reserved && !confirmed && release.is_none(),
                "{}: refused (ledger {row:?}), results {rs:?}",
                order.id
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_after_step() {
    crash_at("producer", "producer.after_step", Load::PayAndCancel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_after_publish() {
    crash_at("producer", "producer.after_publish", Load::PayAndCancel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_after_store() {
    crash_at("producer", "producer.after_store", Load::PayAndCancel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_after_step() {
    crash_at("consumer", "consumer.after_step", Load::PayAndCancel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_after_publish() {
    crash_at("consumer", "consumer.after_publish", Load::PayAndCancel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_after_store() {
    crash_at("consumer", "consumer.after_store", Load::PayAndCancel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_after_release() {
    crash_at("consumer", "consumer.expiry.after_release", Load::Expiry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_after_announce() {
    crash_at("consumer", "consumer.expiry.after_announce", Load::Expiry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_after_restore() {
    crash_at("producer", "producer.after_step", Load::Compensations).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_before_step() {
    crash_at("producer", "producer.before_step", Load::PayAndCancel).await;
}

/// The first batch holds every order (1,200: on the default 8 connections, six round trips
/// of reserve scripts, all sent at once), and the producer dies when the first round
/// trip's answer is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_mid_redis() {
    crash(Case {
        orders: 1200,
        victim_flags: &[("--batch-size", "2000"), ("--batch-linger", "1s")],
        sent_first: true,
        at_crash: AtCrash::FirstTripAnswered,
        ..Case::new("producer", "producer.mid_redis", Load::PayAndCancel)
    })
    .await;
}

/// Product 1 is sold out and the producer knows it from its first batch; it dies after
/// the scripts of its second batch, which refused product 1's orders by the guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_sold_out_refusal() {
    crash(Case {
        actions: "1*off->1*return",
        sold_out_first: true,
        at_crash: AtCrash::GuardedRefusals,
        ..Case::new("producer", "producer.after_step", Load::PayAndCancel)
    })
    .await;
}

/// Compensations delivered (the sweeper's, while the producer was down) and read by the
/// producer, which dies before any restore script ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_not_applied() {
    crash(Case {
        at_crash: AtCrash::NothingRestored,
        ..Case::new("producer", "producer.before_step", Load::Compensations)
    })
    .await;
}

/// A Kafka client that stops getting delivery reports while the broker answers (seen
/// after broker restarts): `<worker>.delivery_hang=return` keeps every batch's reports
/// from coming. With `--kafka-stall-timeout 2s` the worker must see that a new client
/// reaches the broker, exit with that cause, and once restarted redo what was pending.
fn stalled_client(victim: &'static str, failpoint: &'static str) -> Case {
    Case {
        actions: "return",
        victim_flags: &[("--kafka-stall-timeout", "2s")],
        dies: Death::Stalled,
        ..Case::new(victim, failpoint, Load::PayAndCancel)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_stalled_kafka_client() {
    crash(stalled_client("producer", "producer.delivery_hang")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_stalled_kafka_client() {
    crash(stalled_client("consumer", "consumer.delivery_hang")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_before_commit() {
    crash_at("consumer", "consumer.before_commit", Load::PayAndCancel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_before_commit() {
    crash_at("consumer", "consumer.expiry.before_commit", Load::Expiry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_after_stop() {
    rebuild_dies_at("rebuild.after_stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_after_fence() {
    rebuild_dies_at("rebuild.after_fence").await;
}

/// The generation protocol's window: the producer stalls between its first batch's
/// scripts and their deliveries (`producer.after_step=1*sleep(5000)`), and `stockctl
/// rebuild` runs during the stall. The stalled pre-deductions name the old generation and
/// PostgreSQL had not applied them: the consumer applies none of them and asks for the
/// orders to be decided again (`redecide`), in the new generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_stalled_across_rebuild() {
    const STALL: Duration = Duration::from_millis(5000);
    let _slot = SLOTS.acquire().await.expect("semaphore never closed");
    let env = TestEnv::new().await;
    let stock: Vec<(i64, i64)> = (1..=PRODUCTS).map(|p| (p, STOCK_EACH)).collect();
    env.load_stock(&stock).await;
    let products: Vec<i64> = stock.iter().map(|s| s.0).collect();
    let load = Load::PayAndCancel;
    let consumer = spawn(&env, "consumer", "", &[]);
    let collector = env.collector();
    let armed = format!("producer.after_step=1*sleep({})", STALL.as_millis());
    let producer = spawn(&env, "producer", &armed, &[]);
    wait_armed(&producer).await;
    let (list, msgs) = orders(load, ORDERS);
    env.send_orders(msgs).await;

    // The first batch's scripts ran (its records are in Redis); the producer now stalls
    // before publishing anything of it.
    let mut decided = HashMap::new();
    let deadline = tokio::time::Instant::now() + CRASH_DEADLINE;
    while decided.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the producer decided nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        decided = order_records(&env).await;
    }
    let stalled_at = tokio::time::Instant::now();
    let (gen0, _) = generation(&env).await;
    let (status, text) = stockctl_rebuild(&env, "").await;
    let took = stalled_at.elapsed();
    assert!(status.success(), "stockctl rebuild: {status:?}: {text}");
    assert!(
        took + Duration::from_millis(500) < STALL,
        "the rebuild finished within the producer's stall (took {took:?})"
    );
    assert_eq!(
        generation(&env).await,
        (gen0 + 1, false),
        "a new generation"
    );
    let held = decided.values().filter(|r| r.starts_with("R|")).count();
    assert!(
        held > 0,
        "the stalled batch pre-deducted stock: {decided:?}"
    );
    assert!(
        collector.snapshot().is_empty(),
        "nothing of the stalled batch was published before the rebuild"
    );

    settle_and_check(
        &env,
        collector,
        &list,
        load,
        &products,
        vec![producer, consumer],
    )
    .await;
    // The stalled pre-deductions came back to the producer to be decided again.
    let n = end_offsets_total(&env.kafka, &env.topics.compensate);
    let redecided = read_topic(
        &env.kafka,
        &env.topics.compensate,
        n as usize,
        Duration::from_secs(30),
    )
    .await
    .iter()
    .filter_map(|m| {
        use rdkafka::Message;
        serde_json::from_slice::<Compensation>(m.payload()?).ok()
    })
    .filter(|c| c.cause == CompensationCause::Redecide)
    .count();
    assert!(
        redecided >= held,
        "each of the {held} stalled pre-deductions was sent back to be decided again \
         ({redecided} redecides)"
    );
    env.cleanup().await;
}

/// A failpoint's stall holds up the task that reaches it, not the worker: the workers run
/// a single-threaded runtime, and an armed point is evaluated off it. While the producer's
/// first batch stalls at `producer.after_step` (scripts run, nothing published), its
/// `/healthz` answers at once; when the stall ends, the batch goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_holds_up_its_batch_not_the_worker() {
    const STALL: Duration = Duration::from_millis(6000);
    let _slot = SLOTS.acquire().await.expect("semaphore never closed");
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 10)]).await;
    let port = stock_e2e::free_port();
    let addr = format!("127.0.0.1:{port}");
    let armed = format!("producer.after_step=1*sleep({})", STALL.as_millis());
    let producer = spawn(&env, "producer", &armed, &[("--metrics-addr", &addr)]);
    wait_armed(&producer).await;
    let healthy = || async {
        stock_e2e::http_get(port, "/healthz")
            .await
            .is_some_and(|(code, _)| code == 200)
    };
    assert!(wait_until(healthy).await, "the producer serves /healthz");
    let item = Item {
        product_id: 1,
        quantity: 1,
    };
    env.send_orders(vec![("stall-1".into(), created("stall-1", &[item]))])
        .await;

    // The batch's script ran (stock taken in Redis); the producer now stalls before it
    // publishes anything.
    assert!(
        wait_until(|| async { env.redis_stock(1).await == Some(9) }).await,
        "the producer ran the order's script"
    );
    let asked = tokio::time::Instant::now();
    let answer = stock_e2e::http_get(port, "/healthz").await;
    let took = asked.elapsed();
    let published = end_offsets_total(&env.kafka, &env.topics.deduct);
    assert_eq!(
        answer.map(|(code, _)| code),
        Some(200),
        "/healthz answered during the stall (log: {})",
        producer.log.display()
    );
    assert_eq!(
        published, 0,
        "the stall was still on when /healthz answered (it took {took:?})"
    );
    assert!(
        took < STALL / 3,
        "/healthz waited for the stall to end: {took:?}"
    );

    // The stall ends and the batch goes on.
    assert!(
        wait_until(|| async { end_offsets_total(&env.kafka, &env.topics.deduct) == 1 }).await,
        "the stalled batch was published after the stall (log: {})",
        producer.log.display()
    );
    env.cleanup().await;
}

/// `stockctl limit` dies between its PostgreSQL half and its Redis half
/// (`limit.after_postgres`) while the workers run: PostgreSQL already judges by the new
/// limit (it refuses what Redis, without it, lets through, and gives the pre-deduction
/// back), and the retry with the same request id loads Redis with the limit and every
/// customer's count. Once idle both stores count the same and nothing drifted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_after_postgres() {
    let _slot = SLOTS.acquire().await.expect("semaphore never closed");
    let env = TestEnv::new().await;
    env.load_stock(&[(1, 100)]).await;
    let producer = spawn(&env, "producer", "", &[]);
    let consumer = spawn(&env, "consumer", "", &[]);
    let collector = env.collector();
    let args = [
        "limit",
        "--product",
        "1",
        "--per-customer",
        "1",
        "--request-id",
        "limit-1",
    ];
    let (status, text) = env.stockctl(&args, "limit.after_postgres=1*return").await;
    assert_eq!(
        status.signal(),
        Some(SIGABRT),
        "died at the failpoint: {text}"
    );
    assert!(
        text.contains("failpoint limit.after_postgres: crash"),
        "{text}"
    );
    assert_eq!(
        stock_common::pg_store::product_limit(&env.pool, 1)
            .await
            .expect("limit")
            .map(|l| l.0),
        Some(1),
        "PostgreSQL has the limit"
    );
    assert_eq!(
        env.store.buyers(1).await.expect("buyers"),
        None,
        "Redis has not"
    );

    // Redis lets both through; PostgreSQL reserves one and refuses the other.
    let one = |id: &str, c: &str| {
        let item = Item {
            product_id: 1,
            quantity: 1,
        };
        let body = stock_e2e::harness::created_by(id, c, &[item]);
        ("k".to_owned(), body)
    };
    env.send_orders(vec![one("a", "c"), one("b", "c")]).await;
    let ab: HashSet<String> = ["a".to_owned(), "b".to_owned()].into();
    assert!(collector.wait_for(&ab, 1, CRASH_DEADLINE).await);
    assert!(env.wait_idle("producer", "consumer").await);
    // Which of the two wins depends on the order their deducts reach PostgreSQL (they
    // are keyed by order id).
    let o = collector.snapshot();
    assert_eq!(o["a"].len() + o["b"].len(), 2, "one outcome each");
    let mut firsts = [o["a"][0].clone(), o["b"][0].clone()];
    firsts.sort_by_key(|r| r.status != Status::Reserved);
    let (won, lost) = (&firsts[0], &firsts[1]);
    assert_eq!(won, &StockResult::reserved(&won.order_id));
    assert_eq!(
        lost,
        &StockResult::rejected(&lost.order_id, Reason::LimitExceeded, Some(1)),
        "PostgreSQL judged by the new limit"
    );
    assert_eq!(
        env.redis_stock(1).await,
        Some(99),
        "the refused pre-deduction given back"
    );

    let (status, text) = env.stockctl(&args, "").await;
    assert!(status.success(), "{text}");
    assert!(text.contains("redis loaded by a rebuild"), "{text}");
    env.send_orders(vec![one("d", "c"), one("e", "e")]).await;
    let de: HashSet<String> = ["d".to_owned(), "e".to_owned()].into();
    assert!(collector.wait_for(&de, 1, CRASH_DEADLINE).await);
    assert!(env.wait_idle("producer", "consumer").await);
    let o = collector.snapshot();
    assert_eq!(
        o["d"],
        vec![StockResult::rejected("d", Reason::LimitExceeded, Some(1))]
    );
    assert_eq!(o["e"], vec![StockResult::reserved("e")]);
    let units = env
        .store
        .buyers(1)
        .await
        .expect("buyers")
        .expect("a limit")
        .units;
    assert_eq!(units, vec![("c".to_owned(), 1), ("e".to_owned(), 1)]);
    let drift = stockctl::admin::check_drift(&env.pool, &env.store, false)
        .await
        .expect("check");
    assert!(drift.clean() && drift.limits.is_empty(), "{drift:?}");
    env.assert_invariants(&[1]).await;
    for p in [producer, consumer] {
        assert!(p.terminate(), "exits cleanly on SIGTERM");
    }
    collector.stop().await;
    env.cleanup().await;
}
