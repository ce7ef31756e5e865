//! Reservation expiry. A sweeper releases reservations whose TTL has passed — exactly once,
//! also with several consumer instances and with a payment racing it — and announces each
//! release (`released`/`expired` result, compensation to Redis) through an outbox, so that a
//! crash between the commit and the announcement loses nothing.
//!
//! The release follows the locking protocol of [`stock_common::pg_store`] (which issues
//! every statement here): lock the stock rows of the candidates in product-id order, then
//! re-read the candidates. A payment that committed
//! first leaves the order `confirmed` and the re-read skips it; a payment that comes after
//! finds it `released` and is `ignored`/`already_released`. A payment that reaches the
//! consumer after the deadline but before the sweeper confirms the order: the deadline is
//! honoured to within `--expiry-interval`.
//!
//! Outbox: the release sets `announced = false` in the same transaction. After the result
//! and compensation are delivered, `announced` becomes true. Every sweep first re-announces
//! whatever is still unannounced (after a crash, or from another instance: duplicates carry
//! the same content, and Redis restores once per order).
//!
//! A release gives its customer's units back for each of its products limited now (the
//! limits come with the stock row locks), in the same transaction.

use crate::decide;
use crate::store::ApplyError;
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};
use stock_common::config::Topics;
use stock_common::events::{
    Compensation, CompensationCause, Reason, Status, StockResult, INTERNAL_VERSION,
};
use stock_common::kafka::{self, KafkaStepError, OutMessage, StallWatch};
use stock_common::pg_store;
use tokio_util::sync::CancellationToken;

/// Most reservations released or announced per transaction.
pub const SWEEP_LIMIT: i64 = 1000;

/// Releases up to [`SWEEP_LIMIT`] reservations past their deadline, in one transaction.
/// Returns how many were released.
pub async fn expire_due(pool: &PgPool) -> Result<usize, ApplyError> {
    let mut tx = pool.begin().await?;
    let gen = pg_store::read_gen(&mut tx).await?;
    let candidates = pg_store::due_reservations(&mut tx, SWEEP_LIMIT).await?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let products: BTreeSet<i64> = candidates
        .iter()
        .flat_map(|o| o.items.iter().map(|i| i.product_id))
        .collect();
    let locked = pg_store::lock_stock(&mut tx, &products).await?;
    // Under the locks: only those still reserved and due (a payment may have won).
    let ids: Vec<&str> = candidates.iter().map(|o| o.order_id.as_str()).collect();
    let due = pg_store::due_among(&mut tx, &ids).await?;
    let mut deltas = BTreeMap::new();
    let mut movements = Vec::new();
    let mut units = BTreeMap::new();
    for pg_store::DueOrder {
        order_id: id,
        items,
        customer,
    } in &due
    {
        if let Some(c) = customer {
            decide::count_units(&mut units, &locked.limits, items, c, -1);
        }
        for it in items {
            decide::record(
                &mut deltas,
                &mut movements,
                "release_expired",
                id,
                it,
                decide::release_delta(it),
            );
        }
    }
    let due_ids: Vec<&str> = due.iter().map(|o| o.order_id.as_str()).collect();
    pg_store::release_expired(&mut tx, &due_ids, gen).await?;
    pg_store::apply_deltas(&mut tx, &deltas).await?;
    pg_store::apply_unit_deltas(&mut tx, &units).await?;
    pg_store::insert_movements(&mut tx, &movements).await?;
    stock_common::failpoint!("consumer.expiry.before_commit");
    tx.commit().await?;
    stock_common::failpoint!("consumer.expiry.after_release");
    Ok(due.len())
}

pub use stock_common::pg_store::Unannounced;

/// Releases that are committed but not yet announced (at most [`SWEEP_LIMIT`]).
pub async fn unannounced(pool: &PgPool) -> Result<Vec<Unannounced>, ApplyError> {
    pg_store::unannounced(pool, SWEEP_LIMIT).await
}

pub async fn mark_announced(pool: &PgPool, ids: &[&str]) -> Result<(), ApplyError> {
    Ok(pg_store::mark_announced(pool, ids).await?)
}

/// One sweep: release what is due, then announce every unannounced release. Returns how
/// many releases were announced.
pub async fn sweep(
    pool: &PgPool,
    (producer, stall): (&FutureProducer, &StallWatch),
    topics: &Topics,
    shutdown: &CancellationToken,
) -> Result<usize, SweepError> {
    while expire_due(pool).await? as i64 == SWEEP_LIMIT {}
    let mut announced = 0;
    loop {
        let pending = unannounced(pool).await?;
        if pending.is_empty() {
            return Ok(announced);
        }
        let mut out = Vec::with_capacity(pending.len() * 2);
        for u in &pending {
            let id = &u.order_id;
            let result = StockResult::new(id, Status::Released, Some(Reason::Expired), None);
            out.push(OutMessage::json(&topics.results, id, &result));
            let comp = Compensation {
                v: INTERNAL_VERSION,
                order_id: id.clone(),
                items: u.items.clone(),
                cause: CompensationCause::Expired,
                token: u.token.clone(),
                gen: u.comp_gen,
                customer: None,
            };
            out.push(OutMessage::json(&topics.compensate, id, &comp));
        }
        kafka::publish_all(producer, &out, stall, shutdown).await?;
        stock_common::failpoint!("consumer.expiry.after_announce");
        let ids: Vec<&str> = pending.iter().map(|u| u.order_id.as_str()).collect();
        mark_announced(pool, &ids).await?;
        announced += pending.len();
    }
}

/// Errors of a sweep: the database ones are retried at the next sweep.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Kafka(#[from] KafkaStepError),
}
