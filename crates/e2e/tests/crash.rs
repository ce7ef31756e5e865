//! `kill -9` of each worker process in the middle of a load (issue 2): every order still
//! gets exactly one distinct outcome, and guarantees 1 and 3 hold once the pipeline is idle.

use std::collections::HashSet;
use std::time::Duration;
use stock_common::events::Item;
use stock_e2e::harness::created;
use stock_e2e::{TestEnv, WorkerProcess};

const ORDERS: usize = 10_000;

async fn crash_mid_load(victim: &str) {
    let env = TestEnv::new().await;
    let mut stock = vec![(1, 3_000)];
    stock.extend((2..=20).map(|p| (p, 300)));
    env.load_stock(&stock).await;
    let products: Vec<i64> = stock.iter().map(|s| s.0).collect();

    let mut producer = Some(WorkerProcess::spawn(&env.process_flags("producer"), &[]));
    let mut consumer = Some(WorkerProcess::spawn(&env.process_flags("consumer"), &[]));
    let collector = env.collector();

    let ids: Vec<String> = (0..ORDERS).map(|i| format!("crash-{i}")).collect();
    let msgs = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
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
            (id.clone(), created(id, &items))
        })
        .collect();
    env.send_orders(msgs).await;

    // Kill the victim once part of the load is through.
    assert!(
        collector
            .wait_for_count(ORDERS / 5, Duration::from_secs(120))
            .await,
        "load under way"
    );
    let victim_proc = if victim == "producer" {
        producer.take()
    } else {
        consumer.take()
    };
    victim_proc.expect("running").kill9();
    let seen_at_kill: usize = collector.snapshot().len();
    assert!(
        seen_at_kill < ORDERS,
        "the kill landed mid-load ({seen_at_kill} outcomes in)"
    );
    let restarted = WorkerProcess::spawn(&env.process_flags(victim), &[]);
    if victim == "producer" {
        producer = Some(restarted);
    } else {
        consumer = Some(restarted);
    }

    let all: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        collector.wait_for(&all, 1, Duration::from_secs(240)).await,
        "every order gets an outcome"
    );
    assert!(
        env.wait_idle("producer", "consumer").await,
        "pipeline goes idle"
    );
    assert!(
        producer.take().expect("producer").terminate(),
        "producer exits cleanly on SIGTERM"
    );
    assert!(
        consumer.take().expect("consumer").terminate(),
        "consumer exits cleanly on SIGTERM"
    );

    let reserved = env
        .assert_one_outcome_each(&ids, &collector.snapshot())
        .await;
    env.assert_invariants(&products).await;
    tracing::info!(victim, seen_at_kill, reserved, "crash test passed");
    collector.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_mid_load() {
    crash_mid_load("consumer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_killed_mid_load() {
    crash_mid_load("producer").await;
}
