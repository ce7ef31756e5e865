//! The producer worker: pre-deducts order stock in Redis and hands orders to the consumer.
//!
//! # Layout
//! * [`classify`]: what each incoming message asks for (reserve, forward, reply, restore,
//!   dead-letter), without I/O.
//! * [`worker`]: the producer's step of the batch loop (one Redis pipeline of scripts per
//!   batch, then the deduct commands / results / dead letters to publish) and its
//!   readiness check; the loop itself (publish, wait for delivery, store offsets) and the
//!   run path are `stock_common::batch_loop`'s.
//! * [`memory`]: the Redis memory budget: shorter order memory, then back-pressure, as
//!   Redis nears it.
//! * [`parking`]: on a Redis Cluster, the messages that wait for a slot that lost its data
//!   (until `stockctl rebuild`) while every other order is decided, and the offsets that
//!   never pass them.
//!
//! The scripts themselves and the Redis keys live in `stock_common::redis_store`.
//! See `docs/DESIGN.md` for the crash windows.

use clap::Parser;
use stock_common::config::{BatchArgs, KafkaArgs, LogArgs, RedisArgs, Topics};
use stock_common::metrics::MetricsArgs;

pub mod classify;
pub mod memory;
pub mod parking;
pub mod worker;

/// Settings of the producer binary.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "producer",
    about = "Pre-deducts stock in Redis and publishes deduct events",
    version
)]
pub struct ProducerArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: Topics,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub memory: memory::MemoryArgs,
    /// Consumer group of `orders` and `stock.compensate`.
    #[arg(
        long = "group",
        env = "PRODUCER_GROUP",
        default_value = "stock-producer"
    )]
    pub group: String,
    /// Refuse orders for a product last seen at 0 stock without reading its stock (the
    /// refusal is still recorded in Redis, guarded by the stock epoch). `false` to have
    /// every order read stock.
    #[arg(
        long = "sold-out-marker",
        env = "SOLD_OUT_MARKER",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub sold_out_marker: bool,
}
