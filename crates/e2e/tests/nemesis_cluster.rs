//! The reduced nemesis run over the cluster layout's three Kafka brokers (replication 3,
//! `min.insync.replicas=2`, 12 partitions), two producers and two consumers: about 10,000
//! orders, each kind of `FaultKind::CLUSTER_KAFKA` once — `kill -9` and SIGSTOP of
//! workers, one broker killed and brought back, PostgreSQL restarted, Redis emptied and
//! rebuilt — with zero violations of the contract's guarantees.
//!
//! Like `tests/nemesis.rs` it restarts services of the stack, so it is the only test of its
//! binary. `NEMESIS_SEED` picks another seed.

use stock_e2e::nemesis::{self, faults::FaultKind, NemesisConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reduced_run_on_three_brokers_breaks_no_guarantee() {
    let seed = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    let cfg = NemesisConfig::reduced_kafka_cluster(seed);
    let report = nemesis::run(&cfg).await.expect("the nemesis run completes");
    println!("{report}");
    assert_eq!(
        report.faults.len(),
        FaultKind::CLUSTER_KAFKA.len(),
        "every fault kind was injected, a broker kill among them: {:?}",
        report.faults
    );
    assert!(report
        .faults
        .contains_key(FaultKind::KafkaBrokerKill.label()));
    assert!(report.orders >= 10_000, "{} orders", report.orders);
    assert!(report.passed(), "guarantees broken:\n{report}");
}
