//! The consumer worker: applies deduct commands to PostgreSQL, exactly once per order.
//!
//! # Layout
//! * [`decide`]: the pure decision of a batch (reserve, pay, cancel; all items or none;
//!   never below zero; idempotent by order id). Every rule lives here.
//! * [`store`]: the one transaction per batch: lock stock rows in product order, read the
//!   ledger, write new orders, settled orders and one aggregated UPDATE per product. Every
//!   statement is `stock_common::pg_store`'s, which owns every write to PostgreSQL.
//! * [`expiry`]: the reservation-expiry sweeper and its outbox.
//! * [`worker`]: the consumer's step of the batch loop (apply with retries, then the
//!   results and compensations to publish), its readiness check and the expiry sweeper's
//!   loop; the batch loop itself and the run path are `stock_common::batch_loop`'s.
//!
//! See `docs/DESIGN.md` for the crash windows.

use clap::Parser;
use std::time::Duration;
use stock_common::config::{parse_duration, BatchArgs, DatabaseArgs, KafkaArgs, LogArgs, Topics};
use stock_common::metrics::MetricsArgs;

pub mod decide;
pub mod expiry;
pub mod store;
pub mod worker;

/// Settings of the consumer binary.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "consumer",
    about = "Applies stock deductions to PostgreSQL",
    version
)]
pub struct ConsumerArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: Topics,
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// Consumer group of `stock.deduct`.
    #[arg(
        long = "group",
        env = "CONSUMER_GROUP",
        default_value = "stock-consumer"
    )]
    pub group: String,
    /// How long a reservation waits for payment before it is released as expired.
    #[arg(long = "reservation-ttl", env = "RESERVATION_TTL", default_value = "15m", value_parser = parse_duration)]
    pub reservation_ttl: Duration,
    /// How often the expiry sweeper looks for reservations past their deadline.
    #[arg(long = "expiry-interval", env = "EXPIRY_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub expiry_interval: Duration,
    /// Apply pending migrations at start-up.
    #[arg(long = "migrate", env = "RUN_MIGRATIONS", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
}
