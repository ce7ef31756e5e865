//! Every crash window of `docs/DESIGN.md` that has a failpoint, crashed on purpose (issue 9).
//!
//! Each test starts the worker under test as a process with `FAILPOINTS=<name>=1*return`
//! (abort at the first hit, like `kill -9` there), the other worker as usual, and sends a
//! small load with scarce stock (plus pays and cancels, or a short reservation TTL for the
//! sweeper's windows; for restore.lua's window the producer starts with only the sweeper's
//! compensations waiting). Once the worker has died at the point, it is restarted without
//! failpoints; when every order has its outcomes and the pipeline is idle, the test checks:
//! * the process died by the failpoint's abort (SIGABRT, and its log names the point);
//! * every `order_created` has exactly one distinct outcome, and every result that came
//!   more than once came with the same content;
//! * the results agree with the PostgreSQL ledger (reserved ⇔ in the ledger, confirmed or
//!   released as the ledger says), and every expired release is announced;
//! * stock is conserved and never negative, and Redis `stock:{p}` equals `available`.
//!
//! The worker binaries must carry the failpoints: `cargo build --workspace --bins` builds
//! them so (stock-e2e enables `stock-common/failpoints`); `cargo build -p stock-producer`
//! does not.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;
use stock_common::events::{Item, Reason, Status, StockResult};
use stock_e2e::harness::{cancelled, conflicting, created, created_outcomes, paid, Outcomes};
use stock_e2e::{wait_until, TestEnv, WorkerProcess};

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
    follow_up: FollowUp,
}

/// The load: `ORDERS` orders on `PRODUCTS` products (every fifth on two), 1 or 2 units
/// each, against `STOCK_EACH` units per product: most are refused, in Redis.
fn orders(load: Load) -> (Vec<Order>, Vec<(String, Vec<u8>)>) {
    let mut list = Vec::with_capacity(ORDERS);
    let mut msgs = Vec::with_capacity(ORDERS * 2);
    for i in 0..ORDERS {
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
        list.push(Order { id, follow_up });
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

/// Crashes `victim` at `failpoint` under `load`, restarts it, and checks the guarantees.
async fn crash_at(victim: &str, failpoint: &str, load: Load) {
    let _slot = SLOTS.acquire().await.expect("semaphore never closed");
    let env = TestEnv::new().await;
    let stock: Vec<(i64, i64)> = (1..=PRODUCTS).map(|p| (p, STOCK_EACH)).collect();
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
    let armed = format!("{failpoint}=1*return");

    let other = if victim == "producer" {
        "consumer"
    } else {
        "producer"
    };
    let other_proc = spawn(&env, other, "", extra(other));
    let collector = env.collector();
    let (list, msgs) = orders(load);
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
        let short: i64 = env
            .store
            .stock_levels(&products)
            .await
            .expect("redis")
            .iter()
            .flatten()
            .sum();
        let rows = stockctl::admin::stock_rows(&env.pool, &products)
            .await
            .expect("rows");
        let available: i64 = rows.iter().map(|r| r.available).sum();
        assert!(
            short < available,
            "compensations wait for the producer (Redis {short} < available {available})"
        );
        spawn(&env, victim, &armed, extra(victim))
    } else {
        let crashing = spawn(&env, victim, &armed, extra(victim));
        env.send_orders(msgs).await;
        crashing
    };

    // The binary has failpoints (logged at start), and the victim dies at the point.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !crashing.log_text().contains("failpoints compiled in") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{victim} was built without failpoints: build the workers with \
             `cargo build --workspace --bins` (log: {})",
            crashing.log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(status) = crashing.exit_status(CRASH_DEADLINE).await else {
        panic!(
            "{victim} did not reach {failpoint} within {CRASH_DEADLINE:?} (log: {})",
            crashing.log.display()
        );
    };
    let log = crashing.log_text();
    const SIGABRT: i32 = 6;
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
    let seen_at_crash = collector.snapshot().len();

    // Restarted without failpoints, the pipeline answers everything and goes idle.
    let restarted = spawn(&env, victim, "", extra(victim));
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
        stockctl::admin::check_invariants(&env.pool, &env.store, &products)
            .await
            .is_ok_and(|v| v.is_empty())
    })
    .await;
    assert!(restarted.terminate(), "{victim} exits cleanly on SIGTERM");
    assert!(other_proc.terminate(), "{other} exits cleanly on SIGTERM");
    if !consistent {
        env.assert_invariants(&products).await;
    }

    let outcomes = collector.snapshot();
    collector.stop().await;
    check_results(&env, &list, &outcomes, load).await;
    env.assert_invariants(&products).await;
    let results: usize = outcomes.values().map(Vec::len).sum();
    tracing::info!(
        victim,
        failpoint,
        seen_at_crash,
        results,
        "failpoint test passed"
    );
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
