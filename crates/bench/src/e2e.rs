//! `bench e2e`: the whole pipeline (release build) on the real stack, one fresh environment
//! per mode. The producer and consumer workers are processes of their own (the `producer`
//! and `consumer` binaries next to the bench, [`Workers::processes`]; their logs in a run
//! directory printed at the start), so that the CPU of each worker is told apart from the
//! bench's load generator and result collector; `--in-process` runs them as tasks of the
//! bench instead ([`Workers::default`]). The modes:
//!
//! * `stream`: workers started and warmed up (a few orders on a product of their own, so
//!   that every partition is assigned and flowing), then the orders are published while
//!   the pipeline runs. Figure: orders/s from the first publish to the last order's first
//!   outcome on `stock.results`. Publishing competes with the workers for the CPU, as an
//!   order service on the same box would.
//! * `preload`: every order is published first (publish rate alone), then the workers
//!   start. Figures: from the workers' start (group join included) and from the first
//!   outcome (pure drain rate) to the last outcome.
//! * `staged`: like `preload`, but the producer runs alone until it has handled every
//!   order, then the consumer starts: the capacity of each stage on its own.
//!
//! After each mode the pipeline is left to become idle (every group committed everything),
//! the workers are stopped, and the run is checked: every order has a result and exactly
//! one distinct outcome, the stock invariants hold (`stockctl::admin::check_invariants`),
//! and PostgreSQL's reserved units equal the units of the orders reported reserved.
//!
//! Per-customer limits (issue 13): `--customers N` gives every order a customer drawn
//! from a skewed population of N (a fifth of them send four fifths of the orders), and
//! `--hot-limit L` limits the hot SKU to L units per customer (`stockctl::limits::set_limit`
//! before the load). An order the limit refuses is `limit_exceeded`; the checks then also
//! require every customer's units, from the results, to be within the limit and equal to
//! PostgreSQL's count, and `stockctl`'s limit drift check (PostgreSQL against Redis) to
//! find nothing.
//!
//! CPU µs per order over the measured span (stream, preload) is reported for each part:
//! producers, consumers, the bench process, PostgreSQL, Redis, Kafka, and the pipeline
//! (Kafka + PostgreSQL + Redis + workers, the bench excluded; see [`cpu::PerOrder`]).

use crate::cluster::{self, ClusterFigures, ClusterProbe, MasterShare};
use crate::collector::{self, Collected, Collector};
use crate::cpu;
use crate::env::{PipelineEnv, Stack};
use crate::load::{self, LoadSpec, Order};
use crate::probe::{self, Probe};
use crate::report::{self, fmt_ratio, json_line, rate, thousands, Table};
use crate::worker_metrics::Sample;
use crate::workers::{self, Workers};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use stock_common::config::{parse_duration, BatchArgs};
use stock_common::events::{Item, Reason, Status};
use stock_common::kafka::OutMessage;
use stock_devkit::harness;
use stock_devkit::worker_args::Worker;
use stockctl::admin;
use tokio::time::Instant;

/// The arguments `bench e2e` and `bench soak` share (same flags, help and defaults): the
/// orders' quantities, the topics' partitions and the workers' batching.
#[derive(clap::Args, Clone, Debug)]
pub struct PipelineArgs {
    /// Quantities are drawn evenly from 1 to this.
    #[arg(long, default_value_t = 3)]
    pub max_quantity: i64,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Batch size of both workers (their default).
    #[arg(long, default_value_t = stock_common::config::DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// Batch linger of both workers (their default).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub linger: Duration,
}

impl PipelineArgs {
    /// Refuses values the run cannot use.
    pub fn check(&self) -> Result<()> {
        ensure!(self.partitions > 0, "--partitions must be at least 1");
        ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        ensure!(self.max_quantity > 0, "--max-quantity must be at least 1");
        Ok(())
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct E2eArgs {
    /// Orders to send (single-item `order_created` events).
    #[arg(long, default_value_t = 100_000)]
    pub orders: usize,
    /// Products on sale, ids 1 to N; product 1 is the hot SKU.
    #[arg(long, default_value_t = 1000)]
    pub products: i64,
    /// Share of orders (0 to 1) for the hot SKU; the others spread evenly over the rest.
    #[arg(long, default_value_t = 0.1, value_parser = parse_share)]
    pub hot_share: f64,
    /// Initial units of every product. Default: `--fill` of the units ordered of each.
    #[arg(long)]
    pub stock: Option<i64>,
    /// Without `--stock`: the share of each product's demand put in stock (about that
    /// share of orders is reserved, the rest rejected).
    #[arg(long, default_value_t = 0.7, value_parser = parse_share)]
    pub fill: f64,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Modes to run, comma separated: stream, preload, staged (each in a fresh environment).
    #[arg(long, value_delimiter = ',', default_value = "stream,preload")]
    pub mode: Vec<Mode>,
    /// Shorthand for `--mode preload`.
    #[arg(long, conflicts_with = "mode")]
    pub preload: bool,
    /// Producer workers and consumer workers (each kind in one group).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Producer workers (one group); default `--workers`.
    #[arg(long)]
    pub producers: Option<usize>,
    /// Consumer workers (one group); default `--workers`.
    #[arg(long)]
    pub consumers: Option<usize>,
    /// Longest wait for all outcomes.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Seed of the order load.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// stream: publish at this many orders/s (open loop, in 10 ms ticks) instead of all at
    /// once; latencies then show the pipeline at that load rather than a queue draining.
    /// 0: as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Run the workers as tasks of the bench process instead of as processes of the
    /// `producer` and `consumer` binaries: their CPU is then counted with the bench's.
    #[arg(long)]
    pub in_process: bool,
    /// Customers the orders come from, drawn skewed (a fifth of them send four fifths of
    /// the orders); 0: orders carry no `customer_id`.
    #[arg(long, default_value_t = 0)]
    pub customers: usize,
    /// Per-customer limit of the hot SKU (product 1), set before the load; needs
    /// `--customers` (an order without customer for a limited product is invalid).
    #[arg(long)]
    pub hot_limit: Option<i64>,
}

/// How the orders meet the pipeline; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Stream,
    Preload,
    Staged,
}

impl E2eArgs {
    /// Producer workers: `--producers`, else `--workers`.
    pub fn producers(&self) -> usize {
        self.producers.unwrap_or(self.workers)
    }

