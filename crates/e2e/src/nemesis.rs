//! The nemesis: a Jepsen-style fault-injection run of the whole pipeline on the real stack.
//!
//! [`run`] sets up an isolated environment ([`TestEnv`]), loads a hot SKU and a long tail
//! of products, starts **two producer and two consumer processes** (same groups; any that
//! dies is restarted), and plays a mixed workload over time (see [`workload`]): single and
//! multi-item orders, pays and cancels — some racing the short reservation TTL, some
//! after it —, duplicated events, invalid orders and unparseable bytes; every order from a
//! customer of a skewed population (a few without any), with a per-customer limit on the
//! hot SKU set before the workers start ([`NemesisConfig::hot_limit`]). Meanwhile it
//! injects faults from a seeded schedule (every kind once, then at random; see
//! [`faults`]): `kill -9` of a worker, SIGSTOP of a worker for longer than the group
//! session timeout, restarts of Kafka, PostgreSQL and Redis (data kept), and Redis emptied
//! followed by `stockctl rebuild`. Once the faults are over it waits until the pipeline is
//! idle and every reservation is settled and announced, then [`check`] compares
//! everything observable with the contract's six guarantees, the order lifecycle and the
//! per-customer limits (whose counts are also sampled in both stores all along:
//! [`sample_limits`]).
//!
//! The environment comes from `KAFKA_BROKERS`, `DATABASE_URL` and `REDIS_URL`; services
//! are restarted with `deploy/stack-{down,up}.sh` and the stack settings of the
//! environment (`STACK_DIR`, `PGPORT_STACK`, `REDIS_PORT`, `KAFKA_PORT`,
//! `KAFKA_CONTROLLER_PORT`), after checking that they name the stack the URLs point at.
//! The worker binaries are taken from next to the running executable (`cargo build --bins`).

pub mod check;
pub mod faults;
pub mod procs;
pub mod workload;

use crate::TestEnv;
use anyhow::Context;
use check::{DlqMsg, LedgerRec, Mov, Observed, Violation};
use faults::{FaultCtx, FaultKind, FaultRecord, StackControl};
use procs::Supervisor;
use rdkafka::message::{Headers, Message};
use sqlx::Row;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use stock_common::events::{Item, StockResult};
use stock_devkit::rng::Rng;
use stock_devkit::worker_args::duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Settings of a nemesis run.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    /// Valid orders (first `order_created` events); invalid orders, orders for a missing
    /// product and unparseable messages come on top (about 0.5 %, 0.2 % and 0.3 %).
    pub orders: usize,
    /// Tail products (the hot SKU is product 1).
    pub products: usize,
    /// Share of orders that include the hot SKU.
    pub hot_share: f64,
    /// Stock of the hot SKU, as a share of what its orders ask for (it sells out).
    pub hot_stock_share: f64,
    /// Share of orders with 2 to 4 items.
    pub multi_share: f64,
    /// Customers the orders are drawn from (skewed: a fifth of them send four fifths of
    /// the orders); 0: no order names a customer.
    pub customers: usize,
    /// Share of orders sent without `customer_id` (for the limited hot SKU:
    /// `invalid_order`).
    pub no_customer_share: f64,
    /// Per-customer limit of the hot SKU, set with `stockctl::limits::set_limit` before
    /// the workers start (`None`: no limit).
    pub hot_limit: Option<i64>,
    /// Reservation TTL of the consumers (short, so that reservations expire during the run).
    pub ttl: Duration,
    /// Expiry sweep interval of the consumers.
    pub expiry_interval: Duration,
    /// Over how long the orders are spread. `None`: 12 s per fault, at least 20 s.
    pub duration: Option<Duration>,
    /// How many faults.
    pub faults: usize,
    /// The kinds to draw from (each at least once when `faults` allows).
    pub kinds: Vec<FaultKind>,
    pub seed: u64,
    /// Time between the start of the workload and the first fault.
    pub warmup: Duration,
    /// Pause between two faults: uniform in this range.
    pub gap: (Duration, Duration),
    /// How long a restarted service stays down; Redis stays empty for 0.3 s to this long
    /// (drawn per fault) before the rebuild.
    pub outage: Duration,
    /// How long a SIGSTOPped worker stays stopped (above the 10 s session timeout).
    pub pause: Duration,
    /// How long to wait for the pipeline to become idle after the faults.
    pub idle_timeout: Duration,
    /// `BATCH_SIZE` of the workers.
    pub batch_size: usize,
    /// Where `stack-up.sh` and `stack-down.sh` are.
    pub deploy_dir: PathBuf,
    /// Keep the run's database when there are violations (for a post-mortem).
    pub keep_on_failure: bool,
    /// Keep the run's database in any case.
    pub keep: bool,
    /// Run over the cluster layout's three Kafka brokers (`Stack::kafka_cluster`, 12
    /// partitions) instead of the environment's broker.
    pub kafka_cluster: bool,
    /// Run over the whole cluster layout (`Stack::cluster`: three brokers and the Redis
    /// Cluster, 12 partitions).
    pub redis_cluster: bool,
}

