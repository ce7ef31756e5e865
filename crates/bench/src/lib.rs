//! Benchmarks of the stock pipeline, run against the real local stack (`deploy/stack-up.sh`).
//! Every run works in a slice of the stack of its own (a fresh PostgreSQL database
//! `bench_<id>`, a claimed Redis database, topics `bench-<id>.*`) and removes it at the end.
//! Each measurement prints a readable table, then its raw figures as JSON lines (one object
//! per line, starting with `{`), so that `grep '^{'` yields machine-readable results.
//!
//! # What each module measures
//! * [`e2e`]: the whole pipeline, producer and consumer workers as processes of their own
//!   (`--in-process`: tasks of this process), with CPU µs per order of each process.
//!   Orders per second from the first publish to the last outcome on `stock.results`
//!   (`stream`), the drain rate of a backlog published before the workers start
//!   (`preload`), and each stage on its own (`staged`: producer first, then consumer);
//!   with checks that every order got exactly one outcome and that the stock invariants
//!   hold afterwards.
//! * [`soak`]: the whole pipeline under a steady paced load for a long time (e.g. 60 min),
//!   with figures per window (rate, p50/p99, CPU per order of each process, each worker's
//!   RSS, PostgreSQL table sizes and autovacuum runs, Redis memory), the first and last
//!   window compared, a Markdown file and an SVG chart; `bench e2e`'s checks at the end.
//! * [`apply`]: PostgreSQL alone, on one hot SKU: the consumer's batched `apply_batch`
//!   against per-order baselines (autocommit conditional UPDATE; ledger INSERT + UPDATE per
//!   transaction), with the ratio batched/baseline. New strategies are variants of
//!   [`apply::Strategy`].
//! * [`redis_stage`]: the producer's Redis stage alone (`RedisStore::reserve_many` at
//!   several orders per script call, and on a sold-out product with and without the
//!   sold-out marker), against `redis-benchmark` running the same script in the same run.
//! * [`survey`]: the reference survey's strategies (pessimistic and optimistic locks,
//!   atomic UPDATE, Redis Lua, Redis SET NX lock, sharded Redis stock) and this pipeline,
//!   on one seeded workload at several concurrencies: throughput, latency percentiles,
//!   oversold units, wrongly refused orders, store consistency, PostgreSQL = Redis; written
//!   as the survey's §8 table with measured columns (`survey.md`), `survey.csv` and
//!   `throughput.svg`.
//!
//! # Support modules
//! * [`env`]: creating and removing a run's database, Redis database and topics.
//! * [`load`]: the deterministic order load (one or more items per order) and the stock
//!   that goes with it.
//! * [`driver`]: the closed-loop driver of per-order measurements (a connection per task,
//!   a shared queue, per-order latency).
//! * [`cpu`]: CPU seconds of Kafka, PostgreSQL, Redis and the bench process over a span,
//!   of each worker process by PID, and of each Redis server and Kafka broker by port;
//!   resident memory of a process.
//! * [`cluster`]: on the cluster layout, the Redis Cluster's nodes and each master's share
//!   of the Redis commands of a span (`INFO commandstats`).
//! * [`collector`]: reads `stock.results` with arrival times; wakes a client waiting for
//!   one order's result.
//! * [`probe`]: Kafka watermarks and committed offsets (stage progress, idleness).
//! * [`workers`]: producer and consumer workers as processes of the release binaries, or
//!   as tasks of this process.
//! * [`worker_metrics`]: the workers' own metrics (Redis and PostgreSQL time per batch),
//!   which split each worker's batch cycle into stages.
//! * [`report`]: tables (text and Markdown), CSV lines, JSON lines, rates.
//! * [`chart`]: line charts as SVG.

pub mod apply;
pub mod chart;
pub mod cluster;
pub mod collector;
pub mod cpu;
pub mod disk_probe;
pub mod driver;
pub mod e2e;
pub mod env;
pub mod load;
pub mod probe;
pub mod redis_stage;
pub mod report;
pub mod soak;
pub mod survey;
pub mod worker_metrics;
pub mod workers;
