//! Three Kafka brokers (the cluster layout's: replication 3, `min.insync.replicas=2`),
//! two producers and two consumers over 12 partitions (issue 11, items 3 and 4). While
//! orders flow, each broker in turn is killed (`kill -9`) and brought back, and worker
//! instances join, leave cleanly and die: every order still gets exactly one outcome, no
//! effect is lost or repeated (the ledger's reservations equal the reserved results), and
//! guarantees 1 and 3 hold once the pipeline is idle. PostgreSQL and Redis are the
//! plaintext layout's.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use stock_common::events::Item;
use stock_e2e::harness::{self, created};
use stock_e2e::nemesis::faults::cluster_fault;
use stock_e2e::{Stack, TestEnv, WorkerProcess};

const PARTITIONS: i32 = 12;
const CHUNK: usize = 300;

/// `deploy/cluster-fault.sh ARGS`, which waits for its own outcome (a broker gone from,
/// or back in, the metadata).
async fn fault(args: &[&str]) {
    let deploy = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"));
    if let Err(e) = cluster_fault(&deploy, args).await {
        panic!("{e}");
    }
    tracing::info!(?args, "fault done");
}

fn order(i: usize) -> (String, Vec<u8>) {
    let id = format!("kc-{i}");
    let p = if i.is_multiple_of(2) {
        1
    } else {
        2 + (i as i64 % 19)
    };
    let mut items = vec![Item {
        product_id: p,
        quantity: 1 + (i % 2) as i64,
    }];
    if i.is_multiple_of(7) && p != 1 {
        items.push(Item {
            product_id: 1,
            quantity: 1,
        });
    }
    let bytes = created(&id, &items);
    (id, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_any_one_broker_loses_and_repeats_nothing() {
    let stack = Stack::kafka_cluster()
        .expect("the cluster layout: STACK_LAYOUT=cluster bash deploy/stack-up.sh");
    let env = TestEnv::on_with(stack, PARTITIONS).await;
    let mut stock = vec![(1, 4_000)];
    stock.extend((2..=20).map(|p| (p, 400)));
    env.load_stock(&stock).await;
    let products: Vec<i64> = stock.iter().map(|s| s.0).collect();
    let collector = env.collector();

    let mut p1 = Some(WorkerProcess::spawn(&env.process_flags("producer"), &[]));
    let mut c1 = Some(WorkerProcess::spawn(&env.process_flags("consumer"), &[]));

    // Orders flow in chunks until the faults are over.
    let faults_over = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (kafka, topic) = (env.kafka.clone(), env.topics.orders.clone());
        let (over, published) = (faults_over.clone(), published.clone());
        tokio::spawn(async move {
            let producer = stock_common::kafka::producer(&kafka).expect("producer");
            let mut next = 0;
            while !over.load(Ordering::SeqCst) {
                let msgs: Vec<_> = (next..next + CHUNK).map(order).collect();
                harness::publish(&producer, &topic, msgs)
                    .await
                    .expect("publish (acks=all, two of three brokers up)");
                next += CHUNK;
                published.store(next, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let wait_published = |n: usize| {
        let published = published.clone();
        async move {
            while published.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    wait_published(3 * CHUNK).await;
    // Instances join.
    let p2 = WorkerProcess::spawn(&env.process_flags("producer"), &[]);
    let c2 = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    fault(&["kill-broker", "1"]).await;
    wait_published(published.load(Ordering::SeqCst) + 3 * CHUNK).await;
    fault(&["start-broker", "1"]).await;
    fault(&["kill-broker", "2"]).await;
    // One instance of each leaves: the producer cleanly, the consumer by kill -9.
    assert!(p1.take().expect("p1").terminate(), "p1 exits cleanly");
    c1.take().expect("c1").kill9();
    wait_published(published.load(Ordering::SeqCst) + 3 * CHUNK).await;
    fault(&["start-broker", "2"]).await;
    // They come back.
    let p3 = WorkerProcess::spawn(&env.process_flags("producer"), &[]);
    let c3 = WorkerProcess::spawn(&env.process_flags("consumer"), &[]);
    fault(&["kill-broker", "3"]).await;
    wait_published(published.load(Ordering::SeqCst) + 3 * CHUNK).await;
    fault(&["start-broker", "3"]).await;
    faults_over.store(true, Ordering::SeqCst);
    publisher.await.expect("publisher");

    let total = published.load(Ordering::SeqCst);
    let ids: HashSet<String> = (0..total).map(|i| format!("kc-{i}")).collect();
    assert!(
        collector.wait_for(&ids, 1, Duration::from_secs(240)).await,
        "every one of {total} orders gets an outcome"
    );
    assert!(
        env.wait_idle("producer", "consumer").await,
        "pipeline goes idle"
    );
    for w in [p2, c2, p3, c3] {
        assert!(w.terminate(), "a worker exits cleanly on SIGTERM");
    }

    let reserved = env
        .assert_one_outcome_each(&ids, &collector.snapshot())
        .await;
    env.assert_invariants(&products).await;
    tracing::info!(total, reserved, "three brokers, each killed once: passed");
    collector.stop().await;
    env.cleanup().await;
}
