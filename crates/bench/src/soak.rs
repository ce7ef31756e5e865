//! `bench soak`: the whole pipeline under a steady paced load for a long time (`--duration`,
//! e.g. 60m, at `--rate` orders/s, open loop in 10 ms ticks), with figures per window
//! (`--window`, default 10m): orders/s offered and achieved, p50/p99 publish-to-outcome
//! latency, CPU µs per order of each process ([`cpu::PerOrder`]), each worker's and the
//! bench's resident memory (VmRSS, the mean and the peak of one sample a second),
//! PostgreSQL's `order_ledger` and `stock_movement` sizes
//! (`pg_total_relation_size`), autovacuum and autoanalyze runs (deltas of
//! `pg_stat_user_tables`, every table of the run's database), PostgreSQL checkpoints
//! (`pg_stat_bgwriter`), Redis `used_memory` and the forks Redis made (`total_forks`: an
//! RDB snapshot or an AOF rewrite, each a copy of the whole dataset), the usual suspects
//! when a window's p99 rises; and the limit the p99 is held against, measured in the same
//! window: the wait of the services' volume (`STACK_DIR`) for a 4 KiB write and
//! `fdatasync` ([`crate::disk_probe`]), which Redis and PostgreSQL make before they answer,
//! and the kernel's pressure stall figures ([`Pressure`]: the share of the window in which
//! tasks waited for the disk or for memory). Whether the pipeline holds steady: the first
//! and the last window compared (PostgreSQL CPU per order, p99, each worker's mean RSS),
//! within ±25% ([`TOLERANCE`]). `--pause` stops publishing for a while and then sends the
//! backlog at once, to see each worker's memory come back down after a burst.
//!
//! The workers run as processes (as in `bench e2e`; `--in-process` for tasks), their logs
//! in `<out>/logs`. Output: the windows as a Markdown table and JSON lines on stdout, and
//! `<out>/soak.md` and `<out>/soak.svg` (rate, latency and CPU per order over time).
//!
//! The load is generated as it is sent (order `s-<n>` is a pure function of the seed and
//! n), and the results are tracked in one byte per order (its first outcome, whether it
//! came twice or conflicting), plus the send time of each 10 ms tick and the latencies of
//! the current window: unlike `bench e2e`'s collector (every result, every arrival time
//! and every order id kept), memory grows by about one byte per order. The end-of-run
//! checks are `bench e2e`'s: every order exactly one outcome, the stock invariants, and
//! PostgreSQL's reserved units equal to those of the orders reported reserved.
//!
//! Stock: by default `--fill` 1.2 of the expected demand of each product over the whole
//! run, so that no product sells out and the load is the same in the last window as in
//! the first. Reservations are not released within the run (the consumers'
//! `--reservation-ttl` is set beyond it) unless `--reservation-ttl` says otherwise; a
//! release is then a second result allowed after `reserved`.

use crate::chart::{Panel, Series, TimeChart};
use crate::collector;
use crate::cpu::{self, CpuSample, CpuUse, PerOrder};
use crate::disk_probe::DiskProbe;
use crate::e2e;
use crate::env::{PipelineEnv, Stack};
use crate::load::{Order, HOT_PRODUCT};
use crate::report::{self, json_line, thousands, yes_no, LatencyHistogram, LatencyMs, Table};
use crate::workers::{self, Workers};
use anyhow::{bail, ensure, Context, Result};
use rdkafka::producer::FutureProducer;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use stock_common::config::{parse_duration, BatchArgs};
use stock_common::events::{Item, Reason, Status, StockResult};
use stock_common::kafka::OutMessage;
use stock_devkit::harness;
use stock_devkit::rng::Rng;
use stock_devkit::worker_args::{self, Worker};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The first and last window are "steady" when each compared figure is within this share.
pub const TOLERANCE: f64 = 0.25;

#[derive(clap::Args, Clone, Debug)]
pub struct SoakArgs {
    /// How long to publish, e.g. 60m.
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Orders per second, published open loop in 10 ms ticks.
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Instead of `--rate`: this share of the maximum rate, measured first in the same run
    /// by `bench e2e --mode stream` (`--max-orders` orders published at once, the same
    /// workers, partitions, batching, products and stock share). 0.5 is issue 12's goal 4,
    /// half the maximum rate, which holds on a box whose speed swings 2-3x.
    #[arg(long, value_parser = e2e::parse_share, conflicts_with = "rate")]
    pub of_max: Option<f64>,
    /// Orders of the maximum-rate measurement of `--of-max`.
    #[arg(long, default_value_t = 300_000)]
    pub max_orders: usize,
    /// Length of each reported window (the last one may be shorter), e.g. 10m; 1m for a
    /// short run (`--duration 3m --window 1m`).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub window: Duration,
    /// Directory for soak.md, soak.svg and the workers' logs; default
    /// bench-out/soak-<timestamp>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Products on sale, ids 1 to N; product 1 is the hot SKU.
    #[arg(long, default_value_t = 1000)]
    pub products: i64,
    /// Share of orders (0 to 1) for the hot SKU; the others spread evenly over the rest.
    #[arg(long, default_value_t = 0.1)]
    pub hot_share: f64,
    /// Initial units of every product. Default: `--fill` of each product's expected demand.
    #[arg(long)]
    pub stock: Option<i64>,
    /// Without `--stock`: stock as a share of each product's expected demand over the run
    /// (above 1: nothing sells out, the load stays the same).
    #[arg(long, default_value_t = 1.2)]
    pub fill: f64,
    #[command(flatten)]
    pub pipeline: e2e::PipelineArgs,
    /// Producer workers and consumer workers (each kind in one group).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Longest wait for the last outcomes once publishing stopped.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Seed of the order load.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The consumers' reservation TTL; default: beyond the run (no reservation expires).
    #[arg(long, value_parser = parse_duration)]
    pub reservation_ttl: Option<Duration>,
    /// Run the workers as tasks of the bench process (their CPU counted with the bench's).
    #[arg(long)]
    pub in_process: bool,
    /// How long the disk probe measures the services' volume with the stack idle, before
    /// publishing (0s: not at all): the disk's own stalls, apart from the run's writes.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub disk_idle: Duration,
    /// Start even if the local stack's volume (`STACK_DIR`) has less free space than the
    /// run is expected to keep (`disk_need`).
    #[arg(long)]
    pub skip_disk_check: bool,
    /// How long the run's topics keep their messages (`retention.ms`, segments rolled
    /// every half of it); 0s: the broker's default (a week). The checks read the tracker
    /// and the tables, never the topics again; a worker that falls further behind than
    /// this loses orders, which the checks then count as missing.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub topic_retention: Duration,
    /// Stop publishing for a while and then send what fell due at once, e.g. `100s+5s`
    /// (from 100 s into the run, for 5 s): the burst a stalled client or a flash sale's
    /// opening sends, after which each worker's memory should come back down.
    #[arg(long, value_parser = parse_pause)]
    pub pause: Option<Pause>,
}

/// `--pause`: publishing stops `at` into the run for `len`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pause {
    pub at: Duration,
    pub len: Duration,
}

impl Pause {
    fn holds(&self, elapsed: Duration) -> bool {
        elapsed >= self.at && elapsed < self.at + self.len
    }
}

/// Parses `AT+LEN`, two durations (`100s+5s`).
fn parse_pause(s: &str) -> Result<Pause, String> {
    let (at, len) = s
        .split_once('+')
        .ok_or_else(|| format!("{s:?}: expected AT+LEN, e.g. 100s+5s"))?;
    Ok(Pause {
        at: parse_duration(at)?,
        len: parse_duration(len)?,
    })
}

/// Disk one soak order takes in PostgreSQL and Redis on the local stack, rounded up: its
/// ledger row, index entries, history share and WAL, and its record in Redis's AOF.
/// Measured at 12,000 orders/s (issue 12): PostgreSQL 1.3 GB and Redis 0.2 GB every
/// 5 minutes (420 bytes an order); at 22,000/s PostgreSQL wrote 29 GB an hour (370).
pub const STORE_DISK_PER_ORDER: u64 = 480;
/// Disk one soak order takes in Kafka while its topics keep it: its three messages.
/// Measured at 12,000 orders/s: 1.1 GB every 5 minutes (305 bytes an order); a soak of
/// session 14, with the broker's week-long retention, ran out of disk at minute 52.
pub const KAFKA_DISK_PER_ORDER: u64 = 320;
/// The broker's `log.retention.check.interval.ms` (deploy/kafka/server.properties): how
/// long past its retention a closed segment may wait for deletion.
const RETENTION_CHECK: Duration = Duration::from_secs(300);

