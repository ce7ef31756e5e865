//! Loading Redis from PostgreSQL: the only way stock gets into an empty Redis, what lets
//! the producer sell again after Redis lost its data (contract guarantee 6), and the
//! repair of a Redis that drifted (`stockctl check --repair`).
//!
//! [`rebuild`] is safe while the workers run, and waits for nothing:
//! 1. delete the loaded marker ([`RedisStore::stop_selling`]): from then on every script
//!    refuses to act, so no pre-deduction, refusal, give-back or adjustment is taken in the
//!    old generation any more;
//! 2. in one PostgreSQL transaction ([`fence_and_snapshot`]): lock `redis_generation`
//!    (ACCESS EXCLUSIVE), advance it, and read `available` of every product and the
//!    reservations still held, from the snapshot of that transaction. Every writer whose
//!    effect must reach Redis reads the generation first, under ACCESS SHARE, so each one
//!    committed wholly before this snapshot (its effect is in it) or carries the new
//!    generation;
//! 3. load Redis from the snapshot and set the marker to the new generation ([`load`]).
//!
//! What was in flight is fenced by its generation where it lands: a pre-deduction of the
//! old generation that PostgreSQL had not applied is not applied, the producer decides the
//! order again in the new one; a compensation or an operator's change made before the
//! snapshot names the old generation and Redis ignores it (the snapshot holds it); one made
//! after names the new generation and applies once. See docs/DESIGN.md.

use crate::admin::AdminError;
use sqlx::{PgPool, Row};
use std::time::Instant;
use stock_common::events::Item;
use stock_common::redis_store::RedisStore;

/// What a rebuild loaded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RebuildReport {
    /// The Redis generation now selling.
    pub generation: i64,
    pub products: usize,
    /// Reservations still held, whose records were loaded (for their give-back).
    pub held: usize,
    /// How long selling was stopped.
    pub stopped_ms: u128,
}

/// What Redis is loaded from: one snapshot, taken with the generation advanced.
pub struct Snapshot {
    pub gen: i64,
    /// (product, available)
    pub stock: Vec<(i64, i64)>,
    /// (order id, token, items) of every order still `reserved`.
    pub held: Vec<(String, String, Vec<Item>)>,
}

/// The whole rebuild (module docs). On error selling stays stopped; run it again.
pub async fn rebuild(pool: &PgPool, redis: &RedisStore) -> Result<RebuildReport, AdminError> {
    let started = Instant::now();
    redis.stop_selling().await?;
    stock_common::failpoint!("rebuild.after_stop");
    tracing::warn!("selling stopped: loading Redis from PostgreSQL");
    let snap = fence_and_snapshot(pool).await?;
    stock_common::failpoint!("rebuild.after_fence");
    load(pool, redis, &snap, started).await
}

/// Step 3 of [`rebuild`]: loads Redis from `snap` and resumes selling in its generation.
pub async fn load(
    pool: &PgPool,
    redis: &RedisStore,
    snap: &Snapshot,
    started: Instant,
) -> Result<RebuildReport, AdminError> {
    redis
        .load_generation(snap.gen, &snap.stock, &snap.held)
        .await?;
    sqlx::query("UPDATE redis_generation SET loading = false WHERE gen = $1")
        .bind(snap.gen)
        .execute(pool)
        .await?;
    let report = RebuildReport {
        generation: snap.gen,
        products: snap.stock.len(),
        held: snap.held.len(),
        stopped_ms: started.elapsed().as_millis(),
    };
    tracing::info!(
        generation = report.generation,
        products = report.products,
        held = report.held,
        "redis rebuilt; selling resumes"
    );
    Ok(report)
}

/// Whether a load of generation `gen` is under way (fenced, Redis not yet loaded): a
/// change PostgreSQL committed in `gen` is then missing from its snapshot, and must wait
/// for the load to reach Redis.
pub async fn loading(pool: &PgPool, gen: i64) -> Result<bool, sqlx::Error> {
    let (current, loading): (i64, bool) =
        sqlx::query_as("SELECT gen, loading FROM redis_generation")
            .fetch_one(pool)
            .await?;
    Ok(current == gen && loading)
}

/// Step 2 of [`rebuild`]: advances `redis_generation` and reads what Redis is loaded
/// from, in one REPEATABLE READ transaction whose snapshot is taken after the lock.
pub async fn fence_and_snapshot(pool: &PgPool) -> Result<Snapshot, AdminError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await?;
    // Before any query, so that the snapshot is taken under the lock (PostgreSQL freezes a
    // REPEATABLE READ view at the first query or data change, not at LOCK).
    sqlx::query("LOCK TABLE redis_generation IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let gen: i64 = sqlx::query_scalar(
        "UPDATE redis_generation SET gen = gen + 1, loading = true RETURNING gen",
    )
    .fetch_one(&mut *tx)
    .await?;
    let stock = sqlx::query("SELECT product_id, available FROM stock ORDER BY product_id")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(i64, i64)>, sqlx::Error>>()?;
    let rows = sqlx::query(
        "SELECT order_id, coalesce(token, ''), items::text FROM order_ledger WHERE status = 'reserved'",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut held = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get(0)?;
        let items: Vec<Item> = serde_json::from_str(r.try_get::<&str, _>(2)?)
            .map_err(|e| AdminError::Invalid(format!("ledger items of {id}: {e}")))?;
        held.push((id, r.try_get(1)?, items));
    }
    Ok(Snapshot { gen, stock, held })
}
