//! `bench redis`: the producer's Redis stage alone, against the Redis-side limit.
//!
//! The limit is `redis-benchmark` (the one shipped with the server) sending the reserve
//! script with EVALSHA, one order per call, `-P 16` pipelining over 50 connections: as fast
//! as Redis runs that script from any client. Then `RedisStore::reserve_many` (the
//! producer's own call) decides the same kind of orders, batch after batch of
//! `--batch-size` as the producer does, once per `--orders-per-call` value. Every order
//! reserves one unit of one hot product holding enough for all, so that every order does
//! the full work (record check, stock check, DECRBY, record write); `--sold-out` adds a
//! measurement where the product is sold out, with and without the producer's sold-out
//! marker. Figures: orders/s, and each as a ratio of the redis-benchmark figure measured in
//! the same run.

use crate::env::{run_id, RedisSlot, Stack};
use crate::report::{fmt_ratio, json_line, rate, thousands, Table};
use anyhow::{bail, Context, Result};
use redis::AsyncCommands;
use serde::Serialize;
use stock_common::events::Item;
use stock_common::redis_store::{
    buyers_key, stock_key, Guards, RedisStore, ReserveOutcome, ReserveRequest, SoldOutMarker,
    EPOCH_KEY, LOADED_KEY, RECORD_BASE, RESERVE_LUA, SEQ_KEY,
};
use tokio::time::Instant;

/// The hot product every order of this benchmark reserves.
const PRODUCT: i64 = 1;

