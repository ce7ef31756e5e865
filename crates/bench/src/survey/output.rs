//! The survey's results: `survey.md`, `survey.csv`, `throughput.svg`, and the same tables
//! and one JSON line per cell on stdout.

use super::{CellFigures, PgRedis, Strategy, SurveyArgs, Workload};
use crate::chart::{LogXChart, Series};
use crate::env::Stack;
use crate::load::HOT_PRODUCT;
use crate::report::{csv_line, json_line, thousands, Table};
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// What the survey's text says of a strategy: where, and its §8 claims (or the nearest).
struct Claim {
    survey: &'static str,
    consistency: &'static str,
    performance: &'static str,
}

fn claim(s: Strategy) -> Claim {
    let (survey, consistency, performance) = match s {
        Strategy::Pessimistic => ("§2.1; §8 数据库悲观锁", "强一致", "低"),
        Strategy::Optimistic => ("§2.2; §8 数据库乐观锁", "强一致", "中"),
        Strategy::Atomic => ("§2.3; not in §8", "§2.3: 天然防止超卖", "§2.3: 性能较好"),
        Strategy::RedisLua => ("§3.1; §8 Redis Lua脚本", "强一致", "高"),
        Strategy::RedisLock => ("§3.2; not in §8", "-", "-"),
        Strategy::RedisSharded => (
            "§7.1; §8.2 秒杀: 库存预扣 + 分片策略",
            "-",
            "§8.2: 处理突发流量",
        ),
        Strategy::Pipeline => (
            "this project; nearest §8 row 消息队列异步",
            "最终一致",
            "高",
        ),
    };
    Claim {
        survey,
        consistency,
        performance,
    }
}

fn ms(v: f64) -> String {
    format!("{v:.2}")
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The machine and the versions of the stack.
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub load_before: String,
    pub load_after: String,
    pub postgres: String,
    pub redis: String,
    pub librdkafka: String,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// `/proc/loadavg`'s three averages.
fn load_average() -> String {
    let raw = read_trimmed("/proc/loadavg");
    raw.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

impl Machine {
    /// Reads what it can; what it cannot is "unknown" (the figures do not depend on it).
    pub async fn probe(stack: &Stack) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let postgres = async {
            let pool = stock_common::db::pool(&stack.db)?;
            let v: String = sqlx::query_scalar("SHOW server_version")
                .fetch_one(&pool)
                .await?;
            pool.close().await;
            anyhow::Ok(v)
        }
        .await
        .unwrap_or_else(|e| format!("unknown ({e})"));
        let redis = async {
            let client = stock_common::redis_store::client(&stack.redis)?;
            let mut conn = stock_common::redis_store::raw_connection(&client).await?;
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut conn)
                .await?;
            let v = info
                .lines()
                .find_map(|l| l.strip_prefix("redis_version:"))
                .unwrap_or("unknown")
                .trim()
                .to_owned();
            anyhow::Ok(v)
        }
        .await
        .unwrap_or_else(|e| format!("unknown ({e})"));
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            load_before: load_average(),
            load_after: String::new(),
            postgres,
            redis,
            librdkafka: rdkafka::util::get_rdkafka_version().1,
        }
    }

    pub fn with_load_after(self) -> Machine {
        Machine {
            load_after: load_average(),
            ..self
        }
    }
}

/// The workload in one paragraph.
pub fn describe_workload(args: &SurveyArgs, work: &Workload) -> String {
    let units: i64 = work.stock.values().sum();
    let wanted: i64 = work.demand.values().sum();
    let hot_items = work
        .orders
        .iter()
        .flat_map(|o| &o.items)
        .filter(|it| it.product_id == HOT_PRODUCT)
        .count();
    let items: usize = work.orders.iter().map(|o| o.items.len()).sum();
    let stock = match args.stock {
        Some(n) => format!("{n} units of every product"),
        None => format!("{:.0}% of each product's demand", args.fill * 100.0),
    };
    format!(
        "survey: {} orders of {} item(s), quantities 1-{}, over {} products; skew {:.2} \
         ({hot_items} of {items} items on hot product {HOT_PRODUCT}: {} units wanted, {} in stock); \
         stock {stock}: {units} units for {wanted} wanted ({:.0}%); seed {}; \
         {} shards for redis-sharded; {} partitions for pipeline; concurrency {:?}",
        work.spec.orders,
        work.spec.items_per_order,
        work.spec.max_quantity,
        work.spec.products,
        args.skew,
        work.demand.get(&HOT_PRODUCT).copied().unwrap_or(0),
        work.stock.get(&HOT_PRODUCT).copied().unwrap_or(0),
        100.0 * units as f64 / wanted.max(1) as f64,
        work.spec.seed,
        args.shards,
        args.partitions,
        args.concurrency,
    )
}

