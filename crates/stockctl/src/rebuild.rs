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
//! 3. load Redis from the snapshot and set the marker to the new generation ([`load`]):
//!    stock, the records of held reservations (with their customers), and each limited
//!    product's limit with its customers' counts (DESIGN.md "Per-customer limits").
//!
//! What was in flight is fenced by its generation where it lands: a pre-deduction of the
//! old generation that PostgreSQL had not applied is not applied, the producer decides the
//! order again in the new one; a compensation or an operator's change made before the
//! snapshot names the old generation and Redis ignores it (the snapshot holds it); one made
//! after names the new generation and applies once. See docs/DESIGN.md.

use crate::admin::AdminError;
use sqlx::PgPool;
use std::time::Instant;
use stock_common::pg_store;
use stock_common::redis_store::RedisStore;

pub use stock_common::pg_store::Snapshot;

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
        .load_generation(snap.gen, &snap.stock, &snap.held, &snap.limits)
        .await?;
    pg_store::finish_loading(pool, snap.gen).await?;
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
    let current = pg_store::generation(pool).await?;
    Ok(current.gen == gen && current.loading)
}

/// Step 2 of [`rebuild`]: advances `redis_generation` and reads what Redis is loaded
/// from, in one REPEATABLE READ transaction whose snapshot is taken after the lock
/// ([`pg_store::fence_and_snapshot`]).
pub async fn fence_and_snapshot(pool: &PgPool) -> Result<Snapshot, AdminError> {
    Ok(pg_store::fence_and_snapshot(pool).await?)
}
