//! `bench apply`: how fast PostgreSQL takes reservations of ONE hot SKU, by strategy.
//!
//! Every measurement gets a product of its own (in the run's own database) holding twice
//! the units ordered, so that nothing is refused and every order does real work; each
//! order reserves one unit. Connections are opened before the clock starts, and the
//! tables are vacuumed between measurements so that one strategy's dead rows do not slow
//! the next. Checked after each: `available + reserved` = initial stock, `reserved` =
//! number of orders, nothing sold, and one ledger row per order for the strategies that
//! record orders.
//!
//! Strategies ([`Strategy`]):
//! * `autocommit` (baseline): per order, `UPDATE stock SET available = available - q,
//!   reserved = reserved + q WHERE product_id = p AND available >= q`, autocommit, from
//!   `--concurrency` tasks with a connection each.
//! * `ledger-txn` (baseline, what a fair per-order design needs to be idempotent): per
//!   order one transaction of `INSERT INTO order_ledger … ON CONFLICT DO NOTHING` and that
//!   UPDATE, same tasks.
//! * `batched`: the consumer's `stock_consumer::store::apply_batch`, batches of
//!   `--batch-size` reserve commands applied one after the other from one task (the
//!   consumer applies one batch at a time).
//! * `bare-sql` (the limit of the batched shape): the same statements in the same
//!   transaction (`stock_common::pg_store`: the generation fence, the row lock, the ledger
//!   insert, the aggregated UPDATE, the history: a batch of new orders does not read the
//!   ledger first), with every row built
//!   before the clock starts: what PostgreSQL and the driver cost without the worker's
//!   decisions. `batched / bare-sql` is the share of that limit the consumer reaches.
//!
//! To add a strategy (pessimistic `SELECT … FOR UPDATE`, optimistic version check, Redis
//! Lua alone, Redis `SET NX` lock): add a [`Strategy`] variant and either a [`PerOrder`]
//! operation (it then runs under the same concurrent driver, [`crate::driver`], and
//! `--concurrency 1,8,32` sweeps it) or a driver of its own in [`measure_one`]. The survey's
//! strategies on a table of the survey's shape are in [`crate::survey`].

use crate::driver::{self, Client};
use crate::env::{run_id, BenchDb, Stack};
use crate::report::{self, fmt_ratio, json_line, rate, thousands, Table};
use anyhow::{ensure, Context, Result};
use indicatif::ProgressBar;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};
use std::sync::Arc;
use std::time::Duration;
use stock_common::events::{DeductCommand, Item, Status, INTERNAL_VERSION};
use stockctl::admin;
use tokio::time::Instant;

/// Units each order reserves.
const QUANTITY: i64 = 1;
/// Reservation lifetime written to the ledger (never reached during a run).
const RESERVATION_TTL: Duration = Duration::from_secs(900);

#[derive(clap::Args, Clone, Debug)]
pub struct ApplyArgs {
    /// Orders per measurement (one unit each, all on one product).
    #[arg(long, default_value_t = 50_000)]
    pub orders: usize,
    /// Reserve commands per `apply_batch` call (batched strategy).
    #[arg(long, default_value_t = 2000)]
    pub batch_size: usize,
    /// Tasks of the per-order strategies, each with its own connection. A comma-separated
    /// list measures each value (a sweep).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub concurrency: Vec<usize>,
    /// Strategies to measure, in this order, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "autocommit,ledger-txn,batched,bare-sql"
    )]
    pub strategies: Vec<Strategy>,
    /// Measure every strategy this many times, interleaved (medians in the summary).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
}

/// A way of applying reservations; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Autocommit,
    LedgerTxn,
    Batched,
    BareSql,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Autocommit => "autocommit",
            Strategy::LedgerTxn => "ledger-txn",
            Strategy::Batched => "batched",
            Strategy::BareSql => "bare-sql",
        }
    }

    /// The per-order operation, for strategies driven one order per statement/transaction.
    fn per_order(self) -> Option<PerOrder> {
        match self {
            Strategy::Autocommit => Some(PerOrder::Autocommit),
            Strategy::LedgerTxn => Some(PerOrder::LedgerTxn),
            Strategy::Batched | Strategy::BareSql => None,
        }
    }

    /// Whether the strategy writes a ledger row per order.
    fn records_orders(self) -> bool {
        !matches!(self, Strategy::Autocommit)
    }
}