    /// Consumer workers: `--consumers`, else `--workers`.
    pub fn consumers(&self) -> usize {
        self.consumers.unwrap_or(self.workers)
    }
}

pub(crate) fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

/// The raw figures of one mode (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct E2eFigures {
    pub bench: &'static str,
    pub mode: Mode,
    pub orders: usize,
    pub products: i64,
    pub hot_share: f64,
    pub partitions: i32,
    pub batch_size: usize,
    pub linger_ms: u128,
    /// Workers of each kind when both kinds have as many, else the larger count (see
    /// `producers` and `consumers`).
    pub workers: usize,
    pub producers: usize,
    pub consumers: usize,
    /// stream: the offered load in orders/s (0: all at once).
    pub offered_rate: u64,
    /// Customers of the load (0: none) and the hot SKU's per-customer limit.
    pub customers: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hot_limit: Option<i64>,
    /// stream: per order, its publish to its first outcome, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<report::LatencyMs>,
    pub reserved: usize,
    pub rejected: usize,
    /// Refused `limit_exceeded` (counted apart from `rejected`).
    pub limit_exceeded: usize,
    /// With `--hot-limit`: every customer within the limit, PostgreSQL's counts equal to
    /// the results', no limit drift between PostgreSQL and Redis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits_match: Option<bool>,
    /// Publishing every order to `orders`, delivery reports included.
    pub publish_secs: f64,
    pub publish_rate: f64,
    /// stream: first publish to last outcome; preload: workers' start to last outcome;
    /// staged: producer's start to last outcome.
    pub e2e_secs: f64,
    pub e2e_rate: f64,
    /// First outcome to last outcome.
    pub drain_secs: f64,
    pub drain_rate: f64,
    /// Most outcomes in any one-second window.
    pub peak_1s: usize,
    /// staged: the producer alone, its start to every order forwarded or rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub producer_stage_rate: Option<f64>,
    /// staged: the consumer alone, its start to the last outcome, in deduct commands/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_stage_rate: Option<f64>,
    /// The producer's batch cycle; `step` is its Redis script pipeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub producer_cycle: Option<Breakdown>,
    /// The consumer's batch cycle; `step` is its PostgreSQL batch transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer_cycle: Option<Breakdown>,
    /// `processes` (each worker a process of its own) or `in-process`.
    pub workers_placement: &'static str,
    /// CPU of Kafka, PostgreSQL, Redis, this process and each worker process over the
    /// measured span.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<cpu::CpuUse>,
    /// The same per order, in µs, with the pipeline's total (the bench excluded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_order: Option<cpu::PerOrder>,
    /// On a Redis Cluster: the emptied cluster's nodes and each master's share of the
    /// Redis commands of the measured span (stream and preload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterFigures>,
    /// Outcomes per second from the start of the measured span.
    pub per_second: Vec<usize>,
    pub complete: bool,
    pub missing: usize,
    /// Orders with more than one (identical) result: allowed by at-least-once delivery,
    /// unexpected in a run without crashes.
    pub duplicates: usize,
    pub conflicts: usize,
    pub violations: usize,
    pub reserved_units_match: bool,
    pub idle: bool,
    pub ok: bool,
}

/// One kind of worker over the measured span, from its own metrics: how many batches, and
/// how one worker's batch cycle (span x workers / batches) splits into its main step and
/// the rest (Kafka fetch, publish and delivery reports, JSON, waiting for input).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Breakdown {
    pub batches: f64,
    pub mean_batch: f64,
    pub cycle_ms: f64,
    pub step_ms: f64,
    pub rest_ms: f64,
    /// Share of the cycle spent in the step.
    pub step_share: f64,
}

impl Breakdown {
    /// `s` summed over `workers` instances that ran side by side for `span`.
    fn of(s: Sample, span: Duration, workers: usize, step_secs: f64) -> Option<Breakdown> {
        (s.batches >= 1.0).then(|| {
            let cycle_ms = span.as_secs_f64() * 1000.0 * workers as f64 / s.batches;
            let step_ms = step_secs * 1000.0 / s.batches;
            Breakdown {
                batches: s.batches,
                mean_batch: s.messages / s.batches,
                cycle_ms,
                step_ms,
                rest_ms: cycle_ms - step_ms,
                step_share: step_ms / cycle_ms,
            }
        })
    }

    fn describe(b: Option<&Breakdown>) -> String {
        match b {
            Some(b) => format!(
                "{:.0}x{:.0}: {:.0} = {:.0} + {:.0}",
                b.batches, b.mean_batch, b.cycle_ms, b.step_ms, b.rest_ms
            ),
            None => "-".into(),
        }
    }
}

pub async fn run(stack: &Stack, args: &E2eArgs) -> Result<bool> {
    let figures = run_modes(stack, args).await?;
    print_report(&figures)?;
    Ok(figures.iter().all(|f| f.ok))
}