/// The bytes a run of `orders` at `rate` orders/s keeps on the stack's volume at most:
/// every order in PostgreSQL and Redis, and in Kafka the orders of the topics' retention
/// (1.5 x `retention` plus the broker's check interval, [`crate::env::retention_config`]), or
/// all of them without one (the broker's default, longer than any run).
fn disk_need(orders: usize, rate: u64, retention: Option<Duration>) -> u64 {
    let orders = orders as u64;
    let in_kafka = match retention {
        None => orders,
        Some(retention) => {
            let kept = retention.mul_f64(1.5) + RETENTION_CHECK;
            orders.min((rate as f64 * kept.as_secs_f64()).ceil() as u64)
        }
    };
    orders * STORE_DISK_PER_ORDER + in_kafka * KAFKA_DISK_PER_ORDER
}

/// Refuses a run the local stack's volume cannot hold: when the services write under
/// `STACK_DIR` (deploy/env.sh) on this machine, its free space must cover `need` bytes
/// ([`disk_need`]). A full volume stops the broker ("No space left on device") and
/// Redis (`appendfsync always` exits on a failed AOF write) midway, and the run's figures
/// are lost. Without `STACK_DIR` (services elsewhere) nothing is checked.
fn check_disk(stack_dir: Option<PathBuf>, orders: usize, need: u64) -> Result<()> {
    let Some(dir) = stack_dir else {
        println!("soak: STACK_DIR not set; the services' free disk is not checked");
        return Ok(());
    };
    let free = free_bytes(&dir).with_context(|| {
        format!(
            "free space of {} (STACK_DIR; --skip-disk-check to start anyway)",
            dir.display()
        )
    })?;
    let gb = |b: u64| b as f64 / 1e9;
    ensure!(
        free >= need,
        "this run keeps about {:.1} GB ({} orders in PostgreSQL and Redis, and Kafka's for \
         --topic-retention) but the volume of {} has {:.1} GB free: lower --rate, --duration or \
         --topic-retention, free space, or pass --skip-disk-check",
        gb(need),
        thousands(orders as f64),
        dir.display(),
        gb(free)
    );
    println!(
        "soak: about {:.1} GB to write, {:.1} GB free under {}",
        gb(need),
        gb(free),
        dir.display()
    );
    Ok(())
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `st` a buffer of the right type,
    // which statvfs fills when it returns 0.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: filled by the successful call above.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail * st.f_frsize)
}

/// The shape of the load: order `n` is a pure function of it and `n`.
#[derive(Debug, Clone, Copy)]
struct Shape {
    seed: u64,
    products: i64,
    hot_share: f64,
    max_quantity: i64,
}

impl Shape {
    /// Product and quantity of order `n`.
    fn item(&self, n: usize) -> Item {
        let mut rng = Rng::new(self.seed).fork(n as u64);
        let product_id = if self.products <= 1 || rng.unit() < self.hot_share {
            HOT_PRODUCT
        } else {
            rng.range(2, self.products as u64 + 1) as i64
        };
        Item {
            product_id,
            quantity: rng.range(1, self.max_quantity.max(1) as u64 + 1) as i64,
        }
    }

    /// The stock of each product: `fill` of its expected demand over `orders` orders.
    fn stock(&self, orders: f64, fill: f64) -> BTreeMap<i64, i64> {
        let mean_q = (1.0 + self.max_quantity.max(1) as f64) / 2.0;
        (1..=self.products)
            .map(|p| {
                let share = if self.products <= 1 {
                    1.0
                } else if p == HOT_PRODUCT {
                    self.hot_share
                } else {
                    (1.0 - self.hot_share) / (self.products - 1) as f64
                };
                (p, (orders * share * mean_q * fill).ceil().max(1.0) as i64)
            })
            .collect()
    }
}

/// One order's results, in a byte: its first outcome and what came after.
mod bits {
    pub const NONE: u8 = 0;
    pub const RESERVED: u8 = 1;
    pub const REJECTED: u8 = 2;
    /// Any other first result (unexpected: counted as a conflict).
    pub const OTHER: u8 = 3;
    pub const STATUS: u8 = 0b11;
    pub const DUPLICATE: u8 = 0b100;
    pub const CONFLICT: u8 = 0b1000;
    pub const RELEASED: u8 = 0b1_0000;
}

/// What the result reader keeps: bounded by one byte per order, the ticks' send times and
/// the current window's latencies.
#[derive(Default)]
struct Tracker {
    /// Per order `s-<n>` published so far.
    main: Vec<u8>,
    /// Per warm-up order `warmup-<n>`.
    warm: Vec<u8>,
    /// (first order of a tick, when the tick handed it to the Kafka client), ascending.
    ticks: Vec<(usize, Instant)>,
    /// First outcomes of main orders read so far.
    firsts: usize,
    /// Latencies (µs) of the first outcomes read since the last [`Tracker::take_window`].
    window_us: Vec<u32>,
    /// The same outcomes' time from the send to their publication by the consumer worker
    /// (the result's Kafka timestamp, set as the worker hands it to its Kafka client).
    window_published_us: Vec<u32>,
    /// Every first outcome of the run, the windows' and those read after the last window
    /// closed (the drain): goal 4's figure is the whole run's p99.
    run_us: LatencyHistogram,
    /// The same, to the outcomes' publication.
    run_published_us: LatencyHistogram,
    unparsed: usize,
    unexpected: usize,
}

impl Tracker {
    /// When order `n` was sent (its tick).
    fn sent_at(&self, n: usize) -> Option<Instant> {
        let i = self.ticks.partition_point(|(first, _)| *first <= n);
        Some(self.ticks.get(i.checked_sub(1)?)?.1)
    }

    /// `r` read at `now`; `published`: when the consumer worker published it (its Kafka
    /// timestamp), when known.
    fn record(&mut self, r: &StockResult, now: Instant, published: Option<Instant>) {
        let (slot, main) = if let Some(n) = r.order_id.strip_prefix("s-") {
            (n.parse::<usize>().ok(), true)
        } else if let Some(n) = r.order_id.strip_prefix("warmup-") {
            (n.parse::<usize>().ok(), false)
        } else {
            (None, false)
        };
        let states = if main { &mut self.main } else { &mut self.warm };
        let Some(state) = slot.and_then(|n| states.get_mut(n)) else {
            self.unexpected += 1;
            return;
        };
        let status = match (r.status, r.reason) {
            (Status::Reserved, _) => bits::RESERVED,
            (Status::Rejected, Some(Reason::InsufficientStock)) => bits::REJECTED,
            _ => bits::OTHER,
        };
        let first = *state & bits::STATUS;
        if first == bits::NONE {
            *state |= status;
            if main {
                self.firsts += 1;
                let sent = slot.and_then(|n| self.sent_at(n));
                if let Some(sent) = sent {
                    let us = |t: Instant| {
                        u32::try_from(t.saturating_duration_since(sent).as_micros())
                            .unwrap_or(u32::MAX)
                    };
                    let read = us(now);
                    self.window_us.push(read);
                    self.run_us.record(read);
                    if let Some(p) = published {
                        let p = us(p);
                        self.window_published_us.push(p);
                        self.run_published_us.record(p);
                    }
                }
            }
        } else if r.status == Status::Released && first == bits::RESERVED {
            *state |= bits::RELEASED;
        } else if status == first {
            *state |= bits::DUPLICATE;
        } else {
            *state |= bits::CONFLICT;
        }
    }

    /// The latencies of the window that ends now: to the outcome read, and to its
    /// publication.
    fn take_window(&mut self) -> (Vec<u32>, Vec<u32>) {
        (
            std::mem::take(&mut self.window_us),
            std::mem::take(&mut self.window_published_us),
        )
    }
}

type Shared = Arc<Mutex<Tracker>>;

fn lock(t: &Shared) -> MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads `stock.results` into the tracker until `stop`.
async fn read_results(
    consumer: rdkafka::consumer::StreamConsumer,
    tracker: Shared,
    stop: CancellationToken,
) {
    // Kafka timestamps are wall-clock milliseconds: mapped onto this reader's clock.
    let clock = WallClock::now();
    collector::receive_results(&consumer, &stop, "soak result reader", |parsed, now, ts| {
        let mut t = lock(&tracker);
        match parsed {
            Some(Ok(r)) => t.record(&r, now, ts.and_then(|ms| clock.instant(ms))),
            _ => t.unparsed += 1,
        }
    })
    .await;
}

/// A wall-clock reading and the [`Instant`] it was taken at, to place wall-clock
/// milliseconds (Kafka timestamps) on the monotonic clock.
struct WallClock {
    at: Instant,
    unix_ms: i64,
}

impl WallClock {
    fn now() -> WallClock {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        WallClock {
            at: Instant::now(),
            unix_ms,
        }
    }

