//! `stockctl`: operators' tools for the stock pipeline, and the harness that drives it.
//!
//! # Layout
//! * [`admin`]: stock operations across PostgreSQL and Redis (set, rebuild, invariants).
//! * [`harness`]: publish order events and collect results, as the order service would.
//! * [`rebuild`]: loading Redis from PostgreSQL.
//! * [`rng`]: the seeded generator of demo, nemesis and benchmark loads.
//! * [`demo`]: both workers fed by a demo load, with a summary.

pub mod admin;
pub mod demo;
pub mod harness;
pub mod rebuild;
pub mod rng;
