//! The reduced nemesis run (about 10,000 orders, every fault kind once: `kill -9` and
//! SIGSTOP of workers, restarts of Kafka, PostgreSQL and Redis, Redis emptied and rebuilt)
//! with zero violations of the contract's guarantees. See `stock_e2e::nemesis`.
//!
//! It restarts the services of the stack the environment points at, so it is the only
//! test of this binary (cargo runs test binaries one after another; tests of one binary in
//! parallel). `NEMESIS_SEED` picks another seed.

use stock_e2e::nemesis::{self, NemesisConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reduced_run_with_every_fault_kind_breaks_no_guarantee() {
    let seed = std::env::var("NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let cfg = NemesisConfig::reduced(seed);
    let report = nemesis::run(&cfg).await.expect("the nemesis run completes");
    println!("{report}");
    assert_eq!(
        report.faults.len(),
        nemesis::faults::FaultKind::ALL.len(),
        "every fault kind was injected: {:?}",
        report.faults
    );
    assert!(report.orders >= 10_000, "{} orders", report.orders);
    assert!(report.passed(), "guarantees broken:\n{report}");
}