    /// `unix_ms` on the monotonic clock (`None` for a time before 1970).
    fn instant(&self, unix_ms: i64) -> Option<Instant> {
        let d = unix_ms.checked_sub(self.unix_ms)?;
        let magnitude = Duration::from_millis(d.unsigned_abs());
        if d >= 0 {
            self.at.checked_add(magnitude)
        } else {
            self.at.checked_sub(magnitude)
        }
    }
}

/// Publishing's counters, shared with the delivery-report tasks.
#[derive(Default)]
struct Sent {
    delivered: AtomicUsize,
    failed: AtomicUsize,
}

/// How the publisher paces: `rate` orders/s, and nothing sent during `pause`.
#[derive(Clone, Copy, Debug)]
struct Pace {
    rate: u64,
    pause: Option<Pause>,
}

/// Publishes `total` orders at `pace.rate` orders/s from `start`, in 10 ms ticks, each
/// tick's send time in the tracker; delivery reports are checked by a task per tick. During
/// `pace.pause` nothing is sent; the first tick after it sends everything that fell due.
async fn publish(
    producer: FutureProducer,
    topic: String,
    shape: Shape,
    pace: Pace,
    total: usize,
    tracker: Shared,
    sent: Arc<Sent>,
) -> Result<()> {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let never = CancellationToken::new();
    let mut next = 0usize;
    while next < total {
        tick.tick().await;
        let now = Instant::now();
        if pace.pause.is_some_and(|p| p.holds(now - start)) {
            continue;
        }
        let due = ((now - start).as_secs_f64() * pace.rate as f64) as usize;
        let end = due.min(total);
        if end <= next {
            continue;
        }
        {
            let mut t = lock(&tracker);
            t.main.resize(end, bits::NONE);
            t.ticks.push((next, now));
        }
        let out: Vec<OutMessage> = (next..end)
            .map(|n| {
                let id = format!("s-{n}");
                let payload = harness::created(&id, &[shape.item(n)]);
                OutMessage::keyed(&topic, id, payload)
            })
            .collect();
        next = end;
        let deliveries = stock_common::kafka::enqueue_all(&producer, &out, &never)
            .await
            .context("publishing orders")?;
        let sent = sent.clone();
        tokio::spawn(async move {
            for d in deliveries {
                let error = match d.await {
                    Ok(Ok(_)) => {
                        sent.delivered.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Err((e, _))) => e.to_string(),
                    Err(_) => "the delivery report was dropped".to_owned(),
                };
                // The first few say why; the check counts them all.
                if sent.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    tracing::warn!(%error, "an order's delivery failed");
                }
            }
        });
    }
    // The producer is dropped with this task, and dropping it purges what it still holds
    // (`Purged in queue` / `in flight`: orders counted as published that never were): every
    // delivery report comes in first. The client retries until the broker has each one.
    let deadline = Instant::now() + DELIVERY_WAIT;
    loop {
        let reported = sent.delivered.load(Ordering::Relaxed) + sent.failed.load(Ordering::Relaxed);
        if reported >= total {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{} orders had no delivery report {DELIVERY_WAIT:?} after the last was published",
            total - reported
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long the publisher waits for its last delivery reports.
const DELIVERY_WAIT: Duration = Duration::from_secs(120);

/// PostgreSQL's figures at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PgStats {
    /// `pg_total_relation_size` of `order_ledger` and `stock_movement`, bytes.
    pub sizes: BTreeMap<String, i64>,
    /// `autovacuum_count` and `autoanalyze_count` summed over the database's tables.
    pub autovacuum: i64,
    pub autoanalyze: i64,
    /// Checkpoints of the server so far (timed and requested).
    pub checkpoints: i64,
}

async fn pg_stats(pool: &sqlx::PgPool) -> Result<PgStats> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT relname::text, pg_total_relation_size(relid), autovacuum_count, autoanalyze_count
         FROM pg_stat_user_tables",
    )
    .fetch_all(pool)
    .await
    .context("reading pg_stat_user_tables")?;
    let mut s = PgStats::default();
    for (name, size, av, aa) in rows {
        if name == "order_ledger" || name == "stock_movement" {
            s.sizes.insert(name, size);
        }
        s.autovacuum += av;
        s.autoanalyze += aa;
    }
    s.checkpoints =
        sqlx::query_scalar("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
            .fetch_one(pool)
            .await
            .context("reading pg_stat_bgwriter")?;
    Ok(s)
}

/// Redis's figures at one instant (INFO memory and stats).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RedisStats {
    /// `used_memory`, bytes.
    pub used: u64,
    /// `total_forks` so far.
    pub forks: u64,
}

async fn redis_stats(env: &PipelineEnv) -> Result<RedisStats> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .arg("stats")
        .query_async(&mut env.redis.store.connection())
        .await
        .context("Redis INFO memory stats")?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .with_context(|| format!("no {name} in Redis INFO"))
    };
    Ok(RedisStats {
        used: field("used_memory")?,
        forks: field("total_forks")?,
    })
}

/// The kernel's pressure stall counters (`/proc/pressure/io` and `/memory`, PSI): µs
/// in which some task, or every non-idle task at once ("full"), waited for the disk or for
/// memory. A window's p99 that follows its disk waits can be told apart from one that
/// follows memory reclaim.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    pub io_some: u64,
    pub io_full: u64,
    pub memory_some: u64,
    pub memory_full: u64,
}

impl Pressure {
    /// `None` where the kernel has no PSI (before 4.20, or `psi=0`).
    fn read() -> Option<Pressure> {
        let io = std::fs::read_to_string("/proc/pressure/io").ok()?;
        let memory = std::fs::read_to_string("/proc/pressure/memory").ok()?;
        Some(Pressure {
            io_some: psi_total(&io, "some")?,
            io_full: psi_total(&io, "full")?,
            memory_some: psi_total(&memory, "some")?,
            memory_full: psi_total(&memory, "full")?,
        })
    }
}

/// The `total=` (µs) of a PSI file's `some` or `full` line.
fn psi_total(text: &str, kind: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(kind))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// A window's share of time (%) under pressure, from two [`Pressure`] readings.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PressurePct {
    pub io_some: f64,
    pub io_full: f64,
    pub memory_some: f64,
    pub memory_full: f64,
}

impl PressurePct {
    fn between(before: &Pressure, after: &Pressure, secs: f64) -> PressurePct {
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 / (secs * 1e6) * 100.0;
        PressurePct {
            io_some: pct(after.io_some, before.io_some),
            io_full: pct(after.io_full, before.io_full),
            memory_some: pct(after.memory_some, before.memory_some),
            memory_full: pct(after.memory_full, before.memory_full),
        }
    }
}

/// Everything read at a window's boundary.
struct Snapshot {
    at: Instant,
    cpu: CpuSample,
    published: usize,
    firsts: usize,
    pg: PgStats,
    redis: RedisStats,
    pressure: Option<Pressure>,
}

/// The figures of one window (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub bench: &'static str,
    pub window: usize,
    /// Seconds from the start of publishing.
    pub from_s: f64,
    pub to_s: f64,
    pub published: usize,
    /// First outcomes of orders read in the window.
    pub outcomes: usize,
    pub offered_rate: f64,
    pub rate: f64,
    /// Publish to first outcome of the outcomes read in the window.
    pub latency_ms: LatencyMs,
    /// The same outcomes, publish to the consumer worker publishing the outcome (its Kafka
    /// timestamp): the pipeline's share of `latency_ms`, without the results topic's
    /// delivery to the reader. `None` when no result carried a timestamp.
    pub published_ms: Option<LatencyMs>,
    pub cpu_us_per_order: PerOrder,
    /// VmRSS of each worker process and of the bench, MiB: the mean of the window's
    /// samples (one a second). A worker's RSS swings by a fifth within seconds (batch
    /// buffers, the allocator returning pages), so one reading at the window's end would
    /// judge that swing rather than the window.
    pub rss_mib: BTreeMap<String, f64>,
    /// The largest of those samples, MiB.
    pub rss_max_mib: BTreeMap<String, f64>,
    /// `order_ledger` and `stock_movement` at the window's end, MiB.
    pub pg_mib: BTreeMap<String, f64>,
    pub autovacuum: i64,
    pub autoanalyze: i64,
    pub pg_checkpoints: i64,
    pub redis_used_mib: f64,
    /// Forks Redis made in the window (snapshots, AOF rewrites).
    pub redis_forks: u64,
    /// The volume's own wait for a 4 KiB write and `fdatasync` ([`disk_probe`]), the
    /// limit of the window's latency; `None` without `STACK_DIR`.
    pub disk_sync_ms: Option<LatencyMs>,
    /// The share of the window in which tasks waited for the disk or for memory (PSI);
    /// `None` without `/proc/pressure`.
    pub pressure_pct: Option<PressurePct>,
}