/// Strategies in the order of their first cell.
fn strategies(figures: &[CellFigures]) -> Vec<Strategy> {
    let mut out: Vec<Strategy> = Vec::new();
    for f in figures {
        if !out.contains(&f.strategy) {
            out.push(f.strategy);
        }
    }
    out
}

/// The survey's §8 table with the measured columns: one row per strategy.
pub fn summary_table(figures: &[CellFigures]) -> Table {
    let mut t = Table::new([
        "strategy",
        "survey",
        "claimed consistency",
        "claimed performance",
        "peak orders/s (at concurrency)",
        "p50 / p99 / max ms at peak",
        "oversold units (worst)",
        "wrongly refused (worst)",
        "store consistent",
        "PostgreSQL = Redis",
    ]);
    for s in strategies(figures) {
        let cells: Vec<&CellFigures> = figures.iter().filter(|f| f.strategy == s).collect();
        let Some(peak) = cells
            .iter()
            .copied()
            .max_by(|a, b| a.throughput.total_cmp(&b.throughput))
        else {
            continue;
        };
        let c = claim(s);
        let consistent = cells.iter().filter(|f| f.store_consistent).count();
        let pg_redis = match cells.iter().filter_map(|f| f.pg_redis.differing()).max() {
            Some(worst) => PgRedis::Compared { differing: worst }.label(),
            None => peak.pg_redis.label(),
        };
        t.row([
            s.name().to_owned(),
            c.survey.to_owned(),
            c.consistency.to_owned(),
            c.performance.to_owned(),
            format!("{} (x{})", thousands(peak.throughput), peak.concurrency),
            format!(
                "{} / {} / {}",
                ms(peak.p50_ms),
                ms(peak.p99_ms),
                ms(peak.max_ms)
            ),
            cells
                .iter()
                .map(|f| f.oversold_units)
                .max()
                .unwrap_or(0)
                .to_string(),
            cells
                .iter()
                .map(|f| f.wrongly_refused)
                .max()
                .unwrap_or(0)
                .to_string(),
            if consistent == cells.len() {
                "yes".to_owned()
            } else {
                format!("no ({} of {} runs)", cells.len() - consistent, cells.len())
            },
            pg_redis,
        ]);
    }
    t
}

/// One row per cell.
pub fn cells_table(figures: &[CellFigures]) -> Table {
    let mut t = Table::new([
        "strategy",
        "concurrency",
        "orders/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "granted",
        "refused",
        "oversold units",
        "wrongly refused",
        "store consistent",
        "PostgreSQL = Redis",
    ]);
    for f in figures {
        t.row([
            f.strategy.name().to_owned(),
            f.concurrency.to_string(),
            thousands(f.throughput),
            ms(f.p50_ms),
            ms(f.p99_ms),
            ms(f.max_ms),
            f.granted.to_string(),
            f.refused.to_string(),
            f.oversold_units.to_string(),
            f.wrongly_refused.to_string(),
            if f.store_consistent {
                "yes".to_owned()
            } else {
                format!("no ({} products)", f.inconsistent_products)
            },
            f.pg_redis.label(),
        ]);
    }
    t
}

