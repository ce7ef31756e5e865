//! `bench survey`: the strategies of the reference survey (`inventory-consistency.md`),
//! measured on the same deterministic workload, next to this project's pipeline; with the
//! survey's §8 comparison table and the measured figures side by side.
//!
//! # Strategies ([`Strategy`])
//! Each is written to follow the survey's text; its module says how and where it departs.
//! * `pessimistic` (§2.1), `optimistic` (§2.2), `atomic` (§2.3): PostgreSQL alone, table
//!   `survey_stock(product_id, quantity, version)` without a CHECK constraint ([`sql`]).
//! * `redis-lua` (§3.1), `redis-lock` (§3.2), `redis-sharded` (§7.1): Redis alone, keys
//!   `survey:…` ([`kv`]).
//! * `pipeline`: this project, Redis pre-deduction + Kafka + PostgreSQL, driven as its
//!   order service would ([`pipeline`]).
//!
//! # How a measurement runs
//! For every strategy × concurrency (a *cell*): the stock is loaded fresh, `concurrency`
//! clients each open a connection of their own, then the clock starts and they take the
//! orders from one shared queue, one order at a time ([`crate::driver`]). Every cell gets
//! the same orders, in the same queue order. At the end the store is read back and the books
//! are kept ([`accounting`]): granted, refused, oversold units, wrongly refused orders,
//! whether the store holds `initial − granted`, and (pipeline) whether PostgreSQL and Redis
//! agree.
//!
//! # Output (`--out`)
//! `survey.md` (the tables, the workload, the machine, the command), `survey.csv` (one row
//! per cell), `throughput.svg` (orders/s against concurrency); the tables and one JSON line
//! per cell on stdout; a progress bar on stderr. The run fails (exit 1) only when the
//! pipeline oversold, wrongly refused, left its store inconsistent or PostgreSQL ≠ Redis:
//! the survey strategies' defects are findings.

pub mod accounting;
pub mod kv;
pub mod output;
pub mod pipeline;
pub mod sql;

use crate::driver::{self, Driven};
use crate::env::{run_id, BenchDb, RedisSlot, Stack};
use crate::load::{self, LoadSpec, Order};
use crate::report::Latency;
use accounting::Books;
use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kv::{Kv, KvClient};
use serde::{Serialize, Serializer};
use sql::{Sql, SqlClient};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Clone, Debug)]
pub struct SurveyArgs {
    /// Orders of the workload; every cell runs all of them.
    #[arg(long, default_value_t = 20_000)]
    pub orders: usize,
    /// Products on sale, ids 1 to N; product 1 is the hot SKU.
    #[arg(long, default_value_t = 100)]
    pub products: i64,
    /// Share of items (0 to 1) on the hot SKU: 1 = every order wants it, 0 = the others
    /// evenly (the hot SKU gets none).
    #[arg(long, default_value_t = 0.5, value_parser = parse_share)]
    pub skew: f64,
    /// Items (distinct products) of every order.
    #[arg(long, default_value_t = 1)]
    pub items_per_order: usize,
    /// Quantities are drawn evenly from 1 to this.
    #[arg(long, default_value_t = 3)]
    pub max_quantity: i64,
    /// Initial units of every product. Default: `--fill` of the units ordered of each.
    #[arg(long)]
    pub stock: Option<i64>,
    /// Without `--stock`: the share of each product's demand put in stock, so that products
    /// sell out and orders are refused.
    #[arg(long, default_value_t = 0.7, value_parser = parse_share)]
    pub fill: f64,
    /// Concurrent clients, each with its own connection: the sweep, comma separated.
    /// PostgreSQL allows 300 connections in all.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    pub concurrency: Vec<usize>,
    /// Strategies to measure, in this order, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "pessimistic,optimistic,atomic,redis-lua,redis-lock,redis-sharded,pipeline"
    )]
    pub strategies: Vec<Strategy>,
    /// Shards per product of `redis-sharded` (the survey's `SHARD_COUNT`).
    #[arg(long, default_value_t = 10)]
    pub shards: usize,
    /// Partitions of every topic of `pipeline`.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Seed of the workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Folder for the results. Default: `bench-results/survey-<UTC timestamp>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