/// One order's worth of work on a connection of its own.
#[derive(Clone, Copy, Debug)]
pub enum PerOrder {
    Autocommit,
    LedgerTxn,
}

const CONDITIONAL_UPDATE: &str =
    "UPDATE stock SET available = available - $2, reserved = reserved + $2 \
     WHERE product_id = $1 AND available >= $2";
const LEDGER_INSERT: &str = "INSERT INTO order_ledger (order_id, status, items, reserved_until) \
     VALUES ($1, 'reserved', $2::jsonb, now() + make_interval(secs => $3)) \
     ON CONFLICT (order_id) DO NOTHING";

impl PerOrder {
    /// Reserves `QUANTITY` of `product` for `order_id`; false if refused (or, for the
    /// ledger, already recorded).
    async fn apply(self, conn: &mut PgConnection, order_id: &str, product: i64) -> Result<bool> {
        match self {
            PerOrder::Autocommit => {
                let done = sqlx::query(CONDITIONAL_UPDATE)
                    .bind(product)
                    .bind(QUANTITY)
                    .execute(&mut *conn)
                    .await
                    .context("conditional UPDATE")?;
                Ok(done.rows_affected() == 1)
            }
            PerOrder::LedgerTxn => {
                let items = format!(r#"[{{"product_id":{product},"quantity":{QUANTITY}}}]"#);
                let mut tx = conn.begin().await.context("BEGIN")?;
                let inserted = sqlx::query(LEDGER_INSERT)
                    .bind(order_id)
                    .bind(items)
                    .bind(RESERVATION_TTL.as_secs_f64())
                    .execute(&mut *tx)
                    .await
                    .context("ledger INSERT")?
                    .rows_affected();
                if inserted == 0 {
                    tx.rollback().await.context("ROLLBACK")?;
                    return Ok(false);
                }
                let updated = sqlx::query(CONDITIONAL_UPDATE)
                    .bind(product)
                    .bind(QUANTITY)
                    .execute(&mut *tx)
                    .await
                    .context("conditional UPDATE")?
                    .rows_affected();
                if updated == 0 {
                    tx.rollback().await.context("ROLLBACK")?;
                    return Ok(false);
                }
                tx.commit().await.context("COMMIT")?;
                Ok(true)
            }
        }
    }
}

/// The raw figures of one measurement (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct ApplyFigures {
    pub bench: &'static str,
    pub round: usize,
    pub strategy: Strategy,
    /// Tasks (connections) applying; 1 for the batched strategy.
    pub concurrency: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    pub orders: usize,
    pub secs: f64,
    pub rate: f64,
    /// Mean time of one operation (an order, or a batch for `batched`) on one connection.
    pub ms_per_op: f64,
    /// This rate over the best `autocommit` rate of the same round.
    pub vs_autocommit: Option<f64>,
    /// This rate over the best `ledger-txn` rate of the same round.
    pub vs_ledger_txn: Option<f64>,
    /// This rate over the best `bare-sql` rate of the same round.
    pub vs_bare_sql: Option<f64>,
    pub refused: usize,
    pub available: i64,
    pub reserved: i64,
    pub ledger_rows: i64,
    pub ok: bool,
}

pub async fn run(stack: &Stack, args: &ApplyArgs) -> Result<bool> {
    ensure!(args.orders > 0, "--orders must be at least 1");
    ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|c| *c > 0),
        "--concurrency must be at least 1"
    );
    ensure!(!args.strategies.is_empty(), "no --strategies to measure");
    let max_conns = args.concurrency.iter().copied().max().unwrap_or(1).max(2);
    let db = BenchDb::create(
        &stack.db,
        &stack.admin()?.db,
        &run_id(),
        u32::try_from(max_conns)?,
    )
    .await?;
    println!(
        "apply: {} orders of {QUANTITY} unit on one hot SKU per measurement; per-order concurrency {:?}; batch {}; database {}",
        args.orders,
        args.concurrency,
        args.batch_size,
        db.name()
    );
    let measured = measure_all(&db.pool, args).await;
    db.cleanup().await;
    let mut figures = measured?;
    add_ratios(&mut figures);
    print_report(&figures)?;
    Ok(figures.iter().all(|f| f.ok))
}