impl NemesisConfig {
    /// `orders` orders, `faults` faults of every kind, seed `seed`; other settings default.
    pub fn new(orders: usize, faults: usize, seed: u64) -> NemesisConfig {
        NemesisConfig {
            orders,
            products: 200,
            hot_share: 0.3,
            // Half the share of the runs without limits: the limit keeps the busiest
            // customers from buying, and the hot SKU must still sell out.
            hot_stock_share: 0.15,
            multi_share: 0.25,
            customers: 2_000,
            no_customer_share: 0.03,
            hot_limit: Some(2),
            ttl: Duration::from_secs(4),
            expiry_interval: Duration::from_millis(500),
            duration: None,
            faults,
            kinds: FaultKind::ALL.to_vec(),
            seed,
            warmup: Duration::from_secs(3),
            gap: (Duration::from_secs(2), Duration::from_secs(6)),
            outage: Duration::from_secs(3),
            pause: Duration::from_secs(13),
            idle_timeout: Duration::from_secs(300),
            batch_size: 500,
            deploy_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy")),
            keep_on_failure: true,
            keep: false,
            kafka_cluster: false,
            redis_cluster: false,
        }
    }

    /// The reduced run of the test suite: 10,000 orders, every fault kind once.
    pub fn reduced(seed: u64) -> NemesisConfig {
        NemesisConfig {
            products: 100,
            duration: Some(Duration::from_secs(60)),
            warmup: Duration::from_secs(6),
            gap: (Duration::from_secs(1), Duration::from_secs(3)),
            outage: Duration::from_secs(2),
            pause: Duration::from_secs(12),
            ..NemesisConfig::new(10_000, FaultKind::ALL.len(), seed)
        }
    }

    /// The reduced run over the cluster layout's three brokers: 10,000 orders, each kind of
    /// [`FaultKind::CLUSTER_KAFKA`] once (a broker killed among them).
    pub fn reduced_kafka_cluster(seed: u64) -> NemesisConfig {
        NemesisConfig {
            kinds: FaultKind::CLUSTER_KAFKA.to_vec(),
            faults: FaultKind::CLUSTER_KAFKA.len(),
            kafka_cluster: true,
            ..NemesisConfig::reduced(seed)
        }
    }

    /// The reduced run over the whole cluster layout: 10,000 orders, each kind of
    /// [`FaultKind::CLUSTER`] once (a Redis master killed, slots resharded, a master
    /// emptied, a broker killed among them).
    pub fn reduced_cluster(seed: u64) -> NemesisConfig {
        NemesisConfig {
            kinds: FaultKind::CLUSTER.to_vec(),
            faults: FaultKind::CLUSTER.len(),
            redis_cluster: true,
            ..NemesisConfig::reduced(seed)
        }
    }

    /// The full run: 100,000 orders, 24 faults.
    pub fn full(seed: u64) -> NemesisConfig {
        NemesisConfig::new(100_000, 24, seed)
    }

    pub fn workload_duration(&self) -> Duration {
        self.duration
            .unwrap_or_else(|| Duration::from_secs((12 * self.faults as u64).max(20)))
    }
}

