//! Kafka silent for longer than `--kafka-stall-timeout` is an outage to wait out, not a
//! stalled client to restart (`kafka::StallWatch`; DESIGN, "Kafka, PostgreSQL, Redis
//! restarts"). The stalled client itself, whose reports never come while the broker
//! answers, is `tests/failpoints.rs` (`<worker>.delivery_hang`).
//!
//! The producer's first batch is held after its scripts (`producer.after_step` sleeps), the
//! broker is stopped (SIGSTOP: it accepts connections and answers nothing) meanwhile, so
//! the batch's output waits for delivery reports through several stall timeouts. While
//! the broker is stopped both workers must keep running, and the producer must have asked
//! a new client and found Kafka silent. Once it is resumed every order gets one outcome.
//! librdkafka may not heal within this test's short timeout after the outage, or at all (a
//! consumer whose session timed out meanwhile was seen never to rejoin its group), so the
//! test restarts a worker that exits then naming a stalled client, as a supervisor would.
//! The test's own result reader is started only after the outage, for the same reason.
//!
//! Its own binary: it stops the stack's broker, which the tests of a binary running beside
//! it would feel.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;
use stock_common::events::Item;
use stock_e2e::harness::created;
use stock_e2e::{wait_until, TestEnv, WorkerProcess};

const ORDERS: usize = 300;
const STALL_TIMEOUT: &str = "3s";
/// How long the broker stays stopped: several stall timeouts and metadata probes.
const OUTAGE: Duration = Duration::from_secs(12);

/// Resumes the broker when dropped, so that a failing test leaves no stopped broker.
struct Stopped(String);

impl Stopped {
    fn broker() -> Stopped {
        let dir = std::env::var("STACK_DIR").unwrap_or_else(|_| "/var/tmp/stockpipe".into());
        let pidfile = std::path::Path::new(&dir).join("kafka/kafka.pid");
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{}: {e} (is the plain stack up?)", pidfile.display()))
            .trim()
            .to_owned();
        signal("-STOP", &pid);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
    }
}

fn signal(sig: &str, pid: &str) {
    let ok = Command::new("kill")
        .args([sig, pid])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_stall_timeout_is_waited_out() {
    let env = TestEnv::new().await;
    let products = [1, 2];
    env.load_stock(&[(1, 100), (2, 1_000)]).await;
    let flags = |name: &str| {
        env.process_flags(name)
            .set("--kafka-stall-timeout", STALL_TIMEOUT)
    };
    let mut consumer = WorkerProcess::spawn(&flags("consumer"), &[("FAILPOINTS", "")]);
    let mut producer = WorkerProcess::spawn(
        &flags("producer"),
        &[("FAILPOINTS", "producer.after_step=1*sleep(3000)")],
    );
    let ids: Vec<String> = (0..ORDERS).map(|i| format!("ko-{i}")).collect();
    let msgs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let item = Item {
                product_id: products[i % 2],
                quantity: 1,
            };
            (id.clone(), created(id, &[item]))
        })
        .collect();
    env.send_orders(msgs).await;

    // The first batch's scripts ran: the producer now sleeps before enqueueing its output.
    let stepped = wait_until(|| async {
        env.redis_stock(1).await.is_some_and(|s| s < 100)
            || env.redis_stock(2).await.is_some_and(|s| s < 1_000)
    });
    assert!(stepped.await, "the producer ran its first batch's scripts");
    let stopped = Stopped::broker();
    tokio::time::sleep(OUTAGE).await;
    for w in [&mut producer, &mut consumer] {
        assert!(
            w.exit_status(Duration::ZERO).await.is_none(),
            "{} kept running through the outage (log: {})",
            w.name,
            w.log.display()
        );
    }
    let log = producer.log_text();
    assert!(
        log.contains("kafka does not answer"),
        "the producer waited for its reports past the stall timeout and found Kafka \
         silent (log: {})",
        producer.log.display()
    );
    assert!(
        !log.contains("kafka client stalled"),
        "no stall declared while the broker is stopped (log: {})",
        producer.log.display()
    );
    drop(stopped);
    // The observer starts after the outage (it reads the results topic from the start):
    // a reader that lived through the outage is a librdkafka client like the workers', and
    // was seen to keep its partitions and never fetch again, so that the test waited for
    // results that the workers had long published.
    let collector = env.collector();

    // After the outage: a worker whose client does not heal within the short timeout
    // (deliveries that never come, or a consumer that left its group and does not rejoin)
    // exits naming the stall, and is started again, as a supervisor would.
    let wanted: HashSet<String> = ids.iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut restarts = 0;
    while !collector
        .wait_for(&wanted, 1, Duration::from_millis(200))
        .await
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "every order answered after the outage"
        );
        for (w, name) in [(&mut producer, "producer"), (&mut consumer, "consumer")] {
            if let Some(status) = w.exit_status(Duration::ZERO).await {
                assert!(
                    w.log_text().contains("kafka client stalled"),
                    "{name} exited ({status}) only for a stalled client (log: {})",
                    w.log.display()
                );
                restarts += 1;
                assert!(restarts <= 4, "the workers keep stalling");
                *w = WorkerProcess::spawn(&flags(name), &[("FAILPOINTS", "")]);
            }
        }
    }
    tracing::info!(restarts, "every order answered after the outage");
    let outcomes = collector.snapshot();
    env.assert_one_outcome_each(&ids, &outcomes).await;
    env.assert_invariants(&products).await;
    assert!(producer.terminate(), "the producer stops cleanly");
    assert!(consumer.terminate(), "the consumer stops cleanly");
    env.cleanup().await;
}
