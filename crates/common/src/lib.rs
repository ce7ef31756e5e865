//! Shared crate of the stock pipeline: what both workers (and `stockctl`) must agree on.
//!
//! # Layout
//! * [`events`]: the wire formats (order events and their validation, results, the internal
//!   deduct and compensation events). One home for every JSON shape.
//! * [`redis_store`]: Redis keys, the order record, the Lua scripts and their callers.
//! * [`kafka`]: client settings, topics, publishing with delivery reports, dead letters.
//! * [`batch_loop`]: the batch loop both workers run (read a batch, the worker's step,
//!   publish, wait for delivery reports, store offsets in batch order, drain at shutdown)
//!   and [`batch_loop::serve`], the one run path of both workers around it.
//! * [`db`]: the PostgreSQL pool, the embedded migrations, transient-error classification.
//! * [`pg_store`]: every write to the PostgreSQL tables (`stock`, `stock_movement`,
//!   `order_ledger`, `stock_request`, `redis_generation`), one row type per table, the
//!   locking protocol and the generation fence; what [`redis_store`] is to Redis. The
//!   consumer and `stockctl` build their transactions from it.
//! * [`config`]: flags with environment fallbacks; [`config::SecretUrl`] hides passwords.
//! * [`metrics`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`.
//! * [`telemetry`]: logging; [`shutdown`]: the signal-driven cancellation token.
//! * [`failpoint`]: the [`failpoint!`] macro marking each crash window, armed from
//!   `FAILPOINTS` only in builds with the `failpoints` feature (tests).

pub mod batch_loop;
pub mod config;
pub mod db;
pub mod events;
pub mod failpoint;
pub mod kafka;
pub mod metrics;
pub mod pg_store;
pub mod redis_store;
pub mod shutdown;
pub mod telemetry;