/// A strategy of the survey, or the pipeline; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Pessimistic,
    Optimistic,
    Atomic,
    RedisLua,
    RedisLock,
    RedisSharded,
    Pipeline,
}

/// Where a strategy keeps its stock.
enum Store {
    Postgres(Sql),
    Redis(Kv),
    Pipeline,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Pessimistic => "pessimistic",
            Strategy::Optimistic => "optimistic",
            Strategy::Atomic => "atomic",
            Strategy::RedisLua => "redis-lua",
            Strategy::RedisLock => "redis-lock",
            Strategy::RedisSharded => "redis-sharded",
            Strategy::Pipeline => "pipeline",
        }
    }

    fn store(self, shards: usize) -> Store {
        match self {
            Strategy::Pessimistic => Store::Postgres(Sql::Pessimistic),
            Strategy::Optimistic => Store::Postgres(Sql::Optimistic),
            Strategy::Atomic => Store::Postgres(Sql::Atomic),
            Strategy::RedisLua => Store::Redis(Kv::Lua),
            Strategy::RedisLock => Store::Redis(Kv::Lock),
            Strategy::RedisSharded => Store::Redis(Kv::Sharded(shards)),
            Strategy::Pipeline => Store::Pipeline,
        }
    }
}

/// Whether PostgreSQL and Redis agree at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgRedis {
    PostgresOnly,
    RedisOnly,
    /// Both stores: how many products differ.
    Compared {
        differing: usize,
    },
}

impl PgRedis {
    pub fn label(self) -> String {
        match self {
            PgRedis::PostgresOnly => "n/a (PostgreSQL only)".into(),
            PgRedis::RedisOnly => "n/a (Redis only)".into(),
            PgRedis::Compared { differing: 0 } => "yes".into(),
            PgRedis::Compared { differing } => format!("no ({differing} products differ)"),
        }
    }

    pub fn differing(self) -> Option<usize> {
        match self {
            PgRedis::Compared { differing } => Some(differing),
            _ => None,
        }
    }
}

impl Serialize for PgRedis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

/// What a cell's run gives the books: the answers, the store's last values of the
/// workload's products, and the PostgreSQL/Redis comparison.
pub struct CellRun {
    pub driven: Driven,
    pub last: BTreeMap<i64, Option<i64>>,
    pub pg_redis: PgRedis,
}

/// The figures of one cell (one JSON line, one CSV row).
#[derive(Debug, Clone, Serialize)]
pub struct CellFigures {
    pub bench: &'static str,
    pub strategy: Strategy,
    pub concurrency: usize,
    pub orders: usize,
    pub secs: f64,
    /// Orders per second.
    pub throughput: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub granted: usize,
    pub refused: usize,
    pub granted_units: i64,
    pub oversold_units: i64,
    pub wrongly_refused: usize,
    pub store_consistent: bool,
    pub inconsistent_products: usize,
    pub pg_redis: PgRedis,
    pub pg_redis_differing: Option<usize>,
}

impl CellFigures {
    pub fn new(strategy: Strategy, concurrency: usize, run: &CellRun, books: &Books) -> Self {
        let lat = Latency::of(run.driven.outcomes.iter().map(|o| o.latency).collect());
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        CellFigures {
            bench: "survey",
            strategy,
            concurrency,
            orders: run.driven.outcomes.len(),
            secs: run.driven.elapsed.as_secs_f64(),
            throughput: crate::report::rate(run.driven.outcomes.len(), run.driven.elapsed),
            p50_ms: ms(lat.p50),
            p99_ms: ms(lat.p99),
            max_ms: ms(lat.max),
            granted: books.granted,
            refused: books.refused,
            granted_units: books.granted_units,
            oversold_units: books.oversold_units,
            wrongly_refused: books.wrongly_refused,
            store_consistent: books.consistent(),
            inconsistent_products: books.inconsistent_products,
            pg_redis: run.pg_redis,
            pg_redis_differing: run.pg_redis.differing(),
        }
    }