async fn measure_all(pool: &PgPool, args: &ApplyArgs) -> Result<Vec<ApplyFigures>> {
    let mut figures = Vec::new();
    let mut product = 0i64;
    for round in 1..=args.rounds {
        for &strategy in &args.strategies {
            let sweep = if strategy.per_order().is_some() {
                args.concurrency.clone()
            } else {
                vec![1]
            };
            for concurrency in sweep {
                product += 1;
                let f = measure_one(pool, args, round, strategy, concurrency, product)
                    .await
                    .with_context(|| {
                        format!(
                            "round {round}, {} at concurrency {concurrency}",
                            strategy.name()
                        )
                    })?;
                eprintln!(
                    "bench apply: round {round} {} x{concurrency}: {} orders/s{}",
                    strategy.name(),
                    thousands(f.rate),
                    if f.ok { "" } else { " (CHECK FAILED)" }
                );
                figures.push(f);
            }
        }
    }
    Ok(figures)
}

async fn measure_one(
    pool: &PgPool,
    args: &ApplyArgs,
    round: usize,
    strategy: Strategy,
    concurrency: usize,
    product: i64,
) -> Result<ApplyFigures> {
    let initial = 2 * args.orders as i64;
    sqlx::raw_sql("VACUUM (ANALYZE) stock, order_ledger")
        .execute(pool)
        .await
        .context("VACUUM")?;
    sqlx::query(
        "INSERT INTO stock (product_id, available, reserved, sold, total_added) VALUES ($1, $2, 0, 0, $2)",
    )
    .bind(product)
    .bind(initial)
    .execute(pool)
    .await
    .context("creating the product")?;
    let prefix = format!("r{round}-{}-c{concurrency}-", strategy.name());
    let ids: Vec<String> = (0..args.orders).map(|i| format!("{prefix}{i}")).collect();

    let (elapsed, refused, ops) = match strategy.per_order() {
        Some(op) => {
            let (elapsed, refused) =
                run_per_order(pool, op, product, Arc::new(ids), concurrency).await?;
            (elapsed, refused, args.orders as f64 / concurrency as f64)
        }
        None => {
            let (elapsed, refused) = if strategy == Strategy::BareSql {
                run_bare_sql(pool, product, &ids, args.batch_size).await?
            } else {
                run_batched(pool, product, &ids, args.batch_size).await?
            };
            (
                elapsed,
                refused,
                args.orders.div_ceil(args.batch_size) as f64,
            )
        }
    };

    let row = admin::stock_rows(pool, &[product])
        .await
        .context("reading the product back")?
        .first()
        .copied()
        .context("the product's row is gone")?;
    let ledger_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM order_ledger WHERE starts_with(order_id, $1)")
            .bind(&prefix)
            .fetch_one(pool)
            .await
            .context("counting ledger rows")?;
    let n = args.orders as i64;
    let ok = refused == 0
        && row.available + row.reserved == initial
        && row.reserved == n * QUANTITY
        && row.sold == 0
        && ledger_rows == if strategy.records_orders() { n } else { 0 };
    Ok(ApplyFigures {
        bench: "apply",
        round,
        strategy,
        concurrency,
        batch_size: strategy.per_order().is_none().then_some(args.batch_size),
        orders: args.orders,
        secs: elapsed.as_secs_f64(),
        rate: rate(args.orders, elapsed),
        ms_per_op: elapsed.as_secs_f64() * 1000.0 / ops,
        vs_autocommit: None,
        vs_ledger_txn: None,
        vs_bare_sql: None,
        refused,
        available: row.available,
        reserved: row.reserved,
        ledger_rows,
        ok,
    })
}

/// One task of a per-order strategy: its connection, the operation and the product.
struct PerOrderClient {
    conn: PoolConnection<Postgres>,
    op: PerOrder,
    product: i64,
}

impl Client for PerOrderClient {
    type Order = String;

    async fn place(&mut self, order_id: &String) -> Result<bool> {
        self.op.apply(&mut self.conn, order_id, self.product).await
    }
}