/// A window's counters, before they are turned into [`Window`].
pub struct WindowInput {
    pub index: usize,
    pub from_s: f64,
    pub to_s: f64,
    pub published: usize,
    pub outcomes: usize,
    pub latencies_us: Vec<u32>,
    /// The same outcomes' publish to publication of the outcome (µs).
    pub published_us: Vec<u32>,
    pub cpu: CpuUse,
    /// VmRSS samples (bytes) of each process in the window.
    pub rss: BTreeMap<String, Vec<u64>>,
    pub pg_before: PgStats,
    pub pg_after: PgStats,
    pub redis_before: RedisStats,
    pub redis_after: RedisStats,
    /// The disk probe's waits in the window (µs); `None` without a probe.
    pub disk_sync_us: Option<Vec<u32>>,
    pub pressure_before: Option<Pressure>,
    pub pressure_after: Option<Pressure>,
}

const MIB: f64 = 1024.0 * 1024.0;

/// The p50, p99 and max of latencies in µs, in ms.
pub fn latency_of(us: Vec<u32>) -> LatencyMs {
    report::Latency::of(
        us.into_iter()
            .map(|u| Duration::from_micros(u64::from(u)))
            .collect(),
    )
    .ms()
}

impl Window {
    pub fn of(w: WindowInput) -> Window {
        let secs = (w.to_s - w.from_s).max(1e-9);
        Window {
            bench: "soak",
            window: w.index,
            from_s: w.from_s,
            to_s: w.to_s,
            published: w.published,
            outcomes: w.outcomes,
            offered_rate: w.published as f64 / secs,
            rate: w.outcomes as f64 / secs,
            latency_ms: latency_of(w.latencies_us),
            published_ms: (!w.published_us.is_empty()).then(|| latency_of(w.published_us)),
            cpu_us_per_order: w.cpu.per_order(w.outcomes),
            rss_mib: w
                .rss
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| {
                    let mean = v.iter().map(|&b| b as f64).sum::<f64>() / v.len() as f64;
                    (k.clone(), mean / MIB)
                })
                .collect(),
            rss_max_mib: w
                .rss
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), *v.iter().max()? as f64 / MIB)))
                .collect(),
            pg_mib: w
                .pg_after
                .sizes
                .iter()
                .map(|(k, b)| (k.clone(), *b as f64 / MIB))
                .collect(),
            autovacuum: w.pg_after.autovacuum - w.pg_before.autovacuum,
            autoanalyze: w.pg_after.autoanalyze - w.pg_before.autoanalyze,
            pg_checkpoints: w.pg_after.checkpoints - w.pg_before.checkpoints,
            redis_used_mib: w.redis_after.used as f64 / MIB,
            redis_forks: w.redis_after.forks.saturating_sub(w.redis_before.forks),
            disk_sync_ms: w.disk_sync_us.filter(|v| !v.is_empty()).map(latency_of),
            pressure_pct: w
                .pressure_before
                .zip(w.pressure_after)
                .map(|(b, a)| PressurePct::between(&b, &a, secs)),
        }
    }
}

/// The last window against the first (one JSON line): each ratio last / first.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    pub bench: &'static str,
    pub first: usize,
    pub last: usize,
    pub pg_cpu_per_order: Option<f64>,
    pub p99: Option<f64>,
    /// Each worker process and the bench; the bench's own is shown, not judged (it holds
    /// the result tracker, which grows by a byte per order).
    pub rss: BTreeMap<String, Option<f64>>,
    pub tolerance: f64,
    /// Every ratio within 1 ± tolerance (a missing ratio is not), the bench's RSS aside.
    pub steady: bool,
}

impl Comparison {
    pub fn of(first: &Window, last: &Window) -> Comparison {
        let pg = report::ratio(
            last.cpu_us_per_order.postgres,
            first.cpu_us_per_order.postgres,
        );
        let p99 = report::ratio(last.latency_ms.p99, first.latency_ms.p99);
        let rss: BTreeMap<String, Option<f64>> = first
            .rss_mib
            .iter()
            .map(|(k, f)| {
                let l = last.rss_mib.get(k).copied().unwrap_or(0.0);
                (k.clone(), report::ratio(l, *f))
            })
            .collect();
        let within = |r: &Option<f64>| r.is_some_and(|r| (r - 1.0).abs() <= TOLERANCE);
        let steady = within(&pg)
            && within(&p99)
            && rss
                .iter()
                .filter(|(k, _)| *k != "bench")
                .all(|(_, r)| within(r));
        Comparison {
            bench: "soak-compare",
            first: first.window,
            last: last.window,
            pg_cpu_per_order: pg,
            p99,
            rss,
            tolerance: TOLERANCE,
            steady,
        }
    }

    pub fn describe(&self) -> String {
        let mut parts = vec![
            format!("PG CPU/order {}", report::fmt_ratio(self.pg_cpu_per_order)),
            format!("p99 {}", report::fmt_ratio(self.p99)),
        ];
        parts.extend(
            self.rss
                .iter()
                .map(|(k, r)| format!("RSS {k} {}", report::fmt_ratio(*r))),
        );
        format!(
            "window {} / window {}: {}; within ±{:.0}% (bench RSS aside): {}",
            self.last,
            self.first,
            parts.join(", "),
            100.0 * self.tolerance,
            if self.steady { "yes" } else { "NO" }
        )
    }
}

/// The end-of-run checks and counts (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub bench: &'static str,
    pub workers_placement: &'static str,
    pub rate: u64,
    pub duration_s: f64,
    pub published: usize,
    pub delivery_failures: usize,
    pub reserved: usize,
    pub rejected: usize,
    pub released: usize,
    pub missing: usize,
    pub duplicates: usize,
    pub conflicts: usize,
    pub unexpected: usize,
    pub unparsed: usize,
    pub violations: usize,
    pub reserved_units_match: bool,
    pub complete: bool,
    pub idle: bool,
    /// With `--of-max`: the maximum rate measured first (orders/s), of which `rate` is
    /// the share asked for.
    pub max_rate: Option<f64>,
    /// After the last publish, until the last outcome.
    pub drain_s: f64,
    /// The disk probe's waits with the stack idle, before publishing (`--disk-idle`).
    pub disk_idle_sync_ms: Option<LatencyMs>,
    /// The bytes kept per order by the result tracker, at the end.
    pub tracker_bytes: usize,
    /// p50, p99 and max of every first outcome of the run, the drain after the last window
    /// included (goal 4 reads this p99 for a 10-minute run, whatever `--window`).
    pub run_ms: Option<LatencyMs>,
    /// The same to the outcomes' publication by the consumer worker.
    pub run_published_ms: Option<LatencyMs>,
    pub ok: bool,
}