/// `survey.csv`: a header and one row per cell.
pub fn csv(figures: &[CellFigures]) -> String {
    let mut out = csv_line([
        "strategy",
        "concurrency",
        "orders",
        "secs",
        "throughput",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "granted",
        "refused",
        "granted_units",
        "oversold_units",
        "wrongly_refused",
        "store_consistent",
        "inconsistent_products",
        "pg_redis",
        "pg_redis_differing",
    ]);
    for f in figures {
        out.push('\n');
        out.push_str(&csv_line([
            f.strategy.name().to_owned(),
            f.concurrency.to_string(),
            f.orders.to_string(),
            format!("{:.3}", f.secs),
            format!("{:.1}", f.throughput),
            format!("{:.3}", f.p50_ms),
            format!("{:.3}", f.p99_ms),
            format!("{:.3}", f.max_ms),
            f.granted.to_string(),
            f.refused.to_string(),
            f.granted_units.to_string(),
            f.oversold_units.to_string(),
            f.wrongly_refused.to_string(),
            yes_no(f.store_consistent).to_owned(),
            f.inconsistent_products.to_string(),
            f.pg_redis.label(),
            f.pg_redis_differing
                .map(|n| n.to_string())
                .unwrap_or_default(),
        ]));
    }
    out.push('\n');
    out
}

/// This process's command line, quoted for a POSIX shell where needed.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

const NOTES: &str = "\
## How to read it

* Every strategy x concurrency (a run) starts from freshly loaded stock and places the same \
  orders, in the same queue order. Each client has a connection of its own, opened before \
  the clock starts, and places one order at a time (closed loop).
* **orders/s**: orders / time from the first order taken to the last answered. **Latency**: \
  one order, from the client placing it to its answer (nearest-rank percentiles). Refused \
  orders count: a strategy that refuses wrongly and fast (a taken lock, a version miss) \
  looks faster than one that sells, so read orders/s with the granted and wrongly refused \
  columns.
* **oversold units**: per product the larger of the units granted beyond its stock and the \
  stock left below zero in the store, summed (the PostgreSQL table has no CHECK constraint, \
  so that an oversell would show).
* **wrongly refused**: orders refused although, at the end, the stock left \
  (initial - granted) of every one of their products still covered their quantity.
* **store consistent**: the store holds initial - granted for every product (the sum of its \
  shards for redis-sharded, PostgreSQL `available` for the pipeline).
* **PostgreSQL = Redis**: pipeline only, once idle: `stock:{p}` equals `available` for every \
  product. The other strategies keep one store.

## Departures from the survey's text

* `redis-lua`: the 1-hour `EXPIRE` on stock keys is dropped (stock must not vanish), and the \
  script returns -2 when short. As printed, it returns the current stock when short, which \
  its Java caller takes for a success: the survey's code grants every order once stock is \
  short, without taking anything.
* `optimistic`: the survey's loop is kept as written, a shortage is retried like a version \
  miss and the loop sleeps (10, 15, 20 ms) after each failed attempt, the last one included: \
  every refused order costs at least 45 ms.
