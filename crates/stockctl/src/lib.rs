//! `stockctl`: the operators' tool of the stock pipeline (migrate, create-topics, restock,
//! set, limit, show, history, rebuild, check). Test and benchmark support (the harness, the load
//! generator, the demo) lives in the dev-only crate `stock-devkit`.
//!
//! # Layout
//! * [`admin`]: stock operations across PostgreSQL and Redis (set, restock, show, history,
//!   invariants, the drift check).
//! * [`limits`]: per-customer limits (the change, the report, the drift check of counts).
//! * [`rebuild`]: loading Redis from PostgreSQL.

pub mod admin;
pub mod limits;
pub mod rebuild;