pub async fn run(stack: &Stack, args: &SoakArgs) -> Result<bool> {
    let mut args = args.clone();
    let max_rate = match args.of_max {
        Some(share) => {
            let max = max_rate(stack, &args).await?;
            args.rate = (max * share).round() as u64;
            println!(
                "soak: the maximum, {} orders/s end to end (bench e2e --mode stream, {} orders); \
                 {share} of it: {} orders/s",
                thousands(max),
                thousands(args.max_orders as f64),
                thousands(args.rate as f64)
            );
            Some(max)
        }
        None => None,
    };
    let args = &args;
    ensure!(args.rate > 0, "--rate must be at least 1");
    ensure!(
        args.duration >= Duration::from_secs(1),
        "--duration must be at least 1s"
    );
    ensure!(
        args.window >= Duration::from_secs(1),
        "--window must be at least 1s"
    );
    ensure!(args.products > 0, "--products must be at least 1");
    ensure!(args.workers > 0, "--workers must be at least 1");
    args.pipeline.check()?;
    ensure!(
        (0.0..=1.0).contains(&args.hot_share),
        "--hot-share must be between 0 and 1"
    );
    let out = match &args.out {
        Some(d) => d.clone(),
        None => PathBuf::from("bench-out").join(format!(
            "soak-{}",
            chrono::Local::now().format("%Y%m%d-%H%M%S")
        )),
    };
    let total = (args.rate as f64 * args.duration.as_secs_f64()).round() as usize;
    // 0s: the broker's default retention.
    let retention = Some(args.topic_retention).filter(|r| !r.is_zero());
    if !args.skip_disk_check {
        check_disk(
            std::env::var_os("STACK_DIR").map(PathBuf::from),
            total,
            disk_need(total, args.rate, retention),
        )?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let logs = out.join("logs");
    let shape = Shape {
        seed: args.seed,
        products: args.products,
        hot_share: args.hot_share,
        max_quantity: args.pipeline.max_quantity,
    };
    let stock = match args.stock {
        Some(n) => (1..=args.products).map(|p| (p, n)).collect(),
        None => shape.stock(total as f64, args.fill),
    };
    let ttl = args
        .reservation_ttl
        .unwrap_or(args.duration + args.timeout + Duration::from_secs(3600));
    println!(
        "soak: {} orders/s for {:?} ({} orders) over {} products (hot share {:.2}), {} units in stock \
         (fill {:.2}), windows of {:?}; {} partitions, batch {} / linger {:?}, {} worker(s) of each kind, \
         reservation TTL {:?}",
        args.rate,
        args.duration,
        thousands(total as f64),
        args.products,
        args.hot_share,
        thousands(stock.values().sum::<i64>() as f64),
        args.fill,
        args.window,
        args.pipeline.partitions,
        args.pipeline.batch_size,
        args.pipeline.linger,
        args.workers,
        ttl,
    );
    if let Some(p) = args.pause {
        println!(
            "soak: publishing pauses {:?} into the run for {:?}, then sends what fell due at once",
            p.at, p.len
        );
    }
    let workers = if args.in_process {
        println!("soak: workers in the bench process (--in-process)");
        Workers::default()
    } else {
        let w = Workers::processes(&logs, "")?;
        println!(
            "soak: workers as processes; their logs in {}",
            logs.display()
        );
        w
    };
    let workers = workers.with_flag(
        Worker::Consumer,
        "--reservation-ttl",
        worker_args::duration(ttl),
    );
    let env = PipelineEnv::create(stack, args.pipeline.partitions, retention).await?;
    let measured = tokio::select! {
        r = measure(&env, args, shape, total, &stock, workers) => r,
        e = workers::interrupted() => e,
    };
    env.cleanup().await;
    let (windows, mut summary) = measured?;
    summary.max_rate = max_rate;
    report(args, &out, &windows, &summary)?;
    Ok(summary.ok)
}

/// The maximum end-to-end rate of the soak's pipeline: `bench e2e --mode stream` with
/// `--max-orders` orders and the soak's workers, partitions, batching, products and stock
/// share. Fails if that run's checks fail.
async fn max_rate(stack: &Stack, args: &SoakArgs) -> Result<f64> {
    ensure!(args.max_orders > 0, "--max-orders must be at least 1");
    let e = e2e::E2eArgs {
        orders: args.max_orders,
        products: args.products,
        hot_share: args.hot_share,
        stock: args.stock,
        fill: args.fill,
        pipeline: args.pipeline.clone(),
        mode: vec![e2e::Mode::Stream],
        preload: false,
        workers: args.workers,
        producers: None,
        consumers: None,
        timeout: args.timeout,
        seed: args.seed,
        rate: 0,
        in_process: args.in_process,
        customers: 0,
        hot_limit: None,
    };
    let figures = e2e::run_modes(stack, &e).await?;
    let Some(f) = figures.first() else {
        bail!("the maximum-rate run gave no figures");
    };
    ensure!(f.ok, "the maximum-rate run's checks failed: {f:?}");
    ensure!(f.e2e_rate > 0.0, "the maximum-rate run measured no rate");
    json_line(f)?;
    Ok(f.e2e_rate)
}

async fn measure(
    env: &PipelineEnv,
    args: &SoakArgs,
    shape: Shape,
    total: usize,
    stock: &BTreeMap<i64, i64>,
    mut workers: Workers,
) -> Result<(Vec<Window>, Summary)> {
    let warm_product = args.products + 1;
    let warmup = e2e::warmup_orders(warm_product, env.partitions());
    let mut all_stock = stock.clone();
    all_stock.insert(warm_product, warmup.len() as i64);
    e2e::load_stock(env, &all_stock).await?;

    let tracker: Shared = Arc::new(Mutex::new(Tracker {
        warm: vec![bits::NONE; warmup.len()],
        ..Tracker::default()
    }));
    let group = format!("bench-soak-collector-{}", uuid::Uuid::new_v4().simple());
    let consumer = stock_common::kafka::consumer(&env.kafka, &group, &[&env.topics().results])
        .context("result reader")?;
    let stop = CancellationToken::new();
    // Stopped when the measurement ends or is dropped (interrupted).
    let _stop_reader = stop.clone().drop_guard();
    let reader = tokio::spawn(read_results(consumer, tracker.clone(), stop.clone()));
    let batch = BatchArgs {
        batch_size: args.pipeline.batch_size,
        linger: args.pipeline.linger,
        pipeline_depth: 2,
    };
    let sent = Arc::new(Sent::default());
    let run = drive(
        env,
        args,
        shape,
        total,
        &warmup,
        &tracker,
        &sent,
        &mut workers,
        &batch,
    )
    .await;
    let idle = match &run {
        Ok(_) => e2e::wait_idle(env).await,
        Err(_) => Ok(false),
    };
    let stopped = workers.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    if let Err(e) = reader.await {
        tracing::warn!(error = %e, "soak result reader failed");
    }
    let (windows, complete, drain, disk_idle) = run?;
    stopped?;
    let idle = idle?;
    let mut summary = check(
        env, args, shape, &tracker, &sent, &all_stock, idle, complete, drain,
    )
    .await?;
    summary.disk_idle_sync_ms = disk_idle;
    Ok((windows, summary))
}

/// Starts the workers, warms up, publishes for the run's duration while closing a window
/// at every boundary, then waits for the last outcomes: the windows, whether every order
/// got an outcome, and how long that took after the last publish.
#[allow(clippy::too_many_arguments)]
async fn drive(
    env: &PipelineEnv,
    args: &SoakArgs,
    shape: Shape,
    total: usize,
    warmup: &[Order],
    tracker: &Shared,
    sent: &Arc<Sent>,
    workers: &mut Workers,
    batch: &BatchArgs,
) -> Result<(Vec<Window>, bool, Duration, Option<LatencyMs>)> {
    let (n, w) = (args.workers, args.workers);
    workers.start_producers(env, batch, n).await?;
    workers.start_consumers(env, batch, w).await?;
    if !e2e::wait_groups(env, n, w).await? {
        tracing::warn!("the worker groups are not stable after 60 s; measuring anyway");
    }
    let producer = stock_common::kafka::producer(&env.kafka).context("kafka producer")?;
    let topic = env.topics().orders.clone();
    harness::publish(&producer, &topic, e2e::messages(warmup))
        .await
        .context("publishing the warm-up orders")?;
    let warm_deadline = Instant::now() + Duration::from_secs(60);
    while lock(tracker).warm.contains(&bits::NONE) {
        ensure!(
            Instant::now() < warm_deadline,
            "the warm-up orders got no outcome within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The volume the services write to, probed beside them (nothing without STACK_DIR).
    let disk = match std::env::var_os("STACK_DIR") {
        Some(dir) => Some(DiskProbe::start(Path::new(&dir))?),
        None => None,
    };
    // The volume on its own first: the workers idle, nothing published.
    let mut disk_idle = None;
    if let (Some(d), false) = (&disk, args.disk_idle.is_zero()) {
        d.take_window();
        tokio::time::sleep(args.disk_idle).await;
        let idle = latency_of(d.take_window());
        eprintln!(
            "bench soak: the volume idle for {:?}: disk sync p50 / p99 / max {:.1} / {:.1} / {:.1} ms",
            args.disk_idle, idle.p50, idle.p99, idle.max
        );
        disk_idle = Some(idle);
    }
    let procs = workers.pids();
    let snapshot = || {
        let procs = &procs;
        async move {
            let (published, firsts) = {
                let t = lock(tracker);
                (t.main.len(), t.firsts)
            };
            let pg = pg_stats(&env.db.pool).await?;
            let redis = redis_stats(env).await.unwrap_or_else(|e| {
                tracing::warn!(error = %format!("{e:#}"), "Redis INFO unavailable");
                RedisStats::default()
            });
            anyhow::Ok(Snapshot {
                at: Instant::now(),
                cpu: cpu::sample_with(procs),
                published,
                firsts,
                pg,
                redis,
                pressure: Pressure::read(),
            })
        }
    };
    let mut prev = snapshot().await?;
    let start = prev.at;
    let publisher = tokio::spawn(publish(
        producer,
        topic,
        shape,
        Pace {
            rate: args.rate,
            pause: args.pause,
        },
        total,
        tracker.clone(),
        sent.clone(),
    ));
    // Aborted when the measurement is dropped (an error, an interruption).
    let _abort = AbortOnDrop(publisher.abort_handle());
    lock(tracker).take_window();
    if let Some(d) = &disk {
        d.take_window();
    }
    let count = args.duration.as_nanos().div_ceil(args.window.as_nanos()) as usize;
    let mut windows = Vec::with_capacity(count);
    let mut rss: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let sample_rss = |rss: &mut BTreeMap<String, Vec<u64>>| {
        let bench = cpu::rss_bytes(std::process::id()).map(|b| ("bench".to_owned(), b));
        let workers = procs
            .iter()
            .filter_map(|p| Some((p.name.clone(), cpu::rss_bytes(p.pid)?)));
        for (name, b) in workers.chain(bench) {
            rss.entry(name).or_default().push(b);
        }
    };
    for index in 1..=count {
        let boundary = start + (args.window * index as u32).min(args.duration);
        while Instant::now() < boundary {
            tokio::time::sleep_until(boundary.min(Instant::now() + Duration::from_secs(1))).await;
            sample_rss(&mut rss);
            ensure!(
                !workers.any_finished(),
                "a worker stopped early: {}",
                workers.finished()
            );
            if publisher.is_finished() && Instant::now() + Duration::from_secs(1) < boundary {
                // Only an error ends it early.
                break;
            }
        }
        if rss.is_empty() {
            // A window that closed before its first second (the snapshot ran late) still
            // gets the one reading at its end the figures were made of before.
            sample_rss(&mut rss);
        }
        let (latencies_us, published_us) = lock(tracker).take_window();
        let cur = snapshot().await?;
        let win = Window::of(WindowInput {
            index,
            from_s: (prev.at - start).as_secs_f64(),
            to_s: (cur.at - start).as_secs_f64(),
            published: cur.published - prev.published,
            outcomes: cur.firsts - prev.firsts,
            latencies_us,
            published_us,
            cpu: cpu::between(&prev.cpu, &cur.cpu),
            rss: std::mem::take(&mut rss),
            pg_before: prev.pg.clone(),
            pg_after: cur.pg.clone(),
            redis_before: prev.redis,
            redis_after: cur.redis,
            disk_sync_us: disk.as_ref().map(DiskProbe::take_window),
            pressure_before: prev.pressure,
            pressure_after: cur.pressure,
        });
        eprintln!(
            "bench soak: window {index}/{count}: {} orders/s, p99 {:.1} ms (outcome published: {}), \
             pipeline {} us/order, disk sync p99 / max {}",
            thousands(win.rate),
            win.latency_ms.p99,
            win.published_ms
                .as_ref()
                .map_or_else(|| "-".into(), |p| format!("{:.1} ms", p.p99)),
            win.cpu_us_per_order
                .pipeline
                .map_or_else(|| "-".into(), |p| format!("{p:.1}")),
            win.disk_sync_ms
                .as_ref()
                .map_or_else(|| "-".into(), |d| format!("{:.1} / {:.1} ms", d.p99, d.max))
        );
        windows.push(win);
        prev = cur;
        if publisher.is_finished() && index < count {
            break;
        }
    }
    publisher.await.context("publisher task")??;
    let published_at = Instant::now();
    let deadline = published_at + args.timeout;
    let complete = loop {
        let pending = {
            let t = lock(tracker);
            t.main.len() - t.firsts
        };
        if pending == 0 {
            break true;
        }
        ensure!(
            !workers.any_finished(),
            "a worker stopped early: {}",
            workers.finished()
        );
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let drain = published_at.elapsed();
    Ok((windows, complete, drain, disk_idle))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[allow(clippy::too_many_arguments)]
async fn check(
    env: &PipelineEnv,
    args: &SoakArgs,
    shape: Shape,
    tracker: &Shared,
    sent: &Sent,
    all_stock: &BTreeMap<i64, i64>,
    idle: bool,
    complete: bool,
    drain: Duration,
) -> Result<Summary> {
    let (mut s, units) = {
        let t = lock(tracker);
        let mut s = Summary {
            bench: "soak-checks",
            workers_placement: if args.in_process {
                "in-process"
            } else {
                "processes"
            },
            rate: args.rate,
            duration_s: args.duration.as_secs_f64(),
            published: t.main.len(),
            delivery_failures: sent.failed.load(Ordering::Relaxed),
            reserved: 0,
            rejected: 0,
            released: 0,
            missing: 0,
            duplicates: 0,
            conflicts: 0,
            unexpected: t.unexpected,
            unparsed: t.unparsed,
            violations: 0,
            reserved_units_match: false,
            complete,
            idle,
            max_rate: None,
            drain_s: drain.as_secs_f64(),
            disk_idle_sync_ms: None,
            tracker_bytes: t.main.capacity()
                + t.warm.capacity()
                + t.ticks.capacity() * std::mem::size_of::<(usize, Instant)>(),
            run_ms: t.run_us.ms(),
            run_published_ms: t.run_published_us.ms(),
            ok: false,
        };
        let mut units = 0i64;
        let states = t.main.iter().enumerate().map(|(n, b)| (Some(n), *b));
        let warm = t.warm.iter().map(|b| (None, *b));
        for (n, b) in states.chain(warm) {
            let q = n.map_or(1, |n| shape.item(n).quantity);
            s.duplicates += usize::from(b & bits::DUPLICATE != 0);
            s.conflicts += usize::from(b & bits::CONFLICT != 0);
            match b & bits::STATUS {
                bits::NONE => s.missing += 1,
                bits::RESERVED if b & bits::RELEASED != 0 => s.released += usize::from(n.is_some()),
                bits::RESERVED => {
                    units += q;
                    s.reserved += usize::from(n.is_some());
                }
                bits::REJECTED => s.rejected += usize::from(n.is_some()),
                _ => s.conflicts += 1,
            }
        }
        (s, units)
    };
    let products: Vec<i64> = all_stock.keys().copied().collect();
    let (violations, units_match) = e2e::check_stock(env, &products, units, "bench soak").await?;
    s.violations = violations.len();
    s.reserved_units_match = units_match;
    s.ok = s.complete
        && s.idle
        && s.missing == 0
        && s.conflicts == 0
        && s.unexpected == 0
        && s.unparsed == 0
        && s.violations == 0
        && s.delivery_failures == 0
        && s.reserved_units_match;
    Ok(s)
}

/// The windows as a table (text and Markdown share it).
fn windows_table(windows: &[Window]) -> Table {
    let rss_keys: Vec<String> = windows
        .iter()
        .flat_map(|w| w.rss_mib.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut headers: Vec<String> = [
        "window (min)",
        "offered/s",
        "orders/s",
        "p50 ms",
        "p99 ms",
        "p99 to published ms",
        "CPU us/order prod",
        "cons",
        "bench",
        "pg",
        "redis",
        "kafka",
        "PIPELINE",
    ]
    .map(str::to_owned)
    .into();
    headers.extend(rss_keys.iter().map(|k| format!("RSS MiB {k} mean / max")));
    headers.extend(
        [
            "order_ledger MiB",
            "stock_movement MiB",
            "autovacuum",
            "autoanalyze",
            "checkpoints",
            "Redis MiB",
            "Redis forks",
            "disk sync p99 ms",
            "disk sync max ms",
            "IO pressure % some / full",
            "memory pressure % some / full",
        ]
        .map(str::to_owned),
    );
    let mut t = Table::new(headers);
    let f1 = |v: f64| format!("{v:.1}");
    let opt = |v: Option<f64>| v.map_or_else(|| "-".into(), f1);
    for w in windows {
        let c = &w.cpu_us_per_order;
        let mut row = vec![
            format!("{} {:.1}-{:.1}", w.window, w.from_s / 60.0, w.to_s / 60.0),
            thousands(w.offered_rate),
            thousands(w.rate),
            f1(w.latency_ms.p50),
            f1(w.latency_ms.p99),
            opt(w.published_ms.as_ref().map(|p| p.p99)),
            opt(c.producers),
            opt(c.consumers),
            f1(c.bench),
            f1(c.postgres),
            f1(c.redis),
            f1(c.kafka),
            opt(c.pipeline),
        ];
        row.extend(rss_keys.iter().map(|k| {
            format!(
                "{} / {}",
                opt(w.rss_mib.get(k).copied()),
                opt(w.rss_max_mib.get(k).copied())
            )
        }));
        row.extend([
            opt(w.pg_mib.get("order_ledger").copied()),
            opt(w.pg_mib.get("stock_movement").copied()),
            w.autovacuum.to_string(),
            w.autoanalyze.to_string(),
            w.pg_checkpoints.to_string(),
            f1(w.redis_used_mib),
            w.redis_forks.to_string(),
            opt(w.disk_sync_ms.as_ref().map(|d| d.p99)),
            opt(w.disk_sync_ms.as_ref().map(|d| d.max)),
            w.pressure_pct.map_or_else(
                || "-".into(),
                |p| format!("{:.1} / {:.1}", p.io_some, p.io_full),
            ),
            w.pressure_pct.map_or_else(
                || "-".into(),
                |p| format!("{:.1} / {:.1}", p.memory_some, p.memory_full),
            ),
        ]);
        t.row(row);
    }
    t
}

fn checks_table(s: &Summary) -> Table {
    let mut t = Table::new(["check", ""]);
    t.row(["workers".to_owned(), s.workers_placement.to_owned()]);
    t.row([
        "published / delivery failures".to_owned(),
        format!("{} / {}", s.published, s.delivery_failures),
    ]);
    t.row([
        "reserved / rejected / released".to_owned(),
        format!("{} / {} / {}", s.reserved, s.rejected, s.released),
    ]);
    t.row([
        "missing / duplicated / conflicting".to_owned(),
        format!("{} / {} / {}", s.missing, s.duplicates, s.conflicts),
    ]);
    t.row([
        "unexpected / unparsed results".to_owned(),
        format!("{} / {}", s.unexpected, s.unparsed),
    ]);
    t.row([
        "invariants, reserved units, idle".to_owned(),
        format!(
            "{} {} {}",
            yes_no(s.violations == 0),
            yes_no(s.reserved_units_match),
            yes_no(s.idle)
        ),
    ]);
    t.row([
        "last publish to last outcome, s".to_owned(),
        format!("{:.2}", s.drain_s),
    ]);
    t.row([
        "the whole run, p50 / p99 / max ms (to the outcome; to its publication)".to_owned(),
        format!(
            "{}; {}",
            LatencyMs::show(s.run_ms),
            LatencyMs::show(s.run_published_ms)
        ),
    ]);
    t.row([
        "result tracker, bytes".to_owned(),
        thousands(s.tracker_bytes as f64),
    ]);
    if let Some(max) = s.max_rate {
        t.row([
            "the maximum measured first / the rate run, orders/s".to_owned(),
            format!("{} / {}", thousands(max), thousands(s.rate as f64)),
        ]);
    }
    if let Some(d) = &s.disk_idle_sync_ms {
        t.row([
            "the volume idle before the run: disk sync p50 / p99 / max, ms".to_owned(),
            format!("{:.1} / {:.1} / {:.1}", d.p50, d.p99, d.max),
        ]);
    }
    t.row(["CHECKS".to_owned(), yes_no(s.ok).to_owned()]);
    t
}

/// The chart: orders/s, latency and CPU per order against minutes (each window at its end).
fn chart(windows: &[Window], path: &Path) -> Result<()> {
    let line = |name: &str, f: &dyn Fn(&Window) -> Option<f64>| Series {
        name: name.to_owned(),
        points: windows
            .iter()
            .filter_map(|w| Some((w.to_s / 60.0, f(w)?)))
            .collect(),
    };
    let rate = [
        line("offered", &|w| Some(w.offered_rate)),
        line("achieved", &|w| Some(w.rate)),
    ];
    let latency: Vec<Series> = [
        line("p50", &|w| Some(w.latency_ms.p50)),
        line("p99", &|w| Some(w.latency_ms.p99)),
        line("disk sync p99", &|w| w.disk_sync_ms.as_ref().map(|d| d.p99)),
    ]
    .into_iter()
    .filter(|s| !s.points.is_empty())
    .collect();
    let cpu: Vec<Series> = [
        line("pipeline", &|w| w.cpu_us_per_order.pipeline),
        line("postgres", &|w| Some(w.cpu_us_per_order.postgres)),
        line("kafka", &|w| Some(w.cpu_us_per_order.kafka)),
        line("redis", &|w| Some(w.cpu_us_per_order.redis)),
        line("producers", &|w| w.cpu_us_per_order.producers),
        line("consumers", &|w| w.cpu_us_per_order.consumers),
        line("bench", &|w| Some(w.cpu_us_per_order.bench)),
    ]
    .into_iter()
    .filter(|s| !s.points.is_empty())
    .collect();
    TimeChart {
        title: "bench soak: per window",
        x_label: "minutes since the first publish (window end)",
        panels: &[
            Panel {
                y_label: "orders/s",
                series: &rate,
            },
            Panel {
                y_label: "latency ms",
                series: &latency,
            },
            Panel {
                y_label: "CPU us/order",
                series: &cpu,
            },
        ],
    }
    .write_svg(path)
}

fn report(args: &SoakArgs, out: &Path, windows: &[Window], summary: &Summary) -> Result<()> {
    if windows.is_empty() {
        bail!("no window was measured");
    }
    let table = windows_table(windows);
    let comparison =
        (windows.len() >= 2).then(|| Comparison::of(&windows[0], &windows[windows.len() - 1]));
    let compare_line = match &comparison {
        Some(c) => format!("first / last: {}", c.describe()),
        None => "first / last: one window only, nothing to compare".into(),
    };
    let checks = checks_table(summary);
    println!();
    println!("{}", table.markdown());
    println!();
    println!("{compare_line}");
    println!();
    checks.print();
    println!();
    for w in windows {
        json_line(w)?;
    }
    if let Some(c) = &comparison {
        json_line(c)?;
    }
    json_line(summary)?;

    let md = out.join("soak.md");
    let svg = out.join("soak.svg");
    chart(windows, &svg)?;
    let text = format!(
        "# bench soak\n\n{} orders/s{} for {:?}, windows of {:?}, {} worker(s) of each kind ({}), \
         batch {} / linger {:?}, {} partitions, {} products (hot share {:.2})\n\n{}\n\n{}\n\n\
         ![per window](soak.svg)\n\n## Checks\n\n{}\n",
        args.rate,
        match (args.of_max, summary.max_rate) {
            (Some(share), Some(max)) => format!(
                " ({share} of the maximum, {} orders/s, measured first by bench e2e --mode stream \
                 with {} orders)",
                thousands(max),
                thousands(args.max_orders as f64)
            ),
            _ => String::new(),
        } + &args.pause.map_or(String::new(), |p| {
            format!(" (publishing paused at {:?} for {:?})", p.at, p.len)
        }),
        args.duration,
        args.window,
        args.workers,
        summary.workers_placement,
        args.pipeline.batch_size,
        args.pipeline.linger,
        args.pipeline.partitions,
        args.products,
        args.hot_share,
        table.markdown(),
        compare_line,
        checks.markdown(),
    );
    std::fs::write(&md, text).with_context(|| format!("writing {}", md.display()))?;
    println!("soak: wrote {} and {}", md.display(), svg.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(index: usize, from: f64, to: f64) -> WindowInput {
        WindowInput {
            index,
            from_s: from,
            to_s: to,
            published: 6000,
            outcomes: 5000,
            latencies_us: (1..=100).map(|ms| ms * 1000).collect(),
            published_us: (1..=100).map(|ms| ms * 600).collect(),
            cpu: CpuUse {
                span_secs: to - from,
                cores: 2,
                secs: [
                    ("postgres", 0.5),
                    ("bench", 0.1),
                    ("producer", 0.2),
                    ("consumer", 0.2),
                ]
                .into(),
                nodes: BTreeMap::new(),
                procs: BTreeMap::new(),
            },
            rss: [
                (
                    "producer-1".to_owned(),
                    vec![90 * 1024 * 1024, 110 * 1024 * 1024],
                ),
                ("bench".to_owned(), vec![100 * 1024 * 1024]),
            ]
            .into(),
            pg_before: PgStats {
                sizes: BTreeMap::new(),
                autovacuum: 3,
                autoanalyze: 1,
                checkpoints: 7,
            },
            pg_after: PgStats {
                sizes: [("order_ledger".to_owned(), 2 * 1024 * 1024)].into(),
                autovacuum: 5,
                autoanalyze: 4,
                checkpoints: 8,
            },
            redis_before: RedisStats { used: 0, forks: 2 },
            redis_after: RedisStats {
                used: 1024 * 1024,
                forks: 4,
            },
            disk_sync_us: Some(vec![1000, 2000, 300_000]),
            pressure_before: Some(Pressure {
                io_some: 1_000_000,
                io_full: 500_000,
                memory_some: 0,
                memory_full: 0,
            }),
            pressure_after: Some(Pressure {
                io_some: 3_000_000,
                io_full: 1_500_000,
                memory_some: 100_000,
                memory_full: 0,
            }),
        }
    }

    #[test]
    fn a_run_the_volume_cannot_hold_is_refused() {
        let dir = std::env::temp_dir();
        let free = free_bytes(&dir).expect("statvfs");
        assert!(free > 0);
        check_disk(Some(dir.clone()), 1, free / 2).expect("half the free space fits");
        let err = check_disk(Some(dir.clone()), 1, free + 1_000_000_000)
            .expect_err("more than the free space")
            .to_string();
        assert!(err.contains("--skip-disk-check"), "{err}");
        assert!(check_disk(Some(dir.join("no-such-dir")), 1, 1).is_err());
        check_disk(None, 1, u64::MAX).expect("no local stack: nothing to check");
    }

    #[test]
    fn the_topics_retention_bounds_kafkas_share_of_the_disk() {
        let per_order = STORE_DISK_PER_ORDER + KAFKA_DISK_PER_ORDER;
        // The broker's default retention: every order in Kafka too.
        assert_eq!(disk_need(1000, 10, None), 1000 * per_order);
        // An hour at 20,000/s, topics keeping 10 minutes: Kafka holds 20 minutes' orders
        // (1.5 x 10 minutes and the 5-minute check), PostgreSQL and Redis all of them.
        let hour = 72_000_000;
        assert_eq!(
            disk_need(hour, 20_000, Some(Duration::from_secs(600))),
            hour as u64 * STORE_DISK_PER_ORDER + 24_000_000 * KAFKA_DISK_PER_ORDER
        );
        // A run shorter than the retention keeps all its orders in Kafka.
        assert_eq!(
            disk_need(1000, 10, Some(Duration::from_secs(600))),
            1000 * per_order
        );
    }

    #[test]
    fn pressure_totals_from_the_kernels_format() {
        let io = "some avg10=10.69 avg60=10.32 avg300=11.22 total=1194462678\n\
                  full avg10=7.28 avg60=7.28 avg300=8.42 total=800833811\n";
        assert_eq!(psi_total(io, "some"), Some(1_194_462_678));
        assert_eq!(psi_total(io, "full"), Some(800_833_811));
        assert_eq!(psi_total("some avg10=0.00\n", "some"), None);
        if std::path::Path::new("/proc/pressure/io").exists() {
            assert!(Pressure::read().is_some(), "this kernel has PSI");
        }
    }

    #[test]
    fn a_pause_is_a_start_and_a_length() {
        let p = parse_pause("100s+5s").expect("AT+LEN");
        assert_eq!(
            p,
            Pause {
                at: Duration::from_secs(100),
                len: Duration::from_secs(5)
            }
        );
        assert!(!p.holds(Duration::from_millis(99_990)));
        assert!(p.holds(Duration::from_secs(100)));
        assert!(p.holds(Duration::from_millis(104_990)));
        assert!(!p.holds(Duration::from_secs(105)));
        assert!(parse_pause("100s").is_err());
        assert!(parse_pause("100s+x").is_err());
    }

    #[test]
    fn a_window_from_its_counters() {
        let w = Window::of(input(1, 10.0, 20.0));
        assert_eq!((w.offered_rate, w.rate), (600.0, 500.0));
        assert_eq!(
            (w.latency_ms.p50, w.latency_ms.p99, w.latency_ms.max),
            (50.0, 99.0, 100.0)
        );
        assert_eq!(w.cpu_us_per_order.postgres, 100.0);
        assert_eq!(w.cpu_us_per_order.pipeline, Some(180.0));
        assert_eq!((w.autovacuum, w.autoanalyze), (2, 3));
        assert_eq!(w.rss_mib.get("producer-1"), Some(&100.0), "the mean");
        assert_eq!(w.rss_max_mib.get("producer-1"), Some(&110.0));
        assert_eq!(w.pg_mib.get("order_ledger"), Some(&2.0));
        assert_eq!(w.redis_used_mib, 1.0);
        assert_eq!((w.pg_checkpoints, w.redis_forks), (1, 2));
        let disk = w.disk_sync_ms.expect("the probe's waits");
        assert_eq!((disk.max, disk.p50), (300.0, 2.0));
        let published = w.published_ms.expect("the outcomes' publication");
        assert_eq!((published.p99, published.max), (59.4, 60.0));
        let pressure = w.pressure_pct.expect("both PSI readings");
        assert_eq!(
            (pressure.io_some, pressure.io_full, pressure.memory_some),
            (20.0, 10.0, 1.0),
            "2 s, 1 s and 0.1 s of a 10-s window"
        );
        let none = Window::of(WindowInput {
            disk_sync_us: Some(Vec::new()),
            published_us: Vec::new(),
            ..input(2, 20.0, 30.0)
        });
        assert!(
            none.disk_sync_ms.is_none(),
            "no write in the window: no figure"
        );
        assert!(none.published_ms.is_none(), "no timestamp: no figure");
        let empty = latency_of(Vec::new());
        assert_eq!((empty.p50, empty.p99), (0.0, 0.0));
    }

    #[test]
    fn first_and_last_windows_compared() {
        let first = Window::of(input(1, 0.0, 60.0));
        let mut last_in = input(3, 120.0, 180.0);
        last_in.cpu.secs.insert("postgres", 0.6); // +20%
        last_in
            .rss
            .insert("producer-1".into(), vec![120 * 1024 * 1024]); // +20%
        last_in.rss.insert("bench".into(), vec![1]); // not judged
        let last = Window::of(last_in);
        let c = Comparison::of(&first, &last);
        assert!((c.pg_cpu_per_order.unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(c.p99, Some(1.0));
        assert!(c.steady, "{c:?}");
        let mut worse = input(3, 120.0, 180.0);
        worse.latencies_us = (1..=100).map(|ms| ms * 2000).collect();
        let c = Comparison::of(&first, &Window::of(worse));
        assert_eq!(c.p99, Some(2.0));
        assert!(!c.steady);
        assert!(c.describe().ends_with("NO"), "{}", c.describe());
    }

    #[test]
    fn tracker_counts_first_outcomes_duplicates_and_conflicts() {
        let t0 = Instant::now();
        let mut t = Tracker {
            main: vec![bits::NONE; 4],
            warm: vec![bits::NONE; 1],
            ticks: vec![(0, t0), (2, t0 + Duration::from_millis(10))],
            ..Tracker::default()
        };
        let at = |ms| t0 + Duration::from_millis(ms);
        let rejected = StockResult::rejected("s-1", Reason::InsufficientStock, Some(1));
        t.record(&StockResult::reserved("s-0"), at(5), Some(at(3)));
        t.record(&StockResult::reserved("s-0"), at(6), Some(at(4)));
        t.record(&rejected, at(7), None);
        t.record(&StockResult::reserved("s-1"), at(8), Some(at(6)));
        t.record(&StockResult::reserved("s-3"), at(30), Some(at(29)));
        t.record(&StockResult::reserved("warmup-0"), at(1), None);
        t.record(&StockResult::reserved("s-9"), at(1), None);
        t.record(&StockResult::reserved("other"), at(1), None);
        assert_eq!(t.main[0], bits::RESERVED | bits::DUPLICATE);
        assert_eq!(t.main[1], bits::REJECTED | bits::CONFLICT);
        assert_eq!(t.main[2], bits::NONE);
        assert_eq!(t.warm[0], bits::RESERVED);
        assert_eq!((t.firsts, t.unexpected), (3, 2));
        // Order 3 was sent in the tick at 10 ms: 20 ms, and published at 19 ms. A first
        // outcome without a timestamp counts in the first list only.
        assert_eq!(
            t.take_window(),
            (vec![5000, 7000, 20000], vec![3000, 19000])
        );
        assert_eq!(t.take_window(), (Vec::new(), Vec::new()));
        // The run keeps what the windows gave away, and what comes after the last one
        // (a percentile to within its histogram bucket, 1/512; the max exactly).
        t.record(&StockResult::reserved("s-2"), at(110), None);
        assert_eq!(t.take_window(), (vec![100_000], Vec::new()));
        let near = |got: f64, want: f64| got >= want && got <= want * (1.0 + 1.0 / 512.0);
        let run = t.run_us.ms().expect("outcomes");
        assert!(near(run.p50, 7.0) && near(run.p99, 100.0), "{run:?}");
        assert_eq!(run.max, 100.0);
        let published = t.run_published_us.ms().expect("timestamps");
        assert!(
            near(published.p50, 3.0) && near(published.p99, 19.0),
            "{published:?}"
        );
        assert_eq!(published.max, 19.0);
    }

    #[test]
    fn wall_clock_milliseconds_land_on_the_monotonic_clock() {
        let c = WallClock::now();
        assert_eq!(
            c.instant(c.unix_ms + 250),
            Some(c.at + Duration::from_millis(250))
        );
        assert_eq!(
            c.instant(c.unix_ms - 40),
            c.at.checked_sub(Duration::from_millis(40))
        );
    }

    #[test]
    fn load_is_a_function_of_the_order_number() {
        let shape = Shape {
            seed: 7,
            products: 10,
            hot_share: 0.5,
            max_quantity: 3,
        };
        assert_eq!(shape.item(12345), shape.item(12345));
        let items: Vec<Item> = (0..10_000).map(|n| shape.item(n)).collect();
        let hot = items.iter().filter(|i| i.product_id == HOT_PRODUCT).count();
        assert!((4500..5500).contains(&hot), "{hot}");
        assert!(items.iter().all(|i| (1..=10).contains(&i.product_id)));
        assert!(items.iter().all(|i| (1..=3).contains(&i.quantity)));
        let stock = shape.stock(1000.0, 1.0);
        assert_eq!(stock.get(&1), Some(&1000)); // 1000 x 0.5 x mean 2
        assert_eq!(stock.get(&2), Some(&112)); // ceil(1000 x 0.5/9 x 2)
    }
}
