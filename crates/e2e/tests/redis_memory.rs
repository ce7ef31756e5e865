//! Issue 12: a flood of unique order ids against the Redis memory budget. As Redis nears
//! the budget the producer first gives new order records the shorter order memory (the
//! sale goes on), then decides nothing (back-pressure: orders wait in Kafka, `/readyz`
//! says why, the retries are counted) until memory falls to the resume threshold, not just
//! under the shedding one; once memory is freed every waiting order is decided, each once.
//! Alone in its test binary: it reads the Redis server's memory, which a test running
//! beside it would move.

use redis::AsyncCommands;
use std::time::Duration;
use stock_common::events::Item;
use stock_e2e::harness::created;
use stock_e2e::{free_port, http_get, wait_until, TestEnv, Workers};

const WAIT: Duration = Duration::from_secs(60);
const CHUNK: usize = 500;

fn orders(prefix: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    let item = Item {
        product_id: 1,
        quantity: 1,
    };
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}-with-a-long-enough-order-id");
            let payload = created(&id, &[item]);
            (id, payload)
        })
        .collect()
}

async fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").await?;
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Seconds until an order's record is forgotten.
async fn ttl(env: &TestEnv, id: &str) -> i64 {
    let expires = env
        .store
        .record_expiry(id)
        .await
        .expect("record expiry")
        .expect("a record with an expiry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    expires - now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unique_ids_shortens_order_memory_then_waits_and_loses_nothing() {
    let env = TestEnv::new().await;
    if env.stack.redis_is_cluster() {
        return; // the budget is per node; this test reads one Redis
    }
    env.load_stock(&[(1, 10_000_000)]).await;
    // 128 KiB of the test's own, freed while the producer sheds: memory then falls under
    // the shedding threshold (a round of the flood adds less) but not to the resume one.
    let mut conn = env.store.connection();
    let filler = "redis-memory-test-filler";
    let _: () = conn
        .set(filler, vec![b'x'; 128 * 1024])
        .await
        .expect("SET filler");
    let used = env.store.memory().await.expect("INFO memory")[0].used as f64;
    // A budget 2 MiB above what the server uses now: new records get the shorter memory
    // from 300 KiB more, nothing is decided from 900 KiB more, and shedding ends 300 KiB
    // under that (by default midway between the two).
    let budget = used + 2.0 * 1_048_576.0;
    let shorten_at = (used + 300.0 * 1024.0) / budget;
    let shed_at = (used + 900.0 * 1024.0) / budget;
    let port = free_port();
    let pargs = env.producer_args_with(
        "producer",
        &[
            ("--redis-memory-budget", &format!("{}", budget as u64)),
            ("--redis-memory-shorten-at", &format!("{shorten_at:.6}")),
            ("--redis-memory-shed-at", &format!("{shed_at:.6}")),
            ("--order-memory", "8d"),
            ("--order-memory-min", "1h"),
            ("--batch-size", "200"),
            ("--metrics-addr", &format!("127.0.0.1:{port}")),
        ],
    );
    let workers = Workers::start_with(&pargs, &env.consumer_args("consumer")).await;
    let collector = env.collector();

    // Under the budget: records get the whole order memory.
    let first = orders("calm", CHUNK);
    let mut sent: Vec<String> = first.iter().map(|(id, _)| id.clone()).collect();
    env.send_orders(first).await;
    assert!(collector.wait_for_count(sent.len(), WAIT).await);
    assert!(
        ttl(&env, &sent[0]).await > 3600,
        "a record decided under the budget keeps --order-memory"
    );

    // The flood, a chunk at a time, until the producer sheds.
    let mut shedding = false;
    for round in 0..200 {
        let chunk = orders(&format!("flood{round}"), CHUNK);
        sent.extend(chunk.iter().map(|(id, _)| id.clone()));
        env.send_orders(chunk).await;
        let settled = wait_until(|| async {
            collector.snapshot().len() >= sent.len()
                || metric(port, "stockpipe_redis_memory_pressure").await == Some(2.0)
        })
        .await;
        assert!(settled, "round {round}: neither decided nor shedding");
        if metric(port, "stockpipe_redis_memory_pressure").await == Some(2.0) {
            shedding = true;
            break;
        }
    }
    assert!(shedding, "the flood never reached the shedding threshold");
    let decided_so_far = collector.snapshot().len();
    let mut shortened = 0;
    for id in &sent[..decided_so_far.min(sent.len())] {
        let t = ttl(&env, id).await;
        if (1..=5400).contains(&t) {
            shortened += 1;
        }
    }
    assert!(
        shortened > 0,
        "records decided close to the budget get --order-memory-min"
    );
    let _: () = conn.del(filler).await.expect("DEL filler");
    let ratio = "stockpipe_redis_memory_ratio";
    assert!(
        wait_until(|| async { metric(port, ratio).await.is_some_and(|r| r < shed_at) }).await,
        "freeing the filler brings memory under the shedding threshold"
    );

    // While shedding: nothing is decided, the retries are counted, /readyz says why.
    let waiting = orders("waiting", CHUNK);
    sent.extend(waiting.iter().map(|(id, _)| id.clone()));
    env.send_orders(waiting).await;
    let retries = r#"stockpipe_retries_total{cause="redis_memory",worker="producer"}"#;
    let before = metric(port, retries).await.unwrap_or(0.0);
    assert!(
        wait_until(|| async { metric(port, retries).await.unwrap_or(0.0) >= before + 2.0 }).await,
        "the producer retries while Redis is at its budget"
    );
    let (code, body) = http_get(port, "/readyz").await.expect("readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("budget"), "{body}");
    assert!(
        collector.snapshot().len() < sent.len(),
        "orders sent while shedding wait"
    );

    // Records expire (here: deleted, as their lifetime would): every waiting order is
    // decided, once, and selling goes on.
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter: redis::AsyncIter<String> =
            conn.scan_match("stockpipe:rec:*").await.expect("scan");
        while let Some(k) = iter.next_item().await {
            keys.push(k.expect("scan"));
        }
    }
    for chunk in keys.chunks(1000) {
        let _: () = conn.del(chunk).await.expect("DEL");
    }
    assert!(
        wait_until(|| async { collector.snapshot().len() >= sent.len() }).await,
        "every waiting order decided once memory is freed"
    );
    assert!(
        wait_until(|| async {
            http_get(port, "/readyz")
                .await
                .is_some_and(|(c, _)| c == 200)
        })
        .await
    );
    let outcomes = collector.snapshot();
    let reserved = env.assert_one_outcome_each(&sent, &outcomes).await;
    assert_eq!(
        reserved,
        sent.len(),
        "stock was ample: every order reserved"
    );
    workers.stop().await;
    collector.stop().await;
    env.assert_invariants(&[1]).await;
    env.cleanup().await;
}