/// What a run did and found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub run_id: String,
    pub seed: u64,
    pub orders: usize,
    pub valid_orders: usize,
    pub invalid_orders: usize,
    pub unknown_product_orders: usize,
    pub junk_messages: usize,
    pub products: usize,
    pub initial_hot_stock: i64,
    /// Messages published to `orders`, by kind.
    pub events: BTreeMap<String, usize>,
    pub events_total: usize,
    /// Distinct results per order, by `status[/reason]`.
    pub outcomes: BTreeMap<String, usize>,
    /// Messages on the results topic (redeliveries included).
    pub result_messages: usize,
    pub dead_letters: usize,
    /// Final state of the orders in PostgreSQL.
    pub ledger: BTreeMap<String, usize>,
    /// What became of the valid orders, by what the workload did with them.
    pub lifecycle: BTreeMap<String, usize>,
    /// Per-customer limits: what was set, refused, held and sampled.
    pub limits: check::LimitFigures,
    pub customers: usize,
    pub faults: BTreeMap<String, usize>,
    pub fault_log: Vec<FaultRecord>,
    pub worker_starts: usize,
    pub unexpected_exits: Vec<String>,
    pub clean_shutdowns: Vec<String>,
    pub unclean_shutdowns: Vec<String>,
    pub worker_logs: Vec<String>,
    pub violations: Vec<Violation>,
    pub violation_counts: BTreeMap<String, usize>,
    pub setup_s: f64,
    pub workload_s: f64,
    pub faults_s: f64,
    pub drain_s: f64,
    pub check_s: f64,
    pub total_s: f64,
    /// Orders published per second of workload.
    pub orders_per_s: f64,
    /// Orders per second from the first event to the idle pipeline.
    pub end_to_end_orders_per_s: f64,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "nemesis run {} (seed {}): {} orders ({} valid, {} invalid, {} for a missing product) \
             on 1 hot SKU (stock {}) + {} tail products, {} unparseable messages",
            self.run_id,
            self.seed,
            self.orders,
            self.valid_orders,
            self.invalid_orders,
            self.unknown_product_orders,
            self.initial_hot_stock,
            self.products,
            self.junk_messages
        )?;
        writeln!(
            f,
            "workload: {} events in {:.1} s ({:.0} orders/s published; {:.0} orders/s end to end, \
             first event to idle pipeline)",
            self.events_total, self.workload_s, self.orders_per_s, self.end_to_end_orders_per_s
        )?;
        for (k, n) in &self.events {
            writeln!(f, "  {k:<40} {n:>8}")?;
        }
        writeln!(
            f,
            "outcomes (distinct per order; {} result messages, {} dead letters):",
            self.result_messages, self.dead_letters
        )?;
        for (k, n) in &self.outcomes {
            writeln!(f, "  {k:<40} {n:>8}")?;
        }
        writeln!(f, "orders in PostgreSQL at the end:")?;
        for (k, n) in &self.ledger {
            writeln!(f, "  {k:<40} {n:>8}")?;
        }
        writeln!(
            f,
            "valid orders by what the workload did -> how they ended:"
        )?;
        for (k, n) in &self.lifecycle {
            writeln!(f, "  {k:<58} {n:>8}")?;
        }
        let l = &self.limits;
        if l.limits.is_empty() {
            writeln!(f, "limits: none")?;
        } else {
            writeln!(
                f,
                "limits {:?} (product: units per customer), {} customers (skewed 80/20): \
                 {} orders limit_exceeded; {} orders without customer_id, {} of them for a \
                 limited product (invalid_order)",
                l.limits,
                self.customers,
                l.limit_exceeded,
                l.without_customer,
                l.without_customer_limited
            )?;
            writeln!(
                f,
                "  at the end: {} customers hold units, {} at the limit; sampled during the run \
                 {} times in PostgreSQL, {} in Redis ({} samples failed): highest count {} / {}, \
                 {} customers seen at the limit",
                l.customers_holding,
                l.customers_at_limit,
                l.samples_pg,
                l.samples_redis,
                l.samples_failed,
                l.max_sampled_pg,
                l.max_sampled_redis,
                l.customers_seen_at_limit
            )?;
        }
        let kinds: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        writeln!(
            f,
            "faults: {} in {:.1} s: {}",
            self.fault_log.len(),
            self.faults_s,
            kinds.join(", ")
        )?;
        for r in &self.fault_log {
            writeln!(
                f,
                "  [{:>6.1} s] {:<17} {:<11} {:>5.1} s  {}",
                r.at_s, r.kind, r.target, r.took_s, r.note
            )?;
        }
        writeln!(
            f,
            "workers: 4 (2 producers, 2 consumers), {} process starts, {} unexpected exits, \
             {} of 4 stopped cleanly on SIGTERM at the end",
            self.worker_starts,
            self.unexpected_exits.len(),
            self.clean_shutdowns.len()
        )?;
        for e in &self.unexpected_exits {
            writeln!(f, "  unexpected exit: {e}")?;
        }
        for e in &self.unclean_shutdowns {
            writeln!(f, "  unclean shutdown: {e}")?;
        }
        writeln!(
            f,
            "durations: setup {:.1} s, workload {:.1} s, faults {:.1} s, drain to idle {:.1} s, \
             check {:.1} s, total {:.1} s",
            self.setup_s, self.workload_s, self.faults_s, self.drain_s, self.check_s, self.total_s
        )?;
        if self.violations.is_empty() {
            writeln!(f, "violations: 0")?;
        } else {
            writeln!(f, "violations: {}", self.violations.len())?;
            for (kind, n) in &self.violation_counts {
                writeln!(f, "  {kind:<40} {n:>8}")?;
                for v in self.violations.iter().filter(|v| &v.kind == kind).take(5) {
                    writeln!(f, "      {}", v.detail)?;
                }
            }
            writeln!(f, "worker logs: {}", self.worker_logs.join(" "))?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the nemesis (module docs). An `Err` means the run could not be carried out (stack
/// not reachable, a service that did not come back, binaries not built); broken
/// guarantees are in [`Report::violations`].
///
/// In phases: set up (environment, plan, stock, workers), [`play`] the workload with the
/// faults, wait until the pipeline is idle ([`wait_idle`]) and stop the workers,
/// [`observe`] and [`check::check`], then the [`report`].
pub async fn run(cfg: &NemesisConfig) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let producer_bin = procs::find_binary("producer").map_err(anyhow::Error::msg)?;
    let consumer_bin = procs::find_binary("consumer").map_err(anyhow::Error::msg)?;
    let env = if cfg.redis_cluster {
        let stack = crate::Stack::cluster().map_err(anyhow::Error::msg)?;
        TestEnv::on_with(stack, 12).await
    } else if cfg.kafka_cluster {
        let stack = crate::Stack::kafka_cluster().map_err(anyhow::Error::msg)?;
        TestEnv::on_with(stack, 12).await
    } else {
        TestEnv::new().await
    };
    let stack = stack_control(cfg, &env)?;
    let (plan, schedule, mut fault_rng) = plan(cfg);
    tracing::info!(
        run = %env.id,
        orders = plan.orders.len(),
        events = plan.events.len(),
        faults = ?schedule.iter().map(|k| k.label()).collect::<Vec<_>>(),
        "nemesis: plan ready"
    );
    let stock: Vec<(i64, i64)> = plan.stock.iter().map(|(p, n)| (*p, *n)).collect();
    env.load_stock(&stock).await;
    for (&product, &limit) in &plan.limits {
        // A new limit: PostgreSQL, then Redis by a load, before any worker runs.
        stockctl::limits::set_limit(
            &env.pool,
            &env.store,
            product,
            Some(limit),
            &format!("nemesis-limit-{product}"),
        )
        .await
        .with_context(|| format!("setting the limit of product {product}"))?;
    }
    let slots = worker_slots(&env, cfg, &producer_bin, &consumer_bin)?;
    let workers = Mutex::new(Supervisor::start(slots, &env.id)?);
    let collector = env.collector();
    let setup_s = t0.elapsed().as_secs_f64();

    let violations: Mutex<Vec<Violation>> = Mutex::new(Vec::new());
    let ctx = FaultCtx {
        env: &env,
        workers: &workers,
        stack: stack.as_ref(),
        outage: cfg.outage,
        pause: cfg.pause,
        violations: &violations,
        start: Instant::now(),
    };
    let sampling = CancellationToken::new();
    let run_and_drain = async {
        let played = play(cfg, &ctx, &plan, &schedule, &mut fault_rng, &collector).await;
        // Idle: every input consumed, every reservation settled and announced.
        let drain_start = Instant::now();
        if played.is_ok() {
            if let Err(state) = wait_idle(&env, &workers, cfg.idle_timeout).await {
                lock(&violations).push(Violation {
                    kind: "pipeline_not_idle".into(),
                    detail: format!("not idle {:?} after the faults: {state}", cfg.idle_timeout),
                });
            }
        }
        sampling.cancel();
        (played, drain_start.elapsed().as_secs_f64())
    };
    let ((played, drain_s), sampled) =
        tokio::join!(run_and_drain, sample_limits(&env, &plan.limits, &sampling));
    let played = played?;
    let end_to_end = ctx.start.elapsed();
    let mut sup = workers.into_inner().unwrap_or_else(|e| e.into_inner());
    let (clean, unclean) = sup.terminate_all(Duration::from_secs(30)).await;

    let check_start = Instant::now();
    let mut obs = observe(&env, &plan, junk_positions(&plan, &played.positions)).await?;
    obs.limits.sampled = sampled;
    let mut findings = check::check(&plan, &obs);
    let check_s = check_start.elapsed().as_secs_f64();

    let mut all = std::mem::take(&mut *lock(&violations));
    all.append(&mut findings.violations);
    findings.violations = all;
    let record = RunRecord {
        run_id: env.id.clone(),
        fault_log: played.fault_log,
        worker_starts: sup.slots.iter().map(|s| s.starts).sum(),
        unexpected_exits: sup.unexpected_exits.clone(),
        clean_shutdowns: clean,
        unclean_shutdowns: unclean,
        worker_logs: sup.logs(),
        setup_s,
        workload: played.workload_took,
        faults: played.faults_took,
        drain_s,
        end_to_end,
        check_s,
        total_s: t0.elapsed().as_secs_f64(),
    };
    let report = report(cfg, &plan, &obs, findings, record);
    drop(sup);
    collector.stop().await;
    if cfg.keep || (!report.passed() && cfg.keep_on_failure) {
        tracing::warn!(database = %format!("t_{}", report.run_id), "the run's database is kept");
    } else {
        env.cleanup().await;
    }
    Ok(report)
}

/// The control of the stack's services when the faults restart any (checked against the
/// environment's URLs: see [`StackControl::from_env`]).
fn stack_control(cfg: &NemesisConfig, env: &TestEnv) -> anyhow::Result<Option<StackControl>> {
    if !(cfg.kinds.iter().any(|k| k.restarts_service()) && cfg.faults > 0) {
        return Ok(None);
    }
    let stack = StackControl::from_env(
        &cfg.deploy_dir,
        &env.kafka.brokers,
        env.db.url.expose(),
        (!env.stack.redis_is_cluster()).then(|| env.redis.url.expose()),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(Some(stack))
}

/// The seeded plan of a run: the workload, the fault schedule, and the generator the
/// faults draw their details from.
fn plan(cfg: &NemesisConfig) -> (workload::Plan, Vec<FaultKind>, Rng) {
    let mut rng = Rng::new(cfg.seed);
    let shape = workload::WorkloadShape {
        orders: cfg.orders,
        products: cfg.products,
        hot_share: cfg.hot_share,
        hot_stock_share: cfg.hot_stock_share,
        multi_share: cfg.multi_share,
        ttl: cfg.ttl,
        duration: cfg.workload_duration(),
        customers: cfg.customers,
        no_customer_share: cfg.no_customer_share,
        hot_limit: cfg.hot_limit,
    };
    let plan = workload::generate(&shape, &mut rng.fork(1));
    let schedule = faults::schedule(&cfg.kinds, cfg.faults, &mut rng.fork(2));
    (plan, schedule, rng.fork(3))
}

/// Two producers and two consumers, each with a metrics port of its own, the run's batch
/// size and (consumers) its short reservation TTL and sweep interval.
fn worker_slots(
    env: &TestEnv,
    cfg: &NemesisConfig,
    producer_bin: &Path,
    consumer_bin: &Path,
) -> anyhow::Result<Vec<procs::WorkerSpec>> {
    let mut slots = Vec::new();
    for (name, bin, group) in [
        ("producer-1", producer_bin, "producer"),
        ("producer-2", producer_bin, "producer"),
        ("consumer-1", consumer_bin, "consumer"),
        ("consumer-2", consumer_bin, "consumer"),
    ] {
        let mut flags = env
            .process_flags(group)
            .set("--batch-size", cfg.batch_size)
            .set(
                "--metrics-addr",
                format!("127.0.0.1:{}", procs::free_port()?),
            );
        if group == "consumer" {
            flags = flags
                .set("--reservation-ttl", duration(cfg.ttl))
                .set("--expiry-interval", duration(cfg.expiry_interval));
        }
        slots.push((name.to_owned(), bin.to_path_buf(), flags));
    }
    Ok(slots)
}

/// What the workload and the faults did.
struct Played {
    /// Where each event of the plan was written (`None`: not published).
    positions: Vec<Option<(i32, i64)>>,
    workload_took: Duration,
    fault_log: Vec<FaultRecord>,
    faults_took: Duration,
}

/// Plays the workload, injects the scheduled faults and watches the workers (restarting
/// any that died, logging progress), all at once, from `ctx.start`. A fault that could
/// not be carried out stops the workload and is the error.
async fn play(
    cfg: &NemesisConfig,
    ctx: &FaultCtx<'_>,
    plan: &workload::Plan,
    schedule: &[FaultKind],
    fault_rng: &mut Rng,
    collector: &crate::harness::ResultCollector,
) -> anyhow::Result<Played> {
    let published = AtomicUsize::new(0);
    let stop_workload = CancellationToken::new();
    let done = CancellationToken::new();
    let start = ctx.start;
    let workload = async {
        let r = workload::play(
            &ctx.env.kafka,
            &ctx.env.topics.orders,
            &plan.events,
            start,
            &published,
            &stop_workload,
        )
        .await;
        (r, start.elapsed())
    };
    let main = async {
        let r = tokio::join!(
            workload,
            inject_all(cfg, ctx, schedule, fault_rng, &stop_workload)
        );
        done.cancel();
        r
    };
    let (((played, workload_took), (fault_result, fault_log, faults_took)), ()) = tokio::join!(
        main,
        watchdog(ctx, collector, plan.events.len(), &published, &done)
    );
    fault_result?;
    Ok(Played {
        positions: played?,
        workload_took,
        fault_log,
        faults_took,
    })
}

/// Injects the scheduled faults, after the warm-up and with the configured gaps. A fault
/// that could not be carried out stops the workload (`stop_workload`) and ends the run of
/// faults with its error. Returns the faults' records and when the last one ended.
async fn inject_all(
    cfg: &NemesisConfig,
    ctx: &FaultCtx<'_>,
    schedule: &[FaultKind],
    fault_rng: &mut Rng,
    stop_workload: &CancellationToken,
) -> (anyhow::Result<()>, Vec<FaultRecord>, Duration) {
    let mut log: Vec<FaultRecord> = Vec::new();
    tokio::time::sleep(cfg.warmup).await;
    for (i, kind) in schedule.iter().enumerate() {
        if i > 0 {
            let gap = fault_rng.range(
                cfg.gap.0.as_millis() as u64,
                cfg.gap.1.as_millis() as u64 + 1,
            );
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        tracing::info!(
            n = i + 1,
            of = schedule.len(),
            fault = kind.label(),
            "nemesis: injecting"
        );
        match ctx.inject(*kind, fault_rng).await {
            Ok(r) => log.push(r),
            Err(e) => {
                stop_workload.cancel();
                return (Err(e), log, ctx.start.elapsed());
            }
        }
    }
    (Ok(()), log, ctx.start.elapsed())
}

/// Until `done`: restarts any worker that died, and logs progress every 10 s.
async fn watchdog(
    ctx: &FaultCtx<'_>,
    collector: &crate::harness::ResultCollector,
    events: usize,
    published: &AtomicUsize,
    done: &CancellationToken,
) {
    let mut last_progress = Instant::now();
    while !done.is_cancelled() {
        tokio::select! {
            _ = done.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        lock(ctx.workers).reap();
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let results: usize = collector.snapshot().values().map(Vec::len).sum();
            tracing::info!(
                elapsed_s = ctx.start.elapsed().as_secs(),
                published = published.load(Ordering::Relaxed),
                of = events,
                results_read = results,
                "nemesis: progress"
            );
        }
    }
}

/// Where each unparseable message of the plan was written, by its index in `plan.junk`.
fn junk_positions(
    plan: &workload::Plan,
    positions: &[Option<(i32, i64)>],
) -> Vec<Option<(i32, i64)>> {
    plan.events
        .iter()
        .zip(positions)
        .filter_map(|(e, p)| match e.kind {
            workload::EventKind::Junk(j) => Some((j, *p)),
            _ => None,
        })
        .fold(vec![None; plan.junk.len()], |mut acc, (j, p)| {
            acc[j] = p;
            acc
        })
}

/// The workers, faults and timings of a run, for its [`Report`].
struct RunRecord {
    run_id: String,
    fault_log: Vec<FaultRecord>,
    worker_starts: usize,
    unexpected_exits: Vec<String>,
    clean_shutdowns: Vec<String>,
    unclean_shutdowns: Vec<String>,
    worker_logs: Vec<String>,
    setup_s: f64,
    workload: Duration,
    faults: Duration,
    drain_s: f64,
    /// First event to idle pipeline.
    end_to_end: Duration,
    check_s: f64,
    total_s: f64,
}

/// The report of a run: the plan's counts, what was observed and found (every violation,
/// the watchdog's included, in `findings`), and the run's record.
fn report(
    cfg: &NemesisConfig,
    plan: &workload::Plan,
    obs: &Observed,
    findings: check::Findings,
    r: RunRecord,
) -> Report {
    let mut violation_counts = BTreeMap::new();
    for v in &findings.violations {
        *violation_counts.entry(v.kind.clone()).or_insert(0) += 1;
    }
    let mut fault_counts = BTreeMap::new();
    for f in &r.fault_log {
        *fault_counts.entry(f.kind.clone()).or_insert(0) += 1;
    }
    let count = |e: workload::Expect| plan.orders.iter().filter(|o| o.expect == e).count();
    Report {
        run_id: r.run_id,
        seed: cfg.seed,
        orders: plan.orders.len(),
        valid_orders: count(workload::Expect::Valid),
        invalid_orders: count(workload::Expect::Invalid),
        unknown_product_orders: count(workload::Expect::UnknownProduct(workload::MISSING_PRODUCT)),
        junk_messages: plan.junk.len(),
        products: plan.stock.len() - 1,
        initial_hot_stock: plan.stock.get(&workload::HOT).copied().unwrap_or(0),
        events: plan.event_counts(),
        events_total: plan.events.len(),
        outcomes: findings.outcomes,
        result_messages: obs.result_messages,
        dead_letters: obs.dlq.len(),
        ledger: findings.ledger,
        lifecycle: findings.lifecycle,
        limits: findings.limits,
        customers: cfg.customers,
        faults: fault_counts,
        fault_log: r.fault_log,
        worker_starts: r.worker_starts,
        unexpected_exits: r.unexpected_exits,
        clean_shutdowns: r.clean_shutdowns,
        unclean_shutdowns: r.unclean_shutdowns,
        worker_logs: r.worker_logs,
        violations: findings.violations,
        violation_counts,
        setup_s: r.setup_s,
        workload_s: r.workload.as_secs_f64(),
        faults_s: r.faults.as_secs_f64(),
        drain_s: r.drain_s,
        check_s: r.check_s,
        total_s: r.total_s,
        orders_per_s: plan.orders.len() as f64 / r.workload.as_secs_f64().max(0.001),
        end_to_end_orders_per_s: plan.orders.len() as f64 / r.end_to_end.as_secs_f64().max(0.001),
    }
}

/// Waits until every worker runs, no reservation is open or unannounced, and every group
/// has committed the end of its input topics (twice in a row, with the ends unchanged).
/// On timeout, the last state seen.
async fn wait_idle(
    env: &TestEnv,
    workers: &Mutex<Supervisor>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let pg = format!("t-{}-producer", env.id);
    let cg = format!("t-{}-consumer", env.id);
    let mut last_ends: Option<Vec<i64>> = None;
    let mut last_log = Instant::now();
    loop {
        let running = {
            let mut sup = lock(workers);
            sup.reap();
            sup.all_running()
        };
        let open: Result<(i64, i64), sqlx::Error> = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'reserved'), count(*) FILTER (WHERE NOT announced) FROM order_ledger",
        )
        .fetch_one(&env.pool)
        .await;
        let lag = (|| -> Result<(i64, Vec<i64>), rdkafka::error::KafkaError> {
            let mut lag = 0;
            let mut ends = Vec::new();
            for (group, topic) in [
                (&pg, &env.topics.orders),
                (&pg, &env.topics.compensate),
                (&cg, &env.topics.deduct),
            ] {
                let end = stock_devkit::topics::end_offsets(&env.kafka, topic)?;
                let committed = stock_devkit::topics::committed_offsets(&env.kafka, group, topic)?;
                lag += end
                    .iter()
                    .zip(&committed)
                    .map(|(e, c)| (e - c).max(0))
                    .sum::<i64>();
                ends.extend(end);
            }
            Ok((lag, ends))
        })();
        match (&open, &lag) {
            (Ok((0, 0)), Ok((0, ends))) if running => {
                if last_ends.as_ref() == Some(ends) {
                    return Ok(());
                }
                last_ends = Some(ends.clone());
            }
            _ => last_ends = None,
        }
        let state = format!(
            "workers running: {running}; (reserved, unannounced): {:?}; lag: {:?}",
            open.as_ref().map_err(ToString::to_string),
            lag.as_ref().map(|l| l.0).map_err(ToString::to_string)
        );
        if Instant::now() >= deadline {
            return Err(state);
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(%state, "nemesis: waiting for the pipeline to go idle");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads everything the checker looks at.
async fn observe(
    env: &TestEnv,
    plan: &workload::Plan,
    junk_positions: Vec<Option<(i32, i64)>>,
) -> anyhow::Result<Observed> {
    let mut obs = Observed {
        orders_topic: env.topics.orders.clone(),
        junk_positions,
        ..Default::default()
    };
    let mut outcomes: HashMap<String, Vec<StockResult>> = HashMap::new();
    let (mut messages, mut unparsed) = (0usize, 0usize);
    stock_devkit::topics::read_to_end(&env.kafka, &env.topics.results, |m| {
        messages += 1;
        match m.payload().map(serde_json::from_slice::<StockResult>) {
            Some(Ok(r)) => outcomes.entry(r.order_id.clone()).or_default().push(r),
            _ => unparsed += 1,
        }
    })
    .await?;
    obs.outcomes = outcomes;
    obs.result_messages = messages;
    obs.unparsed_results = unparsed;

    let mut dlq = Vec::new();
    stock_devkit::topics::read_to_end(&env.kafka, &env.topics.dlq, |m| {
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                headers.insert(
                    hd.key.to_owned(),
                    hd.value
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        dlq.push(DlqMsg {
            key: m
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
        });
    })
    .await?;
    obs.dlq = dlq;

    (obs.ledger, obs.movements) = read_ledger_and_history(&env.pool).await?;
    obs.stock = stockctl::admin::stock_rows(&env.pool, &[]).await?;
    let products: Vec<i64> = plan.stock.keys().copied().collect();
    // A read can time out once after a Redis Cluster node was killed (the connection is
    // then replaced): retried, as an operator would.
    let mut attempt = 0;
    let (invariants, loaded) = loop {
        attempt += 1;
        let read = async {
            let v = stockctl::admin::check_invariants(&env.pool, &env.store, &products).await?;
            let loaded = env.store.is_loaded().await?;
            Ok::<_, anyhow::Error>((v, loaded))
        };
        match read.await {
            Ok(r) => break r,
            Err(e) if attempt < 5 => {
                tracing::warn!(attempt, error = %e, "reading the stores failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    };
    obs.invariants = invariants;
    obs.redis_loaded = loaded;
    obs.limits = observe_limits(env, &plan.limits).await?;
    Ok(obs)
}

/// The limits and counts of both stores once idle, and `stockctl`'s limit drift check.
async fn observe_limits(
    env: &TestEnv,
    limits: &BTreeMap<i64, i64>,
) -> anyhow::Result<check::LimitsObserved> {
    let mut out = check::LimitsObserved {
        pg_limits: stock_common::pg_store::all_limits(&env.pool)
            .await?
            .into_iter()
            .map(|l| (l.product_id, l.per_customer))
            .collect(),
        pg_units: customer_units(&env.pool).await?,
        ..Default::default()
    };
    for &p in limits.keys() {
        let b = env.store.buyers(p).await?;
        out.redis.insert(
            p,
            b.map(|b| (b.per_customer, b.units.into_iter().collect())),
        );
    }
    out.drift = stockctl::limits::drift(&env.pool, &env.store)
        .await?
        .into_iter()
        .map(|d| format!("product {}: {}", d.product_id, d.what))
        .collect();
    Ok(out)
}

/// Every `customer_units` row above 0.
async fn customer_units(pool: &sqlx::PgPool) -> Result<BTreeMap<check::Buyer, i64>, sqlx::Error> {
    let rows: Vec<(i64, String, i64)> =
        sqlx::query_as("SELECT product_id, customer_id, units FROM customer_units WHERE units > 0")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(p, c, n)| ((p, c), n)).collect())
}

/// Samples every customer's count of the limited products, in PostgreSQL
/// (`customer_units`) and in Redis (each product's buyers hash), once a second until
/// `stop`, keeping the highest count each customer reached; a sample a fault prevents
/// (a store down) is counted as failed and skipped.
///
/// Why sampling the stores is the right observation: a count above a limit can only be
/// one that a decision put there, and both stores change a count only where the decision
/// is made, atomically with it. PostgreSQL's counts change only in the transaction that
/// changes the orders (the consumer's batch, the expiry sweep), under the product's
/// `stock` row lock, after the rule was checked under that lock; a reader sees committed
/// states only. Redis' change only inside the scripts that take or give stock
/// (reserve/hold check the limit and increment in the same script; restore/release
/// decrement), each atomic. Neither has an intermediate state between the check and the
/// count, so every sample is a state the rule produced, and an overshoot, once there,
/// stays until a release gives the units back (a cancel, the TTL: seconds), long enough for
/// samples a second apart to catch a systematic one; the final state catches what is
/// still held at the end.
async fn sample_limits(
    env: &TestEnv,
    limits: &BTreeMap<i64, i64>,
    stop: &CancellationToken,
) -> check::Sampled {
    let mut s = check::Sampled::default();
    if limits.is_empty() {
        return s;
    }
    let timeout = Duration::from_secs(2);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        match tokio::time::timeout(timeout, customer_units(&env.pool)).await {
            Ok(Ok(rows)) => {
                s.pg_samples += 1;
                check::Sampled::record(&mut s.pg_max, rows);
            }
            _ => s.failed += 1,
        }
        for &p in limits.keys() {
            match tokio::time::timeout(timeout, env.store.buyers(p)).await {
                Ok(Ok(b)) => {
                    s.redis_samples += 1;
                    let units = b.map(|b| b.units).unwrap_or_default();
                    check::Sampled::record(
                        &mut s.redis_max,
                        units.into_iter().map(|(c, n)| ((p, c), n)),
                    );
                }
                _ => s.failed += 1,
            }
        }
    }
    s
}

/// Every `order_ledger` row and every product's element of every `stock_movement` row of
/// the database (`stock_movement_item`).
pub async fn read_ledger_and_history(
    pool: &sqlx::PgPool,
) -> anyhow::Result<(HashMap<String, LedgerRec>, Vec<Mov>)> {
    let mut ledger = HashMap::new();
    let mut movements = Vec::new();
    let rows = sqlx::query(
        "SELECT order_id, status, reject_reason, reject_product, release_reason, items::text, announced, customer_id
         FROM order_ledger",
    )
    .fetch_all(pool)
    .await?;
    for r in rows {
        let id: String = r.try_get(0)?;
        let items: Vec<Item> = serde_json::from_str(r.try_get::<&str, _>(5)?)?;
        ledger.insert(
            id,
            LedgerRec {
                status: r.try_get(1)?,
                reject_reason: r.try_get(2)?,
                reject_product: r.try_get(3)?,
                release_reason: r.try_get(4)?,
                items,
                announced: r.try_get(6)?,
                customer_id: r.try_get(7)?,
            },
        );
    }
    let rows = sqlx::query(
        "SELECT product_id, kind, ref, quantity, available_delta, reserved_delta, sold_delta, orders::bigint
         FROM stock_movement_item",
    )
    .fetch_all(pool)
    .await?;
    for r in rows {
        movements.push(Mov {
            product_id: r.try_get(0)?,
            kind: r.try_get(1)?,
            reference: r.try_get(2)?,
            quantity: r.try_get(3)?,
            available: r.try_get(4)?,
            reserved: r.try_get(5)?,
            sold: r.try_get(6)?,
            orders: r.try_get(7)?,
        });
    }
    Ok((ledger, movements))
}