/// Runs every mode of `args`, each in a fresh environment; the figures of each.
pub async fn run_modes(stack: &Stack, args: &E2eArgs) -> Result<Vec<E2eFigures>> {
    ensure!(args.orders > 0, "--orders must be at least 1");
    ensure!(args.products > 0, "--products must be at least 1");
    args.pipeline.check()?;
    ensure!(args.workers > 0, "--workers must be at least 1");
    ensure!(args.producers() > 0, "--producers must be at least 1");
    ensure!(args.consumers() > 0, "--consumers must be at least 1");
    ensure!(
        args.hot_limit.is_none_or(|l| l >= 0),
        "--hot-limit must be at least 0"
    );
    ensure!(
        args.hot_limit.is_none() || args.customers > 0,
        "--hot-limit needs --customers (without a customer, an order for a limited product is invalid)"
    );
    let modes = if args.preload {
        vec![Mode::Preload]
    } else {
        args.mode.clone()
    };
    let spec = LoadSpec {
        orders: args.orders,
        products: args.products,
        hot_share: args.hot_share,
        items_per_order: 1,
        max_quantity: args.pipeline.max_quantity,
        seed: args.seed,
        customers: args.customers,
    };
    let orders = load::generate(&spec, "o-");
    let demand = load::demand(&orders);
    let stock = load::stock(args.products, &demand, args.stock, args.fill);
    let units: i64 = stock.values().sum();
    let wanted: i64 = demand.values().sum();
    if args.customers > 0 {
        println!(
            "e2e: customers: {} (skewed: a fifth of them send four fifths of the orders); hot SKU limit per customer: {}",
            args.customers,
            args.hot_limit
                .map_or_else(|| "none".to_owned(), |l| l.to_string())
        );
    }
    println!(
        "e2e: {} orders over {} products (hot share {:.2}, quantity 1-{}), {} units in stock for {} ordered ({:.0}%); \
         {} partitions, batch {} / linger {:?}, {}",
        args.orders,
        args.products,
        args.hot_share,
        args.pipeline.max_quantity,
        units,
        wanted,
        100.0 * units as f64 / wanted.max(1) as f64,
        args.pipeline.partitions,
        args.pipeline.batch_size,
        args.pipeline.linger,
        if args.producers() == args.consumers() {
            format!("{} worker(s) of each kind", args.producers())
        } else {
            format!(
                "{} producer worker(s), {} consumer worker(s)",
                args.producers(),
                args.consumers()
            )
        },
    );
    let log_dir = (!args.in_process).then(|| {
        std::env::temp_dir().join(format!("stockpipe-bench-e2e-{}", crate::env::run_id()))
    });
    match &log_dir {
        Some(dir) => {
            // Fail before any environment is created when a binary is missing.
            let p = workers::binary(Worker::Producer)?;
            let c = workers::binary(Worker::Consumer)?;
            println!(
                "e2e: workers as processes ({} and {}); their logs in {}",
                p.display(),
                c.display(),
                dir.display()
            );
        }
        None => println!("e2e: workers in the bench process (--in-process)"),
    }
    if !stack.redis.cluster_nodes.is_empty() {
        println!(
            "e2e: Redis Cluster ({}): database 0; EVERY MASTER IS EMPTIED (FLUSHALL) before each mode and after it",
            stack.redis.cluster_nodes.join(",")
        );
    }

    let mut figures = Vec::new();
    for mode in modes {
        eprintln!("bench e2e: running mode {mode:?}");
        let env = PipelineEnv::create(stack, args.pipeline.partitions, None).await?;
        if env.redis.is_cluster() {
            eprintln!("bench e2e: {}", env.redis.describe());
        }
        let workers = match &log_dir {
            Some(dir) => Workers::processes(dir, &format!("{mode:?}-").to_lowercase()),
            None => Ok(Workers::default()),
        };
        let measured = match workers {
            Ok(w) => tokio::select! {
                r = measure(&env, stack, args, mode, &orders, &stock, w) => r,
                e = workers::interrupted() => e,
            },
            Err(e) => Err(e),
        };
        env.cleanup().await;
        let f = measured.with_context(|| format!("mode {mode:?}"))?;
        eprintln!(
            "bench e2e: {mode:?}: {} orders/s end to end",
            thousands(f.e2e_rate)
        );
        figures.push(f);
    }
    Ok(figures)
}

/// Warm-up orders of the stream mode: enough distinct keys to reach every partition.
pub(crate) fn warmup_orders(product: i64, partitions: i32) -> Vec<Order> {
    (0..partitions.max(1) * 4)
        .map(|i| Order {
            id: format!("warmup-{i}"),
            items: vec![Item {
                product_id: product,
                quantity: 1,
            }],
            customer: None,
        })
        .collect()
}

pub(crate) fn messages(orders: &[Order]) -> Vec<(String, Vec<u8>)> {
    orders
        .iter()
        .map(|o| {
            let json = match &o.customer {
                Some(c) => harness::created_by(&o.id, c, &o.items),
                None => harness::created(&o.id, &o.items),
            };
            (o.id.clone(), json)
        })
        .collect()
}

/// Puts `stock` into PostgreSQL in one statement, then loads Redis from it (the rebuild
/// also sets the "loaded" marker). Equivalent to `admin::set_stock` per product on a fresh
/// database, without a transaction per product.
pub(crate) async fn load_stock(env: &PipelineEnv, stock: &BTreeMap<i64, i64>) -> Result<()> {
    let ids: Vec<i64> = stock.keys().copied().collect();
    let units: Vec<i64> = stock.values().copied().collect();
    sqlx::query(
        "INSERT INTO stock (product_id, available, reserved, sold, total_added)
         SELECT p, n, 0, 0, n FROM UNNEST($1::bigint[], $2::bigint[]) AS t(p, n)",
    )
    .bind(&ids)
    .bind(&units)
    .execute(&env.db.pool)
    .await
    .context("loading stock into PostgreSQL")?;
    stockctl::rebuild::rebuild(&env.db.pool, &env.redis.store)
        .await
        .context("loading Redis from PostgreSQL")?;
    Ok(())
}

/// The measured part of a mode: when it started, how long publishing took, where the
/// stages ended, and the workers' own metrics over the span they worked in.
struct Timing {
    start: Instant,
    publish: Duration,
    complete: bool,
    producer_stage: Option<Duration>,
    consumer_stage: Option<Duration>,
    producer_metrics: Option<(Sample, Duration)>,
    consumer_metrics: Option<(Sample, Duration)>,
    /// When each order was handed to the Kafka client (stream mode).
    sent_at: HashMap<String, Instant>,
    /// CPU of each part of the stack over the measured span.
    cpu: Option<cpu::CpuUse>,
    /// On a cluster: each master's share of the Redis commands over the measured span.
    masters: Option<Vec<MasterShare>>,
}

