//! Loading Redis from PostgreSQL: the only way stock gets into an empty Redis, and what
//! lets the producer sell again after Redis lost its data (contract guarantee 6).
//!
//! [`rebuild`] is the operators' command, safe while the workers run:
//! 1. delete the `stockpipe:loaded` marker: from then on both scripts refuse to act, so the
//!    producer neither sells nor rejects (it retries its batch, offsets unmoved);
//! 2. wait until nothing is in flight: `stock.deduct` has not grown for a quiet period (the
//!    producer's last batch that passed the scripts is published) and the consumer group has
//!    committed all of it (PostgreSQL holds every pre-deduction). Compensations need no
//!    wait: PostgreSQL already reflects them, and step 4 marks their orders given back;
//! 3. drop every order record and request marker (what is not in PostgreSQL is redone by
//!    the producer: an order whose deduct never got out is simply decided again);
//! 4. load `stock:{id}` from `available`, the records of every ledger order, the markers of
//!    recent operator requests, and — from `stock.results` — the refusals Redis decided
//!    (they never reach PostgreSQL), so that a replayed order keeps its one outcome;
//! 5. set the marker: selling resumes.

use crate::admin::AdminError;
use rdkafka::message::Message;
use redis::AsyncCommands;
use sqlx::{PgPool, Row};
use std::time::{Duration, Instant};
use stock_common::config::{KafkaArgs, Topics};
use stock_common::events::{Status, StockResult};
use stock_common::kafka;
use stock_common::redis_store::{
    order_key, request_key, stock_key, OrderRecord, RedisStore, EPOCH_KEY, LOADED_KEY,
};

/// Settings of `stockctl rebuild`.
#[derive(clap::Args, Clone, Debug)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub topics: Topics,
    /// The consumer workers' group, whose progress on `stock.deduct` is waited for.
    #[arg(
        long = "consumer-group",
        env = "CONSUMER_GROUP",
        default_value = "stock-consumer"
    )]
    pub consumer_group: String,
    /// How long `stock.deduct` must stay unchanged to count as quiet.
    #[arg(long = "quiet-period", default_value = "2s", value_parser = stock_common::config::parse_duration)]
    pub quiet: Duration,
    /// Give up (selling stays stopped) if the pipeline does not drain within this.
    #[arg(long = "drain-timeout", default_value = "300s", value_parser = stock_common::config::parse_duration)]
    pub drain_timeout: Duration,
}

/// What a rebuild loaded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RebuildReport {
    pub products: usize,
    pub orders: usize,
    pub refusals: usize,
    pub requests: usize,
    pub drained_in_ms: u128,
}

/// The whole rebuild (module docs). On error selling stays stopped; run it again.
pub async fn rebuild(
    pool: &PgPool,
    redis: &RedisStore,
    kafka_args: &KafkaArgs,
    args: &RebuildArgs,
) -> Result<RebuildReport, AdminError> {
    let mut conn = redis.connection();
    let _: () = conn.del(LOADED_KEY).await?;
    tracing::warn!("selling stopped: waiting for the pipeline to drain");
    let started = Instant::now();
    wait_drained(kafka_args, args).await?;
    let drained_in_ms = started.elapsed().as_millis();

    for pattern in ["stockpipe:order:*", "stockpipe:request:*"] {
        let mut keys: Vec<String> = Vec::new();
        {
            let mut scan_conn = redis.connection();
            let mut iter: redis::AsyncIter<String> = scan_conn.scan_match(pattern).await?;
            while let Some(k) = iter.next_item().await {
                keys.push(k?);
            }
        }
        for chunk in keys.chunks(1000) {
            let _: () = conn.unlink(chunk).await?;
        }
    }
    let (products, orders) = load_stock_and_ledger(pool, redis).await?;
    let requests = load_requests(pool, redis).await?;
    let refusals = load_refusals(redis, kafka_args, &args.topics.results).await?;
    let _: () = conn
        .set(LOADED_KEY, chrono::Utc::now().to_rfc3339())
        .await?;
    tracing::info!(
        products,
        orders,
        refusals,
        requests,
        "redis rebuilt; selling resumes"
    );
    Ok(RebuildReport {
        products,
        orders,
        refusals,
        requests,
        drained_in_ms,
    })
}

/// Waits until `stock.deduct` has been quiet for `args.quiet` and the consumer group has
/// committed all of it.
async fn wait_drained(kafka_args: &KafkaArgs, args: &RebuildArgs) -> Result<(), AdminError> {
    let deadline = Instant::now() + args.drain_timeout;
    let topic = &args.topics.deduct;
    let mut last = kafka::end_offsets(kafka_args, topic).map_err(kafka_err)?;
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let ends = kafka::end_offsets(kafka_args, topic).map_err(kafka_err)?;
        if ends != last {
            last = ends;
            quiet_since = Instant::now();
            continue;
        }
        let committed =
            kafka::committed_offsets(kafka_args, &args.consumer_group, topic).map_err(kafka_err)?;
        let caught_up = committed.iter().zip(&ends).all(|(c, e)| c >= e);
        if caught_up && quiet_since.elapsed() >= args.quiet {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(AdminError::Invalid(format!(
                "the pipeline did not drain within {:?} (deduct ends {ends:?}, consumer committed {committed:?}); \
                 selling stays stopped: is the consumer running? run rebuild again",
                args.drain_timeout
            )));
        }
    }
}

