//! A consumer SIGSTOPped while it holds a batch, for longer than the group session
//! timeout: the other consumer instance takes its partitions over, and when the stopped
//! one comes back (SIGCONT) and finishes the batch it held, nothing is applied twice —
//! the ledger and the movements show each order once and the stock columns are exactly
//! what the orders make them.
//!
//! "Holding a batch" is made certain: the test locks the hot product's stock row, so the
//! first consumer blocks inside its batch transaction (seen in `pg_stat_activity`) and is
//! stopped there. The second consumer takes the partitions over and blocks on the same
//! row (its replay of the held batch). The test then lets the row go: the stopped
//! consumer's transaction gets it and sits idle until PostgreSQL ends it
//! (`idle_in_transaction_session_timeout`), the second consumer decides every order, and
//! only then the first one is resumed, with its batch still in hand.
//!
//! Its own binary: it does not restart services, but must not share a binary with the
//! nemesis run, which does.

use sqlx::{Connection, PgConnection};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use stock_common::events::{Item, Status};
use stock_e2e::harness::{conflicting, created, paid};
use stock_e2e::nemesis::procs::{find_binary, free_port, Supervisor};
use stock_e2e::{wait_until, TestEnv, WorkerFlags};

const ORDERS: usize = 3_000;
const WARMUP: usize = 200;
const HOT: i64 = 1;

fn worker_flags(env: &TestEnv, group: &str) -> WorkerFlags {
    env.process_flags(group).set(
        "--metrics-addr",
        format!("127.0.0.1:{}", free_port().expect("free port")),
    )
}