impl Timing {
    fn new(start: Instant, publish: Duration, complete: bool) -> Self {
        Timing {
            start,
            publish,
            complete,
            producer_stage: None,
            consumer_stage: None,
            producer_metrics: None,
            consumer_metrics: None,
            sent_at: HashMap::new(),
            cpu: None,
            masters: None,
        }
    }
}

/// A worker's metrics, or None (logged) when they cannot be read: the breakdown is an
/// extra, not a reason to fail the run.
async fn sampled(
    what: &str,
    s: impl std::future::Future<Output = Result<Sample>>,
) -> Option<Sample> {
    match s.await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(worker = what, error = %e, "worker metrics unavailable");
            None
        }
    }
}

/// `after - before` over `span`, when both samples exist.
fn delta(
    before: Option<Sample>,
    after: Option<Sample>,
    span: Duration,
) -> Option<(Sample, Duration)> {
    Some((after? - before?, span))
}

/// The start of a measured span: CPU, and on a cluster each master's command counters.
struct SpanStart {
    cpu: cpu::CpuSample,
    stats: Option<cluster::StatsSample>,
}

/// Samples the start of a span (the command counters first, so that reading them is not
/// in the CPU figures); `procs`: the worker processes running (none yet in preload).
async fn span_start(probe: Option<&ClusterProbe>, procs: &[cpu::Proc]) -> SpanStart {
    let stats = match probe {
        Some(p) => cluster_stats(p).await,
        None => None,
    };
    SpanStart {
        cpu: cpu::sample_with(procs),
        stats,
    }
}

/// CPU and (cluster) each master's share from `start` to now; `procs`: the worker
/// processes now (one started within the span counts from its start).
async fn span_end(
    start: &SpanStart,
    probe: Option<&ClusterProbe>,
    procs: &[cpu::Proc],
) -> (cpu::CpuUse, Option<Vec<MasterShare>>) {
    let cpu = cpu::between(&start.cpu, &cpu::sample_with(procs));
    let masters = match (probe, &start.stats) {
        (Some(p), Some(before)) => cluster_stats(p)
            .await
            .map(|after| cluster::between(before, &after)),
        _ => None,
    };
    (cpu, masters)
}

/// The masters' command counters, or None (logged): an extra, not a reason to fail.
async fn cluster_stats(probe: &ClusterProbe) -> Option<cluster::StatsSample> {
    match probe.sample().await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "INFO commandstats unavailable");
            None
        }
    }
}

async fn measure(
    env: &PipelineEnv,
    stack: &Stack,
    args: &E2eArgs,
    mode: Mode,
    orders: &[Order],
    stock: &BTreeMap<i64, i64>,
    mut workers: Workers,
) -> Result<E2eFigures> {
    let warm_product = args.products + 1;
    let warmup = if mode == Mode::Stream {
        warmup_orders(warm_product, env.partitions())
    } else {
        Vec::new()
    };
    let mut all_stock = stock.clone();
    all_stock.insert(warm_product, warmup.len() as i64);
    load_stock(env, &all_stock).await?;
    if let Some(limit) = args.hot_limit {
        stockctl::limits::set_limit(
            &env.db.pool,
            &env.redis.store,
            load::HOT_PRODUCT,
            Some(limit),
            "bench-hot-limit",
        )
        .await
        .context("setting the hot SKU's limit")?;
    }

    let expected: HashSet<String> = orders.iter().chain(&warmup).map(|o| o.id.clone()).collect();
    ensure!(
        expected.len() == orders.len() + warmup.len(),
        "order ids are not unique"
    );
    let collector = Collector::start(&env.kafka, &env.topics().results, expected)?;
    let msgs = messages(orders);
    let batch = BatchArgs {
        batch_size: args.pipeline.batch_size,
        linger: args.pipeline.linger,
        pipeline_depth: 2,
    };

    // On a cluster: its nodes now (after the load), to read each master's counters.
    let probe = if env.redis.is_cluster() {
        match ClusterProbe::connect(&stack.admin()?.redis).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the Redis Cluster's nodes: no per-master figures");
                None
            }
        }
    } else {
        None
    };
    let run = Run {
        env,
        args,
        mode,
        collector: &collector,
        batch,
        warmup: &warmup,
        probe: probe.as_ref(),
    };
    let separate = workers.separate();
    let timed = drive(&run, &mut workers, msgs).await;
    let idle = match &timed {
        Ok(_) => wait_idle(env).await,
        Err(_) => Ok(false),
    };
    let stopped = workers.stop().await;
    let collected = collector.finish(Duration::from_millis(500)).await;
    let timing = timed?;
    stopped?;
    let idle = idle?;

    let all_products: Vec<i64> = all_stock.keys().copied().collect();
    let checks = check(env, args, orders, &warmup, &collected, &all_products, idle).await?;
    let mut f = figures(args, mode, orders, &warmup, &timing, &collected, &checks);
    f.workers_placement = if separate { "processes" } else { "in-process" };
    if env.redis.is_cluster() {
        f.cluster = Some(ClusterFigures {
            emptied: true,
            redis_nodes: probe.as_ref().map(ClusterProbe::roles).unwrap_or_default(),
            kafka_ports: cluster::broker_ports(&env.kafka.brokers),
            masters: timing.masters.clone().unwrap_or_default(),
        });
    }
    Ok(f)
}

/// What one mode runs with.
struct Run<'a> {
    env: &'a PipelineEnv,
    args: &'a E2eArgs,
    mode: Mode,
    collector: &'a Collector,
    batch: BatchArgs,
    warmup: &'a [Order],
    /// A cluster's nodes (per-master command counters), when Redis is one.
    probe: Option<&'a ClusterProbe>,
}