#[derive(clap::Args, Clone, Debug)]
pub struct RedisStageArgs {
    /// Orders per measurement.
    #[arg(long, default_value_t = 200_000)]
    pub orders: usize,
    /// Orders per `reserve_many` call (the producer's batch).
    #[arg(long, default_value_t = 2000)]
    pub batch_size: usize,
    /// Orders per script call to measure, comma separated (`--orders-per-call` of the
    /// producer).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,500")]
    pub orders_per_call: Vec<u16>,
    /// Connections the producer spreads a batch over to measure, comma separated
    /// (`--redis-connections` of the producer), each with every `--orders-per-call`.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub connections: Vec<u8>,
    /// Also measure a sold-out product, without and with the sold-out marker.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub sold_out: bool,
    /// Products the orders of `reserve_many` go to in turn (1: every order for the hot
    /// product; more: a call meets many products, as a sale of many SKUs does).
    #[arg(long, default_value_t = 1)]
    pub products: i64,
    /// Path of redis-benchmark.
    #[arg(long, default_value = "redis-benchmark")]
    pub redis_benchmark: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisFigure {
    pub bench: &'static str,
    pub what: String,
    pub orders: usize,
    pub orders_per_s: f64,
    /// Against redis-benchmark in the same run.
    pub vs_limit: Option<f64>,
    /// Redis memory (`used_memory`) grown per order remembered by this measurement.
    pub bytes_per_order: Option<f64>,
    /// Redis's CPU (`INFO cpu`: user and system, every thread) per order of this
    /// measurement: the figure that travels to other machines.
    pub redis_cpu_us_per_order: Option<f64>,
}

pub async fn run(stack: &Stack, args: &RedisStageArgs) -> Result<bool> {
    anyhow::ensure!(
        args.orders > 0 && args.batch_size > 0 && args.products > 0,
        "--orders, --batch-size and --products must be at least 1"
    );
    let id = run_id();
    let slot = RedisSlot::claim(&stack.redis, &stack.admin()?.redis, &id).await?;
    let measured = measure(&slot, args, &id).await;
    slot.cleanup().await;
    let figures = measured?;
    let mut t = Table::new([
        "redis stage",
        "orders/s",
        "of redis-benchmark -P 16",
        "Redis bytes per remembered order",
        "Redis CPU µs/order",
    ]);
    for f in &figures {
        t.row([
            f.what.clone(),
            thousands(f.orders_per_s),
            fmt_ratio(f.vs_limit),
            f.bytes_per_order
                .map_or_else(|| "-".into(), |b| format!("{b:.1}")),
            f.redis_cpu_us_per_order
                .map_or_else(|| "-".into(), |c| format!("{c:.1}")),
        ]);
    }
    println!();
    t.print();
    println!();
    for f in &figures {
        json_line(f)?;
    }
    Ok(true)
}

async fn measure(slot: &RedisSlot, args: &RedisStageArgs, id: &str) -> Result<Vec<RedisFigure>> {
    let mut conn = slot.store.connection();
    let _: () = conn.set(LOADED_KEY, "1").await?;
    let plenty = (args.orders as i64) * 4 + 1_000_000;
    for p in PRODUCT..PRODUCT + args.products {
        let _: () = conn.set(stock_key(p), plenty).await?;
    }

    eprintln!("bench redis: redis-benchmark EVALSHA -P 16 ...");
    let cpu = redis_cpu(&mut conn).await?;
    let limit = redis_benchmark(slot, args).await?;
    let limit_cpu = per_order(redis_cpu(&mut conn).await? - cpu, args.orders);
    let mut figures = vec![RedisFigure {
        bench: "redis",
        what: "redis-benchmark: EVALSHA reserve, 1 order/call, -P 16, 50 clients".into(),
        orders: args.orders,
        orders_per_s: limit,
        vs_limit: Some(1.0),
        bytes_per_order: None,
        redis_cpu_us_per_order: Some(limit_cpu),
    }];
    let push =
        |figures: &mut Vec<RedisFigure>, what: String, r: f64, bytes: Option<f64>, cpu: f64| {
            figures.push(RedisFigure {
                bench: "redis",
                what,
                orders: args.orders,
                orders_per_s: r,
                vs_limit: (limit > 0.0).then(|| r / limit),
                bytes_per_order: bytes,
                redis_cpu_us_per_order: Some(cpu),
            })
        };
    // The layout before issue 12 (one string key with a lifetime per order), written
    // here with records of the same length, as the same-run baseline of the memory.
    eprintln!("bench redis: one key per order (the old layout), memory only ...");
    let before = used_memory(&mut conn).await?;
    for chunk in (0..args.orders).collect::<Vec<_>>().chunks(5000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            pipe.set_ex(
                format!("stockpipe:order:rb-{id}-key-{i}"),
                format!("R|1.{}|{PRODUCT}:1", 100_000 + i),
                3600,
            )
            .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
    }
    let grown = used_memory(&mut conn).await?.saturating_sub(before);
    figures.push(RedisFigure {
        bench: "redis",
        what: "one string key with a lifetime per order (before issue 12), memory".into(),
        orders: args.orders,
        orders_per_s: 0.0,
        vs_limit: None,
        bytes_per_order: Some(grown as f64 / args.orders as f64),
        redis_cpu_us_per_order: None,
    });
    for &lanes in &args.connections {
        for &opc in &args.orders_per_call {
            eprintln!(
                "bench redis: reserve_many, {opc} order(s) per call, {lanes} connection(s) ..."
            );
            let mut a = slot.args.clone();
            a.orders_per_call = opc;
            a.connections = lanes;
            let store = RedisStore::connect_producer(&a).await?;
            let before = used_memory(&mut conn).await?;
            let cpu = redis_cpu(&mut conn).await?;
            let r = drive(
                &store,
                args,
                &format!("{id}-{opc}-{lanes}"),
                false,
                true,
                args.products,
            )
            .await?;
            let cpu = per_order(redis_cpu(&mut conn).await? - cpu, args.orders);
            let grown = used_memory(&mut conn).await?.saturating_sub(before);
            push(
                &mut figures,
                format!(
                    "producer reserve_many, {opc} order(s)/call, {lanes} connection(s), \
                     batches of {}",
                    args.batch_size
                ),
                r,
                Some(grown as f64 / args.orders as f64),
                cpu,
            );
        }
    }
    if args.sold_out {
        let _: () = redis::pipe()
            .atomic()
            .set(stock_key(PRODUCT), 0)
            .ignore()
            .incr(EPOCH_KEY, 1)
            .ignore()
            .query_async(&mut conn)
            .await?;
        let store = RedisStore::connect_producer(&slot.args).await?;
        for marker in [false, true] {
            eprintln!("bench redis: sold out, marker {marker} ...");
            let cpu = redis_cpu(&mut conn).await?;
            let r = drive(&store, args, &format!("{id}-so-{marker}"), marker, false, 1).await?;
            let cpu = per_order(redis_cpu(&mut conn).await? - cpu, args.orders);
            push(
                &mut figures,
                format!(
                    "sold out, {} orders/call, marker {}",
                    slot.args.orders_per_call,
                    if marker { "on" } else { "off" }
                ),
                r,
                None,
                cpu,
            );
        }
    }
    Ok(figures)
}

/// Redis `used_memory` (the whole server: run on a quiet one).
async fn used_memory(conn: &mut stock_common::redis_store::RedisConn) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
        .context("no used_memory in INFO memory")
}