* `redis-lock`: as written, an order that finds a lock taken fails at once \
  (\"获取锁失败，请稍后重试\"); those show as wrongly refused.
* `redis-sharded`: as written, the plan reads shards 0, 1, ... one GET each, without \
  atomicity, so every order starts on the same shards; a plan made stale by a concurrent \
  order fails and is refused.
* Database and Redis errors are not retried: none is expected, and one stops the survey.
";

/// `survey.md`.
pub fn markdown(
    args: &SurveyArgs,
    work: &Workload,
    machine: &Machine,
    figures: &[CellFigures],
    command: &str,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# The survey's strategies, measured\n");
    let _ = writeln!(
        md,
        "Reference: `inventory-consistency.md` §2.1 悲观锁, §2.2 乐观锁, §2.3 原子操作, \
         §3.1 Redis Lua, §3.2 Redis SET NX 锁, §7.1 分片, §8 对比; and this project's \
         pipeline.\n"
    );
    let _ = writeln!(md, "## §8 with measured columns\n");
    let _ = writeln!(md, "{}\n", summary_table(figures).markdown());
    let _ = writeln!(md, "![throughput](throughput.svg)\n");
    let _ = writeln!(md, "## Every run\n");
    let _ = writeln!(md, "{}\n", cells_table(figures).markdown());
    let _ = writeln!(md, "## Workload\n");
    let _ = writeln!(md, "{}\n", describe_workload(args, work));
    let _ = writeln!(md, "## Machine\n");
    let _ = writeln!(
        md,
        "* CPUs (`nproc`): {}; {}\n* kernel {}\n* load average before: {}; after: {}\n\
         * PostgreSQL {}, Redis {}, librdkafka {}; stock-bench {}\n",
        machine.nproc,
        machine.cpu,
        machine.kernel,
        machine.load_before,
        machine.load_after,
        machine.postgres,
        machine.redis,
        machine.librdkafka,
        env!("CARGO_PKG_VERSION"),
    );
    let _ = writeln!(md, "## Command\n\n```\n{command}\n```\n");
    md.push_str(NOTES);
    md
}

/// `throughput.svg`.
pub fn chart(figures: &[CellFigures], path: &Path) -> Result<()> {
    let series: Vec<Series> = strategies(figures)
        .into_iter()
        .map(|s| Series {
            name: s.name().to_owned(),
            points: figures
                .iter()
                .filter(|f| f.strategy == s)
                .map(|f| (f.concurrency as f64, f.throughput))
                .collect(),
        })
        .collect();
    LogXChart {
        title: "Survey strategies: throughput against concurrency",
        x_label: "concurrent clients (log2)",
        y_label: "orders/s",
        x_span: (1.0, 256.0),
        series: &series,
    }
    .write_svg(path)
}

/// Writes the three files to `out`.
pub fn write_all(
    out: &Path,
    args: &SurveyArgs,
    work: &Workload,
    machine: &Machine,
    figures: &[CellFigures],
) -> Result<()> {
    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write(
        "survey.md",
        markdown(args, work, machine, figures, &command_line()),
    )?;
    write("survey.csv", csv(figures))?;
    chart(figures, &out.join("throughput.svg"))
}

/// The tables and the JSON lines, on stdout.
pub fn print(figures: &[CellFigures]) -> Result<()> {
    println!();
    summary_table(figures).print();
    println!();
    cells_table(figures).print();
    println!();
    for f in figures {
        json_line(f)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(strategy: Strategy, concurrency: usize, throughput: f64) -> CellFigures {
        CellFigures {
            bench: "survey",
            strategy,
            concurrency,
            orders: 10,
            secs: 10.0 / throughput,
            throughput,
            p50_ms: 1.0,
            p99_ms: 2.5,
            max_ms: 3.0,
            granted: 7,
            refused: 3,
            granted_units: 9,
            oversold_units: 0,
            wrongly_refused: usize::from(concurrency > 1),
            store_consistent: true,
            inconsistent_products: 0,
            pg_redis: PgRedis::PostgresOnly,
            pg_redis_differing: None,
        }
    }

    #[test]
    fn csv_has_a_row_per_cell() {
        let mut piped = cell(Strategy::Pipeline, 8, 500.0);
        piped.pg_redis = PgRedis::Compared { differing: 2 };
        piped.pg_redis_differing = Some(2);
        let text = csv(&[cell(Strategy::Atomic, 1, 1234.5678), piped]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("strategy,concurrency,orders,secs,throughput,"));
        assert_eq!(
            lines[1],
            "atomic,1,10,0.008,1234.6,1.000,2.500,3.000,7,3,9,0,0,yes,0,n/a (PostgreSQL only),"
        );
        assert!(
            lines[2].ends_with(",no (2 products differ),2"),
            "{}",
            lines[2]
        );
        assert!(lines
            .iter()
            .all(|l| l.split(',').count() == lines[0].split(',').count()));
    }

    #[test]
    fn summary_takes_the_peak_and_the_worst() {
        let figures = [
            cell(Strategy::Optimistic, 1, 100.0),
            cell(Strategy::Optimistic, 4, 300.0),
            cell(Strategy::Optimistic, 16, 200.0),
        ];
        let t = summary_table(&figures).render();
        let row = t.lines().nth(2).unwrap();
        assert!(row.contains("300 (x4)"), "{row}");
        assert!(row.contains("强一致"), "{row}");
        assert!(row.contains("1.00 / 2.50 / 3.00"), "{row}");
        assert_eq!(t.lines().count(), 3);
    }
}