/// Runs the mode's workers and publishes `msgs`; returns once every order has an outcome
/// (or the timeout passed: `complete` is false).
async fn drive(
    run: &Run<'_>,
    workers: &mut Workers,
    msgs: Vec<(String, Vec<u8>)>,
) -> Result<Timing> {
    let Run {
        env,
        args,
        mode,
        collector,
        warmup,
        probe,
        ..
    } = *run;
    let batch = &run.batch;
    let producer = stock_common::kafka::producer(&env.kafka).context("kafka producer")?;
    let topic = env.topics().orders.clone();
    let (np, nc) = (args.producers(), args.consumers());
    match mode {
        Mode::Stream => {
            workers.start_producers(env, batch, np).await?;
            workers.start_consumers(env, batch, nc).await?;
            // Every instance in its group before the warm-up: a member joining later would
            // rebalance the group inside the measured span (and replay what was in flight).
            if !wait_groups(env, np, nc).await? {
                tracing::warn!("the worker groups are not stable after 60 s; measuring anyway");
            }
            harness::publish(&producer, &topic, messages(warmup)).await?;
            let warm_ids: Vec<String> = warmup.iter().map(|o| o.id.clone()).collect();
            if !collector.wait_for(&warm_ids, Duration::from_secs(60)).await {
                bail!("the warm-up orders got no outcome within 60 s");
            }
            let p0 = sampled("producer", workers.producer_sample()).await;
            let c0 = sampled("consumer", workers.consumer_sample()).await;
            let span0 = span_start(probe, &workers.pids()).await;
            let start = Instant::now();
            let rate = args.rate;
            let publisher =
                tokio::spawn(async move { publish_paced(&producer, &topic, msgs, rate).await });
            let complete = wait_outcomes(collector, workers, args.timeout).await?;
            let span = start.elapsed();
            let (cpu, masters) = span_end(&span0, probe, &workers.pids()).await;
            let p1 = sampled("producer", workers.producer_sample()).await;
            let c1 = sampled("consumer", workers.consumer_sample()).await;
            let (published, sent_at) = publisher.await.context("publisher task")??;
            Ok(Timing {
                producer_metrics: delta(p0, p1, span),
                consumer_metrics: delta(c0, c1, span),
                sent_at,
                cpu: Some(cpu),
                masters,
                ..Timing::new(start, published - start, complete)
            })
        }
        Mode::Preload => {
            let publish = publish_timed(&producer, &topic, msgs).await?;
            let span0 = span_start(probe, &workers.pids()).await;
            let start = Instant::now();
            workers.start_producers(env, batch, np).await?;
            workers.start_consumers(env, batch, nc).await?;
            let complete = wait_outcomes(collector, workers, args.timeout).await?;
            let span = start.elapsed();
            let (cpu, masters) = span_end(&span0, probe, &workers.pids()).await;
            let p1 = sampled("producer", workers.producer_sample()).await;
            let c1 = sampled("consumer", workers.consumer_sample()).await;
            Ok(Timing {
                producer_metrics: delta(Some(Sample::default()), p1, span),
                consumer_metrics: delta(Some(Sample::default()), c1, span),
                cpu: Some(cpu),
                masters,
                ..Timing::new(start, publish, complete)
            })
        }
        Mode::Staged => {
            let total = msgs.len() as i64;
            let publish = publish_timed(&producer, &topic, msgs).await?;
            let probe = Probe::new(&env.kafka, None, env.partitions())?;
            let deduct = env.topics().deduct.clone();
            let start = Instant::now();
            workers.start_producers(env, batch, np).await?;
            // Done when every order is either forwarded (a deduct command) or rejected
            // (a result: only the producer writes results in this stage).
            let done = probe::poll_until(Duration::from_millis(20), args.timeout, || {
                ensure!(
                    !workers.any_finished(),
                    "a producer worker stopped early: {}",
                    workers.finished()
                );
                Ok(collector.received() as i64 + probe.written(&deduct)? >= total)
            })
            .await?;
            let producer_stage = start.elapsed();
            let p1 = sampled("producer", workers.producer_sample()).await;
            let producer_part = Timing {
                producer_stage: Some(producer_stage),
                producer_metrics: delta(Some(Sample::default()), p1, producer_stage),
                ..Timing::new(start, publish, false)
            };
            if !done {
                return Ok(producer_part);
            }
            let consumer_start = Instant::now();
            workers.start_consumers(env, batch, nc).await?;
            let complete = wait_outcomes(collector, workers, args.timeout).await?;
            let consumer_stage = consumer_start.elapsed();
            let c1 = sampled("consumer", workers.consumer_sample()).await;
            Ok(Timing {
                complete,
                consumer_stage: Some(consumer_stage),
                consumer_metrics: delta(Some(Sample::default()), c1, consumer_stage),
                ..producer_part
            })
        }
    }
}

/// Publishes `msgs` at `rate` orders/s (0: all at once), in 10 ms ticks: each tick sends
/// what is due by then, so a slow tick is caught up by the next. Returns when the last was
/// delivered, and when each order was handed to the client.
async fn publish_paced(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    msgs: Vec<(String, Vec<u8>)>,
    rate: u64,
) -> Result<(Instant, HashMap<String, Instant>)> {
    let start = Instant::now();
    let mut sent_at = HashMap::with_capacity(msgs.len());
    if rate == 0 {
        sent_at.extend(msgs.iter().map(|(id, _)| (id.clone(), start)));
        harness::publish(producer, topic, msgs).await?;
        return Ok((Instant::now(), sent_at));
    }
    let mut rest = msgs.into_iter().peekable();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    let mut deliveries = Vec::new();
    let never = tokio_util::sync::CancellationToken::new();
    while rest.peek().is_some() {
        tick.tick().await;
        let now = Instant::now();
        let due = (now - start).as_secs_f64() * rate as f64;
        let n = (due as u64).saturating_sub(sent).max(1);
        let chunk: Vec<_> = rest.by_ref().take(n as usize).collect();
        sent += chunk.len() as u64;
        sent_at.extend(chunk.iter().map(|(id, _)| (id.clone(), now)));
        let out: Vec<OutMessage> = chunk
            .into_iter()
            .map(|(key, payload)| OutMessage::keyed(topic, key, payload))
            .collect();
        // Handed over without waiting for delivery, so that a slow report does not hold
        // back the next tick; every report is checked at the end.
        deliveries.extend(stock_common::kafka::enqueue_all(producer, &out, &never).await?);
    }
    for d in deliveries {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => bail!("an order was not delivered: {e}"),
            Err(_) => bail!("an order's delivery report was lost"),
        }
    }
    Ok((Instant::now(), sent_at))
}