/// `concurrency` tasks, each on a connection of its own opened before the clock starts,
/// take the next order until none is left ([`driver::run`]). Returns the time and the
/// orders refused.
async fn run_per_order(
    pool: &PgPool,
    op: PerOrder,
    product: i64,
    ids: Arc<Vec<String>>,
    concurrency: usize,
) -> Result<(Duration, usize)> {
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(PerOrderClient {
            conn: pool.acquire().await.context("opening a connection")?,
            op,
            product,
        });
    }
    let driven = driver::run(clients, ids, &ProgressBar::hidden()).await?;
    Ok((driven.elapsed, driven.refused()))
}

/// `apply_batch` on consecutive batches of reserve commands, from this task.
async fn run_batched(
    pool: &PgPool,
    product: i64,
    ids: &[String],
    batch_size: usize,
) -> Result<(Duration, usize)> {
    let cmds: Vec<DeductCommand> = ids
        .iter()
        .map(|id| DeductCommand::Reserve {
            v: INTERNAL_VERSION,
            order_id: id.clone(),
            items: vec![Item {
                product_id: product,
                quantity: QUANTITY,
            }],
            token: None,
            customer: None,
        })
        .collect();
    // Open the connection before the clock starts, as for the per-order strategies.
    drop(pool.acquire().await.context("opening a connection")?);
    let start = Instant::now();
    let mut refused = 0;
    for batch in cmds.chunks(batch_size) {
        let plan = stock_consumer::store::apply_batch(pool, batch, RESERVATION_TTL)
            .await
            .context("apply_batch")?;
        refused += plan
            .results
            .iter()
            .filter(|r| r.status != Status::Reserved)
            .count();
    }
    Ok((start.elapsed(), refused))
}

/// The statements of `apply_batch` for reservations of `product`, every row built before
/// the clock starts: per batch one transaction of the generation fence, the row lock, the
/// ledger insert, the aggregated UPDATE and the history rows.
async fn run_bare_sql(
    pool: &PgPool,
    product: i64,
    ids: &[String],
    batch_size: usize,
) -> Result<(Duration, usize)> {
    use stock_common::pg_store::{self, Delta, LedgerRow, Movement, OrderStatus};
    let item = Item {
        product_id: product,
        quantity: QUANTITY,
    };
    let batches: Vec<_> = ids
        .chunks(batch_size)
        .enumerate()
        .map(|(b, chunk)| {
            let rows: Vec<(String, LedgerRow)> = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let row = LedgerRow {
                        status: OrderStatus::Reserved,
                        reject: None,
                        release_reason: None,
                        settled_by: None,
                        items: vec![item],
                        token: Some(format!("0.{}", b * batch_size + i)),
                        comp_gen: None,
                        customer: None,
                    };
                    (id.clone(), row)
                })
                .collect();
            let n = chunk.len() as i64 * QUANTITY;
            let deltas = std::collections::BTreeMap::from([(
                product,
                Delta {
                    available: -n,
                    reserved: n,
                    sold: 0,
                },
            )]);
            let movements: Vec<Movement> = chunk
                .iter()
                .map(|id| Movement {
                    product_id: product,
                    kind: "reserve",
                    reference: id.clone(),
                    quantity: QUANTITY,
                    delta: Delta {
                        available: -QUANTITY,
                        reserved: QUANTITY,
                        sold: 0,
                    },
                })
                .collect();
            (rows, deltas, movements)
        })
        .collect();
    let products = std::collections::BTreeSet::from([product]);
    drop(pool.acquire().await.context("opening a connection")?);
    let start = Instant::now();
    for (rows, deltas, movements) in &batches {
        let mut tx = pool.begin().await.context("BEGIN")?;
        pg_store::read_gen(&mut tx).await.context("generation")?;
        pg_store::lock_stock(&mut tx, &products)
            .await
            .context("lock")?;
        pg_store::insert_orders(&mut tx, rows, RESERVATION_TTL)
            .await
            .context("insert")?;
        pg_store::apply_deltas(&mut tx, deltas)
            .await
            .context("update")?;
        pg_store::insert_movements(&mut tx, movements)
            .await
            .context("history")?;
        tx.commit().await.context("COMMIT")?;
    }
    Ok((start.elapsed(), 0))
}