/// Redis's CPU seconds so far (`INFO cpu`: `used_cpu_user` + `used_cpu_sys`).
async fn redis_cpu(conn: &mut stock_common::redis_store::RedisConn) -> Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .with_context(|| format!("no {name} in INFO cpu"))
    };
    Ok(field("used_cpu_user:")? + field("used_cpu_sys:")?)
}

/// CPU seconds spent on `orders` orders, in µs per order.
fn per_order(seconds: f64, orders: usize) -> f64 {
    seconds * 1e6 / orders.max(1) as f64
}

/// Decides `args.orders` fresh orders for `products` products in turn, batch after batch;
/// checks each outcome.
async fn drive(
    store: &RedisStore,
    args: &RedisStageArgs,
    prefix: &str,
    use_marker: bool,
    expect_held: bool,
    products: i64,
) -> Result<f64> {
    let reqs: Vec<ReserveRequest> = (0..args.orders)
        .map(|i| ReserveRequest {
            order_id: format!("rb-{prefix}-{i}"),
            items: vec![Item {
                product_id: PRODUCT + (i as i64) % products,
                quantity: 1,
            }],
            forced: None,
            customer: None,
            replaces: None,
        })
        .collect();
    let mut marker = SoldOutMarker::default();
    let t = Instant::now();
    for batch in reqs.chunks(args.batch_size) {
        let guards = if use_marker {
            marker.guards(batch)
        } else {
            Guards::default()
        };
        let reply = store.reserve_many(batch, &guards).await?;
        marker.learn(&reply);
        for o in &reply.outcomes {
            let ok = match o {
                ReserveOutcome::Decided { record, fresh } => {
                    *fresh
                        && matches!(record, stock_common::redis_store::OrderRecord::Held { .. })
                            == expect_held
                }
                _ => false,
            };
            if !ok {
                bail!("unexpected outcome {o:?}");
            }
        }
    }
    Ok(rate(args.orders, t.elapsed()))
}

/// Runs redis-benchmark on the reserve script; returns its requests per second.
async fn redis_benchmark(slot: &RedisSlot, args: &RedisStageArgs) -> Result<f64> {
    let mut conn = slot.store.connection();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(RESERVE_LUA.as_str())
        .query_async(&mut conn)
        .await?;
    let url = url::Url::parse(slot.args.url.expose()).context("Redis URL")?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(6379).to_string();
    let mut cmd = tokio::process::Command::new(&args.redis_benchmark);
    if let Some(pw) = url.password() {
        // From the environment, never on the command line (visible to `ps`).
        cmd.env("REDISCLI_AUTH", pw);
    }
    let stock = stock_key(PRODUCT);
    let item = format!("{PRODUCT}:1");
    let out = cmd
        .args(["-h", &host, "-p", &port, "--dbnum", &slot.index.to_string()])
        .args([
            "-n",
            &args.orders.to_string(),
            "-P",
            "16",
            "-c",
            "50",
            "-r",
            "1000000000000",
            "-q",
        ])
        .args(["EVALSHA", &sha, "6", LOADED_KEY, EPOCH_KEY, SEQ_KEY])
        .arg(RECORD_BASE)
        .arg(&stock)
        .arg(buyers_key(PRODUCT))
        .args([
            "3600",
            "",
            "",
            // A record field (12 bytes; lua/record.lua buckets by its first 4).
            "__rand_int__",
            "1",
            &item,
            "",
            "",
            "1",
        ])
        .output()
        .await
        .with_context(|| format!("running {}", args.redis_benchmark))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The last line: "EVALSHA ...: 31826.86 requests per second, p50=23.455 msec".
    let last = text
        .rsplit(['\r', '\n'])
        .find(|l| l.contains("requests per second"))
        .with_context(|| {
            format!(
                "redis-benchmark said: {} {}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    let rps = last
        .split(": ")
        .last()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .with_context(|| format!("cannot read {last:?}"))?;
    Ok(rps)
}