async fn publish_timed(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    msgs: Vec<(String, Vec<u8>)>,
) -> Result<Duration> {
    let t = Instant::now();
    harness::publish(producer, topic, msgs)
        .await
        .context("publishing orders")?;
    Ok(t.elapsed())
}

/// Waits for every expected outcome, failing early if a worker stops on its own.
async fn wait_outcomes(
    collector: &Collector,
    workers: &Workers,
    timeout: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if collector.wait_all(Duration::from_millis(200)).await {
            return Ok(true);
        }
        ensure!(
            !workers.any_finished(),
            "a worker stopped early: {}",
            workers.finished()
        );
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// Waits (up to 60 s) until both worker groups are stable with all their instances.
pub(crate) async fn wait_groups(
    env: &PipelineEnv,
    producers: usize,
    consumers: usize,
) -> Result<bool> {
    let probe = Probe::new(&env.kafka, None, env.partitions())?;
    let (pg, cg) = (workers::producer_group(env), workers::consumer_group(env));
    probe::poll_until(Duration::from_millis(100), Duration::from_secs(60), || {
        Ok(probe.group_stable(&pg, producers)? && probe.group_stable(&cg, consumers)?)
    })
    .await
}

/// Waits (up to 60 s) until both groups committed everything on their topics: no
/// consumer lag, no compensation in flight.
pub(crate) async fn wait_idle(env: &PipelineEnv) -> Result<bool> {
    let p = Probe::new(
        &env.kafka,
        Some(&workers::producer_group(env)),
        env.partitions(),
    )?;
    let c = Probe::new(
        &env.kafka,
        Some(&workers::consumer_group(env)),
        env.partitions(),
    )?;
    let t = env.topics();
    probe::poll_until(Duration::from_millis(100), Duration::from_secs(60), || {
        Ok(p.caught_up(&t.orders)? && c.caught_up(&t.deduct)? && p.caught_up(&t.compensate)?)
    })
    .await
}

struct Checks {
    reserved: usize,
    rejected: usize,
    limit_exceeded: usize,
    limits_match: Option<bool>,
    missing: usize,
    duplicates: usize,
    conflicts: usize,
    violations: Vec<admin::Violation>,
    reserved_units_match: bool,
    idle: bool,
    unparsed: usize,
    unexpected: usize,
}

impl Checks {
    fn ok(&self) -> bool {
        self.missing == 0
            && self.conflicts == 0
            && self.violations.is_empty()
            && self.reserved_units_match
            && self.idle
            && self.unparsed == 0
            && self.unexpected == 0
            && self.limits_match != Some(false)
    }
}

async fn check(
    env: &PipelineEnv,
    args: &E2eArgs,
    orders: &[Order],
    warmup: &[Order],
    got: &Collected,
    products: &[i64],
    idle: bool,
) -> Result<Checks> {
    let mut c = Checks {
        reserved: 0,
        rejected: 0,
        limit_exceeded: 0,
        limits_match: None,
        missing: 0,
        duplicates: 0,
        conflicts: harness::conflicting(&got.outcomes).len(),
        violations: Vec::new(),
        reserved_units_match: false,
        idle,
        unparsed: got.unparsed,
        unexpected: got.unexpected,
    };
    let mut reserved_units = 0i64;
    // Units of the hot SKU each customer holds, by the results.
    let mut held: BTreeMap<String, i64> = BTreeMap::new();
    for (i, o) in orders.iter().chain(warmup).enumerate() {
        let main = i < orders.len();
        let Some(rs) = got.outcomes.get(&o.id).filter(|rs| !rs.is_empty()) else {
            c.missing += 1;
            continue;
        };
        if rs.len() > 1 {
            c.duplicates += 1;
        }
        match rs[0].status {
            Status::Reserved => {
                reserved_units += o.items.iter().map(|it| it.quantity).sum::<i64>();
                c.reserved += usize::from(main);
                if let (Some(_), Some(customer)) = (args.hot_limit, &o.customer) {
                    let hot = o
                        .items
                        .iter()
                        .filter(|it| it.product_id == load::HOT_PRODUCT);
                    for it in hot {
                        *held.entry(customer.clone()).or_insert(0) += it.quantity;
                    }
                }
            }
            Status::Rejected if rs[0].reason == Some(Reason::InsufficientStock) => {
                c.rejected += usize::from(main);
            }
            Status::Rejected
                if rs[0].reason == Some(Reason::LimitExceeded)
                    && args.hot_limit.is_some()
                    && rs[0].product_id == Some(load::HOT_PRODUCT) =>
            {
                c.limit_exceeded += usize::from(main);
            }
            other => {
                tracing::warn!(order_id = %o.id, status = ?other, reason = ?rs[0].reason, "unexpected outcome");
                c.conflicts += 1;
            }
        }
    }
    (c.violations, c.reserved_units_match) =
        check_stock(env, products, reserved_units, "bench e2e").await?;
    if let Some(limit) = args.hot_limit {
        c.limits_match = Some(check_limits(env, limit, &held).await?);
    }
    Ok(c)
}

/// With a limit on the hot SKU: every customer within it by the results, PostgreSQL's
/// counts equal to the results', and no limit drift between PostgreSQL and Redis (what is
/// wrong is printed).
async fn check_limits(env: &PipelineEnv, limit: i64, held: &BTreeMap<String, i64>) -> Result<bool> {
    let over = held.values().filter(|&&n| n > limit).count();
    let pg: BTreeMap<String, i64> =
        stock_common::pg_store::top_customers(&env.db.pool, load::HOT_PRODUCT, i64::MAX)
            .await
            .context("reading customer_units")?
            .into_iter()
            .collect();
    let drift = stockctl::limits::drift(&env.db.pool, &env.redis.store)
        .await
        .context("checking the limits' drift")?;
    let at_limit = held.values().filter(|&&n| n == limit).count();
    println!(
        "bench e2e: limit {limit} on the hot SKU: {} customers hold units, {at_limit} at the limit, {over} above it",
        held.len()
    );
    if pg != *held {
        eprintln!(
            "bench e2e: PostgreSQL counts {} customers of the hot SKU ({} units), the results {} ({} units)",
            pg.len(),
            pg.values().sum::<i64>(),
            held.len(),
            held.values().sum::<i64>()
        );
    }
    for d in drift.iter().take(5) {
        eprintln!(
            "bench e2e: limit drift on product {}: {}",
            d.product_id, d.what
        );
    }
    Ok(over == 0 && pg == *held && drift.is_empty())
}

/// The end-of-run checks of the stores (`bench` names the bench in what is printed): the
/// stock invariants of `products` (the first five violations printed), and whether
/// PostgreSQL holds the `reserved_units` the results reported reserved and none sold.
pub(crate) async fn check_stock(
    env: &PipelineEnv,
    products: &[i64],
    reserved_units: i64,
    bench: &str,
) -> Result<(Vec<admin::Violation>, bool)> {
    let violations = admin::check_invariants(&env.db.pool, &env.redis.store, products)
        .await
        .context("checking invariants")?;
    for v in violations.iter().take(5) {
        eprintln!(
            "{bench}: invariant violation on product {}: {}",
            v.product_id, v.what
        );
    }
    let rows = admin::stock_rows(&env.db.pool, products)
        .await
        .context("reading stock rows")?;
    let pg_reserved: i64 = rows.iter().map(|r| r.reserved).sum();
    let pg_sold: i64 = rows.iter().map(|r| r.sold).sum();
    let units_match = pg_reserved == reserved_units && pg_sold == 0;
    if !units_match {
        eprintln!(
            "{bench}: PostgreSQL holds {pg_reserved} reserved and {pg_sold} sold units; the results say {reserved_units} reserved"
        );
    }
    Ok((violations, units_match))
}

fn figures(
    args: &E2eArgs,
    mode: Mode,
    orders: &[Order],
    warmup: &[Order],
    t: &Timing,
    got: &Collected,
    c: &Checks,
) -> E2eFigures {
    let n = orders.len();
    let end = got.all_in_at.unwrap_or_else(Instant::now);
    let arrivals: Vec<Instant> = got
        .arrivals
        .iter()
        .copied()
        .filter(|a| *a >= t.start)
        .collect();
    let first = arrivals.first().copied().unwrap_or(t.start);
    let e2e = end.saturating_duration_since(t.start);
    let drain = end.saturating_duration_since(first);
    // The consumer stage's work: deduct commands = orders reserved (all were forwarded).
    let deducts = c.reserved + warmup.len();
    E2eFigures {
        bench: "e2e",
        mode,
        orders: n,
        products: args.products,
        hot_share: args.hot_share,
        partitions: args.pipeline.partitions,
        batch_size: args.pipeline.batch_size,
        linger_ms: args.pipeline.linger.as_millis(),
        workers: args.producers().max(args.consumers()),
        producers: args.producers(),
        consumers: args.consumers(),
        offered_rate: if mode == Mode::Stream { args.rate } else { 0 },
        customers: args.customers,
        hot_limit: args.hot_limit,
        latency_ms: (!t.sent_at.is_empty()).then(|| {
            report::Latency::of(
                orders
                    .iter()
                    .filter_map(|o| {
                        let sent = t.sent_at.get(&o.id)?;
                        Some(got.first_at.get(&o.id)?.saturating_duration_since(*sent))
                    })
                    .collect(),
            )
            .ms()
        }),
        reserved: c.reserved,
        rejected: c.rejected,
        limit_exceeded: c.limit_exceeded,
        limits_match: c.limits_match,
        publish_secs: t.publish.as_secs_f64(),
        publish_rate: rate(n, t.publish),
        e2e_secs: e2e.as_secs_f64(),
        e2e_rate: rate(n, e2e),
        drain_secs: drain.as_secs_f64(),
        drain_rate: rate(n, drain),
        peak_1s: collector::peak_per_second(&arrivals),
        producer_stage_rate: t.producer_stage.map(|d| rate(n, d)),
        consumer_stage_rate: t.consumer_stage.map(|d| rate(deducts, d)),
        producer_cycle: t
            .producer_metrics
            .and_then(|(s, span)| Breakdown::of(s, span, args.producers(), s.redis_secs)),
        consumer_cycle: t
            .consumer_metrics
            .and_then(|(s, span)| Breakdown::of(s, span, args.consumers(), s.apply_secs)),
        workers_placement: "in-process",
        cpu: t.cpu.clone(),
        cpu_us_per_order: t.cpu.as_ref().map(|c| c.per_order(n)),
        cluster: None,
        per_second: collector::per_second(&arrivals, t.start),
        complete: t.complete,
        missing: c.missing,
        duplicates: c.duplicates,
        conflicts: c.conflicts,
        violations: c.violations.len(),
        reserved_units_match: c.reserved_units_match,
        idle: c.idle,
        ok: t.complete && c.ok(),
    }
}

fn print_report(figures: &[E2eFigures]) -> Result<()> {
    let opt = |v: Option<f64>| v.map(thousands).unwrap_or_else(|| "-".into());
    let mut t = Table::new(
        std::iter::once("".to_owned()).chain(
            figures
                .iter()
                .map(|f| format!("{:?}", f.mode).to_lowercase()),
        ),
    );
    let mut metric = |name: &str, cell: &dyn Fn(&E2eFigures) -> String| {
        t.row(std::iter::once(name.to_owned()).chain(figures.iter().map(cell)));
    };
    metric("publish orders/s (alone in preload/staged)", &|f| {
        thousands(f.publish_rate)
    });
    metric("end to end seconds", &|f| format!("{:.2}", f.e2e_secs));
    metric("END TO END orders/s", &|f| thousands(f.e2e_rate));
    metric("drain orders/s (first to last outcome)", &|f| {
        thousands(f.drain_rate)
    });
    metric("peak outcomes in 1 s", &|f| thousands(f.peak_1s as f64));
    metric("offered orders/s (0: all at once)", &|f| {
        thousands(f.offered_rate as f64)
    });
    metric("latency ms p50 / p99 / max (publish to outcome)", &|f| {
        report::LatencyMs::show(f.latency_ms)
    });
    metric("producer stage alone, orders/s", &|f| {
        opt(f.producer_stage_rate)
    });
    metric("consumer stage alone, deducts/s", &|f| {
        opt(f.consumer_stage_rate)
    });
    metric("producer batches x size: ms cycle = Redis + rest", &|f| {
        Breakdown::describe(f.producer_cycle.as_ref())
    });
    metric("consumer batches x size: ms cycle = PG + rest", &|f| {
        Breakdown::describe(f.consumer_cycle.as_ref())
    });
    metric("CPU over the span (share of all cores)", &|f| {
        f.cpu
            .as_ref()
            .map(cpu::CpuUse::describe)
            .unwrap_or_else(|| "-".into())
    });
    metric("workers", &|f| f.workers_placement.to_owned());
    metric("CPU us/order: producers / consumers / bench", &|f| {
        f.cpu_us_per_order
            .as_ref()
            .map_or_else(|| "-".into(), cpu::PerOrder::describe_workers)
    });
    metric("CPU us/order: postgres / redis / kafka", &|f| {
        f.cpu_us_per_order
            .as_ref()
            .map_or_else(|| "-".into(), cpu::PerOrder::describe_services)
    });
    metric("CPU us/order: PIPELINE (kafka+pg+redis+workers)", &|f| {
        f.cpu_us_per_order
            .as_ref()
            .map_or_else(|| "-".into(), cpu::PerOrder::describe_pipeline)
    });
    if figures.iter().any(|f| f.cluster.is_some()) {
        for (name, cell) in cluster_rows() {
            metric(name, &cell);
        }
    }
    metric("reserved / rejected / limit_exceeded", &|f| {
        format!("{} / {} / {}", f.reserved, f.rejected, f.limit_exceeded)
    });
    if figures.iter().any(|f| f.limits_match.is_some()) {
        metric(
            "customers' counts within the limit, equal, no drift",
            &|f| {
                f.limits_match
                    .map_or_else(|| "-".into(), |ok| report::yes_no(ok).to_owned())
            },
        );
    }
    metric("missing / duplicated / conflicting", &|f| {
        format!("{} / {} / {}", f.missing, f.duplicates, f.conflicts)
    });
    metric("invariants, reserved units, idle", &|f| {
        format!(
            "{} {} {}",
            report::yes_no(f.violations == 0),
            report::yes_no(f.reserved_units_match),
            report::yes_no(f.idle)
        )
    });
    metric("CHECKS", &|f| report::yes_no(f.ok).to_owned());
    println!();
    t.print();
    for f in figures {
        let per_s: Vec<String> = f.per_second.iter().map(|n| n.to_string()).collect();
        println!("{:?} outcomes per second: {}", f.mode, per_s.join(" "));
    }
    let by_mode = |m: Mode| figures.iter().find(|f| f.mode == m);
    println!();
    for f in figures {
        println!(
            "{:?}: end to end / publish alone = {}",
            f.mode,
            fmt_ratio(report::ratio(f.e2e_rate, f.publish_rate))
        );
    }
    if let (Some(s), Some(p)) = (by_mode(Mode::Stream), by_mode(Mode::Preload)) {
        println!(
            "preload drain / stream end to end = {}",
            fmt_ratio(report::ratio(p.drain_rate, s.e2e_rate))
        );
    }
    println!();
    for f in figures {
        json_line(f)?;
    }
    Ok(())
}

/// A cluster run's per-master shares, when any was read.
fn masters(f: &E2eFigures) -> Option<&[MasterShare]> {
    f.cluster
        .as_ref()
        .map(|c| c.masters.as_slice())
        .filter(|m| !m.is_empty())
}

/// The cluster layout's rows: what was emptied, each master's share of the Redis commands,
/// and CPU µs per order of each node of the layout (Redis by port with its role, Kafka
/// brokers by port).
/// A row of the table: its name and how each mode's figures fill its cell.
type Row = (&'static str, fn(&E2eFigures) -> String);

fn cluster_rows() -> [Row; 4] {
    [
        ("Redis Cluster (database 0)", |f| match &f.cluster {
            Some(c) if c.emptied => "emptied (FLUSHALL) before and after".into(),
            Some(_) => "not emptied".into(),
            None => "-".into(),
        }),
        (
            "Redis calls per master (evalsha+eval+other)",
            |f| match masters(f) {
                Some(ms) => ms
                    .iter()
                    .map(|m| {
                        format!(
                            "{} {}+{}+{} ({:.0}%)",
                            m.port,
                            m.evalsha_calls,
                            m.eval_calls,
                            m.other_calls,
                            100.0 * m.calls_share
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" / "),
                None => "-".into(),
            },
        ),
        ("Redis usec per master (share)", |f| match masters(f) {
            Some(ms) => cluster::describe_shares(ms, true),
            None => "-".into(),
        }),
        ("CPU us/order per node (M master, R replica)", |f| {
            node_cpu(f)
                .iter()
                .map(|(k, v)| format!("{k} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        }),
    ]
}

/// CPU µs per order of each node of the cluster layout under test, labelled
/// `redis:7001 M`, `kafka:9292`.
pub fn node_cpu(f: &E2eFigures) -> Vec<(String, f64)> {
    let (Some(c), Some(cpu)) = (&f.cluster, &f.cpu) else {
        return Vec::new();
    };
    let per_order =
        |k: &str| 1e6 * cpu.nodes.get(k).copied().unwrap_or(0.0) / f.orders.max(1) as f64;
    let redis = c.redis_nodes.iter().map(|(port, role)| {
        let k = format!("redis:{port}");
        let r = if *role == "master" { "M" } else { "R" };
        (format!("{k} {r}"), per_order(&k))
    });
    let kafka = c.kafka_ports.iter().map(|port| {
        let k = format!("kafka:{port}");
        (k.clone(), per_order(&k))
    });
    redis.chain(kafka).collect()
}