/// Fills `vs_autocommit` / `vs_ledger_txn` / `vs_bare_sql` against the best baseline rate of each round.
fn add_ratios(figures: &mut [ApplyFigures]) {
    let best = |figs: &[ApplyFigures], round: usize, s: Strategy| {
        figs.iter()
            .filter(|f| f.round == round && f.strategy == s)
            .map(|f| f.rate)
            .max_by(f64::total_cmp)
    };
    let snapshot = figures.to_vec();
    for f in figures.iter_mut() {
        f.vs_autocommit =
            best(&snapshot, f.round, Strategy::Autocommit).and_then(|b| report::ratio(f.rate, b));
        f.vs_ledger_txn =
            best(&snapshot, f.round, Strategy::LedgerTxn).and_then(|b| report::ratio(f.rate, b));
        f.vs_bare_sql =
            best(&snapshot, f.round, Strategy::BareSql).and_then(|b| report::ratio(f.rate, b));
    }
}

/// The summary line: medians over rounds of batched / best baseline.
#[derive(Debug, Serialize)]
struct ApplySummary {
    bench: &'static str,
    rounds: usize,
    batched_rate: Option<f64>,
    autocommit_rate: Option<f64>,
    ledger_txn_rate: Option<f64>,
    batched_vs_autocommit: Option<f64>,
    batched_vs_ledger_txn: Option<f64>,
    bare_sql_rate: Option<f64>,
    /// The share of its own shape's limit the consumer reaches (issue 12: at least 0.7).
    batched_vs_bare_sql: Option<f64>,
}

fn print_report(figures: &[ApplyFigures]) -> Result<()> {
    let mut t = Table::new([
        "round",
        "strategy",
        "conns",
        "orders",
        "seconds",
        "orders/s",
        "ms/op",
        "vs autocommit",
        "vs ledger-txn",
        "vs bare-sql",
        "available+reserved",
        "check",
    ]);
    for f in figures {
        t.row([
            f.round.to_string(),
            f.strategy.name().to_owned(),
            f.concurrency.to_string(),
            f.orders.to_string(),
            format!("{:.2}", f.secs),
            thousands(f.rate),
            format!("{:.2}", f.ms_per_op),
            fmt_ratio(f.vs_autocommit),
            fmt_ratio(f.vs_ledger_txn),
            fmt_ratio(f.vs_bare_sql),
            format!("{}+{}", f.available, f.reserved),
            report::yes_no(f.ok).to_owned(),
        ]);
    }
    println!();
    t.print();
    println!(
        "(ms/op: one order per connection for per-order strategies, one batch for batched and bare-sql)"
    );

    let rounds = figures.iter().map(|f| f.round).max().unwrap_or(0);
    let median_of = |pick: &dyn Fn(&ApplyFigures) -> Option<f64>, s: Strategy| {
        report::median(
            (1..=rounds)
                .filter_map(|r| {
                    figures
                        .iter()
                        .filter(|f| f.round == r && f.strategy == s)
                        .filter_map(pick)
                        .max_by(f64::total_cmp)
                })
                .collect(),
        )
    };
    let summary = ApplySummary {
        bench: "apply-summary",
        rounds,
        batched_rate: median_of(&|f| Some(f.rate), Strategy::Batched),
        autocommit_rate: median_of(&|f| Some(f.rate), Strategy::Autocommit),
        ledger_txn_rate: median_of(&|f| Some(f.rate), Strategy::LedgerTxn),
        batched_vs_autocommit: median_of(&|f| f.vs_autocommit, Strategy::Batched),
        batched_vs_ledger_txn: median_of(&|f| f.vs_ledger_txn, Strategy::Batched),
        bare_sql_rate: median_of(&|f| Some(f.rate), Strategy::BareSql),
        batched_vs_bare_sql: median_of(&|f| f.vs_bare_sql, Strategy::Batched),
    };
    println!();
    println!(
        "batched / autocommit (best per round{}): {}",
        if rounds > 1 { ", median" } else { "" },
        fmt_ratio(summary.batched_vs_autocommit)
    );
    println!(
        "batched / ledger-txn (best per round{}): {}",
        if rounds > 1 { ", median" } else { "" },
        fmt_ratio(summary.batched_vs_ledger_txn)
    );
    println!(
        "batched / bare-sql, the same statements without the worker (best per round{}): {}",
        if rounds > 1 { ", median" } else { "" },
        fmt_ratio(summary.batched_vs_bare_sql)
    );
    println!();
    for f in figures {
        json_line(f)?;
    }
    json_line(&summary)?;
    Ok(())
}
