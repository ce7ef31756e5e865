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
//!
//! [`rebuild_slots`] does the same for some slots of a Redis Cluster (those of a master
//! that lost its data, or that failed over and may have lost acknowledged writes): only
//! they stop selling. It records their new generation per slot in PostgreSQL, makes every
//! other slot name its new pre-deductions in that generation, gives back the holds that
//! orders whose record was in those slots left elsewhere, and loads their part of the
//! snapshot. See docs/DESIGN.md, "Rebuilding some slots".

use crate::admin::AdminError;
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::time::Instant;
use stock_common::pg_store;
use stock_common::redis_store::slots::Shard;
use stock_common::redis_store::{did_not_answer, slots, RedisStore, StoreError};

pub use stock_common::pg_store::Snapshot;

/// What a rebuild loaded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RebuildReport {
    /// The Redis generation now selling.
    pub generation: i64,
    pub products: usize,
    /// Reservations still held, whose records were loaded (for their give-back).
    pub held: usize,
    /// How long selling was stopped (in the slots rebuilt).
    pub stopped_ms: u128,
    /// The slots rebuilt (`0-5460,10923`), or empty for the whole of Redis.
    pub slots: String,
    /// Holds given back that orders whose record was in those slots had left elsewhere.
    pub orphans: usize,
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

/// Which slots of a cluster to rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slots {
    /// Those whose loaded marker is missing: their master restarted empty, or a rebuild of
    /// them stopped half-way.
    Lost,
    /// These (an operator's choice).
    Named(BTreeSet<u16>),
    /// Those the master at this address serves now: a replica promoted by a failover,
    /// which may lack writes its old master had acknowledged (replication is
    /// asynchronous): treated as lost.
    OfMaster(String, u16),
}

/// The rebuild of some slots of a cluster (module docs). Every slot rebuilt: the same as
/// [`rebuild`]. No slot lost: nothing to do (`generation` 0 in the report).
///
/// Run right after a master came back, its first requests may time out while the cluster
/// connection is replaced (`RedisConn`): such an attempt is run again, up to three times
/// (every step can be run again; a second fence only advances the generation once more).
pub async fn rebuild_slots(
    pool: &PgPool,
    redis: &RedisStore,
    which: Slots,
) -> Result<RebuildReport, AdminError> {
    let mut attempt = 1;
    loop {
        match rebuild_slots_once(pool, redis, which.clone()).await {
            Err(AdminError::Store(StoreError::Redis(e))) if attempt < 3 && did_not_answer(&e) => {
                tracing::warn!(error = %e, attempt, "redis did not answer: rebuilding again");
                attempt += 1;
            }
            done => return done,
        }
    }
}

async fn rebuild_slots_once(
    pool: &PgPool,
    redis: &RedisStore,
    which: Slots,
) -> Result<RebuildReport, AdminError> {
    if !redis.is_cluster() {
        return Err(AdminError::Invalid(
            "slots can be rebuilt apart only on a Redis Cluster; run `stockctl rebuild`".into(),
        ));
    }
    let started = Instant::now();
    let chosen: BTreeSet<u16> = match which {
        Slots::Named(s) => s,
        Slots::OfMaster(host, port) => {
            let served = redis.slots_served_by(&host, port).await?;
            if served.is_empty() {
                return Err(AdminError::Invalid(format!(
                    "{host}:{port} serves no slot (not a master of this cluster)"
                )));
            }
            served
        }
        Slots::Lost => redis
            .unloaded_shards()
            .await?
            .into_iter()
            .filter_map(|s| match s {
                Shard::Slot(s) => Some(s),
                Shard::Whole => None,
            })
            .collect(),
    };
    if chosen.is_empty() {
        return Ok(RebuildReport::default());
    }
    if chosen.len() == usize::from(slots::SLOTS) {
        return rebuild(pool, redis).await;
    }
    let named = slots::format_ranges(&chosen);
    redis.stop_selling_slots(&chosen).await?;
    stock_common::failpoint!("rebuild.after_stop");
    tracing::warn!(slots = %named, "selling stopped in these slots: loading them from PostgreSQL");
    let snap = pg_store::fence_and_snapshot(pool, Some(&chosen)).await?;
    stock_common::failpoint!("rebuild.after_fence");
    redis.name_in(snap.gen, &chosen).await?;
    stock_common::failpoint!("rebuild.after_naming");
    // Holds elsewhere of orders whose record was in those slots: back to stock unless
    // PostgreSQL holds that pre-deduction (reserved: its record is loaded again below;
    // confirmed: sold). Read after the fence: no order of a lost record can be applied
    // since (its record's slot is newer than its token), and a hold goes back at most once
    // whoever gives it back (a cancel's give-back after this read included).
    let lost = redis.forget_slots(snap.gen, &chosen).await?;
    let ids: Vec<String> = lost.iter().map(|(id, _)| id.clone()).collect();
    let kept = pg_store::holding(pool, &ids).await?;
    let orphans: Vec<_> = lost
        .into_iter()
        .filter(|(id, c)| !kept.contains(&(id.clone(), c.token.clone())))
        .collect();
    let orphans = redis.release_holds(&orphans).await?;
    redis
        .load_slots(snap.gen, &chosen, &snap.stock, &snap.held, &snap.limits)
        .await?;
    pg_store::finish_loading(pool, snap.gen).await?;
    let report = RebuildReport {
        generation: snap.gen,
        products: snap
            .stock
            .iter()
            .filter(|(p, _)| chosen.contains(&slots::of_stock(*p)))
            .count(),
        held: snap
            .held
            .iter()
            .filter(|h| slots::touched(&h.order_id, &h.items).any(|s| chosen.contains(&s)))
            .count(),
        stopped_ms: started.elapsed().as_millis(),
        slots: named,
        orphans,
    };
    tracing::info!(
        generation = report.generation,
        slots = %report.slots,
        products = report.products,
        held = report.held,
        orphans = report.orphans,
        "redis slots rebuilt; selling resumes there"
    );
    Ok(report)
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
        slots: String::new(),
        orphans: 0,
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
    Ok(pg_store::fence_and_snapshot(pool, None).await?)
}