fn kafka_err(e: rdkafka::error::KafkaError) -> AdminError {
    AdminError::Invalid(format!("kafka: {e}"))
}

/// Markers of the operator requests recent enough to be retried.
async fn load_requests(pool: &PgPool, redis: &RedisStore) -> Result<usize, AdminError> {
    let ttl = redis.record_ttl_secs();
    let rows = sqlx::query(
        "SELECT request_id, available_delta FROM stock_request WHERE at > now() - make_interval(secs => $1)",
    )
    .bind(ttl as f64)
    .fetch_all(pool)
    .await?;
    let mut conn = redis.connection();
    for chunk in rows.chunks(1000) {
        let mut pipe = redis::pipe();
        for r in chunk {
            pipe.set_ex(
                request_key(r.try_get::<&str, _>(0)?),
                r.try_get::<i64, _>(1)?,
                ttl,
            )
            .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
    }
    Ok(rows.len())
}

/// The refusals Redis decided, from the results topic: a `rejected` result for an order
/// that has no record yet (orders PostgreSQL refused have theirs from the ledger).
async fn load_refusals(
    redis: &RedisStore,
    kafka_args: &KafkaArgs,
    topic: &str,
) -> Result<usize, AdminError> {
    let mut refusals: Vec<(String, String)> = Vec::new();
    kafka::read_to_end(kafka_args, topic, |m| {
        if let Some(Ok(r)) = m.payload().map(serde_json::from_slice::<StockResult>) {
            if let (Status::Rejected, Some(reason)) = (r.status, r.reason) {
                let rec = OrderRecord::Refused {
                    reason,
                    product_id: r.product_id,
                };
                refusals.push((r.order_id, rec.encode()));
            }
        }
    })
    .await
    .map_err(kafka_err)?;
    let ttl = redis.record_ttl_secs();
    let mut conn = redis.connection();
    let mut loaded = 0;
    for chunk in refusals.chunks(1000) {
        let mut pipe = redis::pipe();
        for (id, rec) in chunk {
            pipe.cmd("SET")
                .arg(order_key(id))
                .arg(rec)
                .arg("NX")
                .arg("EX")
                .arg(ttl);
        }
        let replies: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
        loaded += replies.iter().filter(|r| r.is_some()).count();
    }
    Ok(loaded)
}

/// Loads Redis from PostgreSQL without waiting for anything: every `stock:{id}` from
/// `available`, every ledger order's record, then the "loaded" marker. Returns (products,
/// orders). For an idle pipeline or a stopped producer (first load, tests); [`rebuild`] is
/// the command for a running pipeline.
pub async fn load_from_postgres(
    pool: &PgPool,
    redis: &RedisStore,
) -> Result<(usize, usize), AdminError> {
    let loaded = load_stock_and_ledger(pool, redis).await?;
    let _: () = redis
        .connection()
        .set(LOADED_KEY, chrono::Utc::now().to_rfc3339())
        .await?;
    Ok(loaded)
}

/// Every `stock:{id}` from `available`, and every ledger order's record: held for reserved
/// and confirmed orders, given back for rejected and released ones.
async fn load_stock_and_ledger(
    pool: &PgPool,
    redis: &RedisStore,
) -> Result<(usize, usize), AdminError> {
    let mut conn = redis.connection();
    // One snapshot for the stock and the ledger: a release (cancel, expiry) committed
    // between two separate reads would be in the ledger ("given back", so its compensation
    // restores nothing) but not in `available` — Redis would stay short forever. In one
    // snapshot, a later release still finds its order held and its compensation restores.
    let mut snap = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *snap)
        .await?;
    let stock = sqlx::query("SELECT product_id, available FROM stock ORDER BY product_id")
        .fetch_all(&mut *snap)
        .await?;
    for chunk in stock.chunks(1000) {
        // Atomic with the epoch change, so that no sold-out marker outlives these values.
        let mut pipe = redis::pipe();
        pipe.atomic().incr(EPOCH_KEY, 1).ignore();
        for r in chunk {
            pipe.set(stock_key(r.try_get::<i64, _>(0)?), r.try_get::<i64, _>(1)?)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
    }
    let ttl = redis.record_ttl_secs();
    let mut orders = 0usize;
    let mut last = String::new();
    loop {
        let rows = sqlx::query(
            "SELECT order_id, status, items::text FROM order_ledger WHERE order_id > $1 ORDER BY order_id LIMIT 5000",
        )
        .bind(&last)
        .fetch_all(&mut *snap)
        .await?;
        if rows.is_empty() {
            break;
        }
        let mut pipe = redis::pipe();
        for r in &rows {
            let id: String = r.try_get(0)?;
            let status: &str = r.try_get(1)?;
            let items: Vec<stock_common::events::Item> =
                serde_json::from_str(r.try_get::<&str, _>(2)?)
                    .map_err(|e| AdminError::Invalid(format!("ledger items of {id}: {e}")))?;
            let rec = match status {
                "reserved" | "confirmed" => OrderRecord::Held(items),
                _ => OrderRecord::Returned(items),
            };
            pipe.set_ex(order_key(&id), rec.encode(), ttl).ignore();
            last = id;
        }
        let _: () = pipe.query_async(&mut conn).await?;
        orders += rows.len();
    }
    snap.commit().await?;
    Ok((stock.len(), orders))
}