async fn lock_waiters(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("pg_stat_activity")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_stopped_past_session_timeout_does_not_double_apply_its_batch() {
    let env = TestEnv::new().await;
    let mut stock = vec![(HOT, 1_000_000)];
    stock.extend((2..=10).map(|p| (p, 100_000)));
    env.load_stock(&stock).await;
    let products: Vec<i64> = stock.iter().map(|s| s.0).collect();

    let producer = find_binary("producer").expect("producer binary");
    let consumer = find_binary("consumer").expect("consumer binary");
    let mut sup = Supervisor::start(
        vec![
            ("producer".into(), producer, worker_flags(&env, "producer")),
            (
                "consumer-a".into(),
                consumer.clone(),
                worker_flags(&env, "consumer"),
            ),
        ],
        &env.id,
    )
    .expect("start workers");
    let a = 1;
    let collector = env.collector();

    // Every order takes the hot product (so every batch locks its row), some a tail one.
    let mut expected: HashMap<i64, (i64, i64, i64)> =
        stock.iter().map(|&(p, n)| (p, (n, 0, 0))).collect();
    let mut order = |id: &str, i: usize, pay: bool| {
        let mut items = vec![Item {
            product_id: HOT,
            quantity: 1 + (i % 2) as i64,
        }];
        if i % 3 == 1 {
            items.push(Item {
                product_id: 2 + (i % 9) as i64,
                quantity: 1,
            });
        }
        for it in &items {
            let e = expected.get_mut(&it.product_id).expect("product");
            e.0 -= it.quantity;
            if pay {
                e.2 += it.quantity;
            } else {
                e.1 += it.quantity;
            }
        }
        (id.to_owned(), created(id, &items))
    };

    // Consumer A is up and owns every partition.
    let warm: Vec<_> = (0..WARMUP)
        .map(|i| order(&format!("w-{i}"), i, false))
        .collect();
    env.send_orders(warm).await;
    let warm_ids: HashSet<String> = (0..WARMUP).map(|i| format!("w-{i}")).collect();
    assert!(
        collector
            .wait_for(&warm_ids, 1, Duration::from_secs(90))
            .await,
        "warm-up orders decided"
    );

    // Hold the hot row: A's next batch blocks inside its transaction. (A connection of
    // its own: the pool's sessions end when idle in a transaction for 10 s.)
    let mut holder = PgConnection::connect(env.db.url.expose())
        .await
        .expect("connect");
    let mut hold = holder.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM stock WHERE product_id = $1 FOR UPDATE")
        .bind(HOT)
        .execute(&mut *hold)
        .await
        .expect("lock the hot row");
    let ids: Vec<String> = (0..ORDERS).map(|i| format!("s-{i}")).collect();
    let paid_ids: Vec<&String> = ids.iter().step_by(4).collect();
    let paid_set: HashSet<&String> = paid_ids.iter().copied().collect();
    let load: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| order(id, i, paid_set.contains(id)))
        .collect();
    env.send_orders(load).await;
    env.send_orders(
        paid_ids
            .iter()
            .map(|id| ((*id).clone(), paid(id)))
            .collect(),
    )
    .await;
    assert!(
        wait_until(|| async { lock_waiters(&env).await >= 1 }).await,
        "consumer A blocks inside its batch transaction"
    );

    // Stop A while it holds the batch. B joins; once A's session has timed out B owns
    // every partition and replays A's batch, whose row is still locked: B waits too.
    assert!(sup.sigstop(a).expect("SIGSTOP"), "consumer A stopped");
    let b = sup
        .add("consumer-b", consumer, worker_flags(&env, "consumer"))
        .expect("start consumer B");
    assert!(
        wait_until(|| async { lock_waiters(&env).await >= 2 }).await,
        "consumer B took over A's partitions and replays the batch A holds"
    );
    // Let the row go: A's (frozen) transaction gets it first and sits idle in transaction
    // until PostgreSQL ends it (idle_in_transaction_session_timeout); then B decides
    // every order while A is still stopped.
    hold.rollback().await.expect("release the hot row");
    holder.close().await.expect("close");
    let all: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        collector.wait_for(&all, 1, Duration::from_secs(120)).await,
        "consumer B decides every order while A is stopped"
    );
    let before_resume: usize = collector.snapshot().values().map(Vec::len).sum();
    // A comes back and finishes the batch it held: its transaction is gone, its retry
    // finds every order of the batch in the ledger.
    assert!(sup.sigcont(a).expect("SIGCONT"), "consumer A resumed");
    let total = || collector.snapshot().values().map(Vec::len).sum::<usize>();
    assert!(
        wait_until(|| async { total() > before_resume }).await,
        "consumer A publishes the outcomes of the batch it held (again)"
    );
    // Until nothing more comes.
    let mut last = total();
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = total();
        if now == last {
            break;
        }
        last = now;
    }

    let paid_all: HashSet<String> = paid_ids.iter().map(|s| (*s).clone()).collect();
    assert!(
        collector
            .wait_for(&paid_all, 2, Duration::from_secs(120))
            .await,
        "every pay answered"
    );
    assert!(
        env.wait_idle("producer", "consumer").await,
        "pipeline goes idle"
    );
    assert!(
        sup.all_running(),
        "no worker died: {:?}",
        sup.unexpected_exits
    );
    println!(
        "results published after consumer A resumed: {}",
        total() - before_resume
    );
    let (clean, unclean) = sup.terminate_all(Duration::from_secs(30)).await;
    assert!(
        unclean.is_empty(),
        "clean shutdown: {unclean:?} ({clean:?})"
    );
    let _ = b;

    let outcomes = collector.snapshot();
    let bad = conflicting(&outcomes);
    assert!(
        bad.is_empty(),
        "two outcomes: {:?}",
        &bad[..bad.len().min(5)]
    );
    for id in ids.iter().chain(&warm_ids) {
        let rs = &outcomes[id];
        assert!(
            rs.iter().all(|r| r.status != Status::Rejected),
            "{id}: {rs:?}"
        );
        if paid_set.contains(id) {
            assert!(
                rs.iter().any(|r| r.status == Status::Confirmed),
                "{id}: {rs:?}"
            );
        }
    }

    // Each order once in the ledger, each item reserved once, each paid item confirmed once.
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM order_ledger")
        .fetch_one(&env.pool)
        .await
        .expect("ledger");
    assert_eq!(ledger as usize, ORDERS + WARMUP);
    env.assert_history_matches_ledger().await;
    let confirmed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_ledger WHERE status = 'confirmed'")
            .fetch_one(&env.pool)
            .await
            .expect("confirms");
    assert_eq!(confirmed as usize, paid_ids.len());
    for p in &products {
        let row = env.stock_row(*p).await;
        assert_eq!(
            (row.available, row.reserved, row.sold),
            expected[p],
            "product {p}: columns are exactly what the orders make them"
        );
    }
    env.assert_invariants(&products).await;
    collector.stop().await;
    env.cleanup().await;
}
