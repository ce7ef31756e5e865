//! The reduced nemesis run over the whole cluster layout: three Kafka brokers (replication
//! 3, `min.insync.replicas=2`, 12 partitions), the Redis Cluster (3 masters, 3 replicas),
//! two producers and two consumers: about 10,000 orders, each kind of `FaultKind::CLUSTER`
//! once — `kill -9` and SIGSTOP of workers, one broker killed and brought back, PostgreSQL
//! restarted, a Redis master killed (its replica takes over), slots resharded live, a
//! master restarted empty and the stock rebuilt — with zero violations of the contract's
//! guarantees.
//!
//! Like `tests/nemesis.rs` it restarts services of the stack, so it is the only test of its
//! binary. `NEMESIS_SEED` picks another seed.

use stock_e2e::nemesis::{self, faults::FaultKind, NemesisConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reduced_run_on_the_cluster_layout_breaks_no_guarantee() {
    let seed = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let _turn = stock_e2e::CLUSTER_LOCK.lock().await;
    let cfg = NemesisConfig::reduced_cluster(seed);
    let report = nemesis::run(&cfg).await.expect("the nemesis run completes");
    println!("{report}");
    assert_eq!(
        report.faults.len(),
        FaultKind::CLUSTER.len(),
        "every fault kind was injected: {:?}",
        report.faults
    );
    for kind in [
        FaultKind::KafkaBrokerKill,
        FaultKind::RedisMasterKill,
        FaultKind::RedisReshard,
        FaultKind::RedisMasterEmpty,
    ] {
        assert!(report.faults.contains_key(kind.label()), "{}", kind.label());
    }
    assert!(report.orders >= 10_000, "{} orders", report.orders);
    assert!(report.passed(), "guarantees broken:\n{report}");
}