    /// The pipeline's guarantees held in this cell (always true for other strategies).
    pub fn pipeline_ok(&self) -> bool {
        self.strategy != Strategy::Pipeline
            || (self.oversold_units == 0
                && self.wrongly_refused == 0
                && self.store_consistent
                && self.pg_redis == PgRedis::Compared { differing: 0 })
    }
}

/// The workload: orders and initial stock.
pub struct Workload {
    pub spec: LoadSpec,
    pub orders: Arc<Vec<Order>>,
    pub demand: BTreeMap<i64, i64>,
    pub stock: BTreeMap<i64, i64>,
}

impl Workload {
    pub fn new(args: &SurveyArgs) -> Workload {
        let spec = LoadSpec {
            orders: args.orders,
            products: args.products,
            hot_share: args.skew,
            items_per_order: args.items_per_order,
            max_quantity: args.max_quantity,
            seed: args.seed,
            customers: 0,
        };
        let orders = load::generate(&spec, "o-");
        let demand = load::demand(&orders);
        let stock = load::stock(args.products, &demand, args.stock, args.fill);
        Workload {
            spec,
            orders: Arc::new(orders),
            demand,
            stock,
        }
    }
}

/// Everything the cells share.
struct Ctx<'a> {
    stack: &'a Stack,
    args: &'a SurveyArgs,
    work: &'a Workload,
    db: Option<&'a BenchDb>,
    redis: Option<&'a RedisSlot>,
    progress: &'a ProgressBar,
}

/// Runs the survey; Ok(false) when the pipeline broke one of its guarantees.
pub async fn run(stack: &Stack, args: &SurveyArgs) -> Result<bool> {
    let done = run_survey(stack, args).await?;
    Ok(done.figures.iter().all(CellFigures::pipeline_ok))
}

/// A finished survey: where its files are, and its figures.
pub struct Survey {
    pub out: PathBuf,
    pub figures: Vec<CellFigures>,
}

