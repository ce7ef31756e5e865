//! Loading Redis from PostgreSQL: the only way stock gets into an empty Redis, and what
//! lets the producer sell again after Redis lost its data (contract guarantee 6).

use crate::admin::AdminError;
use redis::AsyncCommands;
use sqlx::{PgPool, Row};
use stock_common::redis_store::{order_key, stock_key, OrderRecord, RedisStore, LOADED_KEY};

/// Loads Redis from PostgreSQL: every `stock:{id}` from `available`, every ledger order as
/// the producer's record (held for reserved and confirmed orders, given back for rejected
/// and released ones), then sets the "loaded" marker. Returns (products, orders) loaded.
///
/// Run it only while no deduct command or compensation is in flight (the pipeline idle,
/// or the producer stopped and the consumer drained): an in-flight pre-deduction would be
/// counted twice.
pub async fn load_from_postgres(
    pool: &PgPool,
    redis: &RedisStore,
) -> Result<(usize, usize), AdminError> {
    let mut conn = redis.connection();
    let stock = sqlx::query("SELECT product_id, available FROM stock ORDER BY product_id")
        .fetch_all(pool)
        .await?;
    for chunk in stock.chunks(1000) {
        let mut pipe = redis::pipe();
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
        .fetch_all(pool)
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
    let _: () = conn
        .set(LOADED_KEY, chrono::Utc::now().to_rfc3339())
        .await?;
    Ok((stock.len(), orders))
}