/// Runs every cell, writes the files and prints the tables.
pub async fn run_survey(stack: &Stack, args: &SurveyArgs) -> Result<Survey> {
    ensure!(args.orders > 0, "--orders must be at least 1");
    ensure!(args.products > 0, "--products must be at least 1");
    ensure!(args.max_quantity > 0, "--max-quantity must be at least 1");
    ensure!(
        (1..=100).contains(&args.items_per_order) && args.items_per_order as i64 <= args.products,
        "--items-per-order must be 1 to 100 and at most --products"
    );
    ensure!(args.shards > 0, "--shards must be at least 1");
    ensure!(args.partitions > 0, "--partitions must be at least 1");
    ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|c| *c > 0),
        "--concurrency must be at least 1"
    );
    ensure!(!args.strategies.is_empty(), "no --strategies to measure");
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("bench-results").join(format!(
            "survey-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let work = Workload::new(args);
    let machine = output::Machine::probe(stack).await;
    println!("{}", output::describe_workload(args, &work));

    let id = run_id();
    let needs = |f: fn(&Store) -> bool| args.strategies.iter().any(|s| f(&s.store(args.shards)));
    let db = if needs(|s| matches!(s, Store::Postgres(_))) {
        let db = BenchDb::create(&stack.db, &stack.admin()?.db, &id, 2).await?;
        if let Err(e) = sql::create_table(&db.pool).await {
            db.cleanup().await;
            return Err(e);
        }
        Some(db)
    } else {
        None
    };
    let redis = if needs(|s| matches!(s, Store::Redis(_))) {
        match RedisSlot::claim(&stack.redis, &stack.admin()?.redis, &id).await {
            Ok(r) => Some(r),
            Err(e) => {
                if let Some(db) = db {
                    db.cleanup().await;
                }
                return Err(e);
            }
        }
    } else {
        None
    };

    let cells = args.strategies.len() * args.concurrency.len();
    let progress = ProgressBar::new((cells * args.orders) as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:32}] {human_pos}/{human_len} orders, cell {prefix}: {msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let ctx = Ctx {
        stack,
        args,
        work: &work,
        db: db.as_ref(),
        redis: redis.as_ref(),
        progress: &progress,
    };
    let measured = measure_all(&ctx, cells).await;
    progress.finish_and_clear();
    if let Some(db) = db {
        db.cleanup().await;
    }
    if let Some(r) = redis {
        r.cleanup().await;
    }
    let figures = measured?;
    let machine = machine.with_load_after();
    output::write_all(&out, args, &work, &machine, &figures)?;
    output::print(&figures)?;
    println!("results in {}", out.display());
    Ok(Survey { out, figures })
}

async fn measure_all(ctx: &Ctx<'_>, cells: usize) -> Result<Vec<CellFigures>> {
    let mut figures = Vec::with_capacity(cells);
    for &strategy in &ctx.args.strategies {
        for &concurrency in &ctx.args.concurrency {
            ctx.progress
                .set_prefix(format!("{}/{cells}", figures.len() + 1));
            ctx.progress
                .set_message(format!("{} x{concurrency}", strategy.name()));
            let run = measure(ctx, strategy, concurrency)
                .await
                .with_context(|| format!("{} at concurrency {concurrency}", strategy.name()))?;
            let books = accounting::books(
                &ctx.work.orders,
                &run.driven
                    .outcomes
                    .iter()
                    .map(|o| o.granted)
                    .collect::<Vec<_>>(),
                &ctx.work.stock,
                &run.last,
            );
            let f = CellFigures::new(strategy, concurrency, &run, &books);
            ctx.progress.suspend(|| {
                eprintln!(
                    "bench survey: {} x{concurrency}: {} orders/s, {} granted, {} refused, {} oversold, {} wrongly refused",
                    strategy.name(),
                    crate::report::thousands(f.throughput),
                    f.granted,
                    f.refused,
                    f.oversold_units,
                    f.wrongly_refused
                )
            });
            figures.push(f);
        }
    }
    Ok(figures)
}

/// One cell: fresh stock, clients connected, the orders driven, the store read back.
async fn measure(ctx: &Ctx<'_>, strategy: Strategy, concurrency: usize) -> Result<CellRun> {
    let work = ctx.work;
    let products: Vec<i64> = work.stock.keys().copied().collect();
    match strategy.store(ctx.args.shards) {
        Store::Postgres(kind) => {
            let db = ctx.db.context("no survey database")?;
            sql::load(&db.pool, &work.stock).await?;
            let clients = SqlClient::connect(db.args.url.expose(), kind, concurrency).await?;
            let driven = driver::run(clients, work.orders.clone(), ctx.progress).await?;
            let last = sql::levels(&db.pool).await?;
            Ok(CellRun {
                driven,
                last,
                pg_redis: PgRedis::PostgresOnly,
            })
        }
        Store::Redis(kind) => {
            let slot = ctx.redis.context("no survey Redis database")?;
            slot.flush()
                .await
                .context("flushing the survey's Redis database")?;
            let client = stock_common::redis_store::client(&slot.args).context("Redis URL")?;
            let mut conn = stock_common::redis_store::raw_connection(&client)
                .await
                .context("connecting to the survey's Redis database")?;
            kv::load(&mut conn, kind, &work.stock).await?;
            let clients = KvClient::connect(slot.args.url.expose(), kind, concurrency).await?;
            let driven = driver::run(clients, work.orders.clone(), ctx.progress).await?;
            let last = kv::levels(&mut conn, kind, &products).await?;
            Ok(CellRun {
                driven,
                last,
                pg_redis: PgRedis::RedisOnly,
            })
        }
        Store::Pipeline => {
            pipeline::measure(
                ctx.stack,
                ctx.args.partitions,
                &work.orders,
                &work.stock,
                concurrency,
                ctx.progress,
            )
            .await
        }
    }
}
