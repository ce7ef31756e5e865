//! Reservation expiry. A sweeper releases reservations whose TTL has passed — exactly once,
//! also with several consumer instances and with a payment racing it — and announces each
//! release (`released`/`expired` result, compensation to Redis) through an outbox, so that a
//! crash between the commit and the announcement loses nothing.
//!
//! The release follows the locking protocol of [`crate::store`]: lock the stock rows of the
//! candidates in product-id order, then re-read the candidates. A payment that committed
//! first leaves the order `confirmed` and the re-read skips it; a payment that comes after
//! finds it `released` and is `ignored`/`already_released`. A payment that reaches the
//! consumer after the deadline but before the sweeper confirms the order: the deadline is
//! honoured to within `--expiry-interval`.
//!
//! Outbox: the release sets `announced = false` in the same transaction. After the result
//! and compensation are delivered, `announced` becomes true. Every sweep first re-announces
//! whatever is still unannounced (after a crash, or from another instance: duplicates carry
//! the same content, and Redis restores once per order).

use crate::decide;
use crate::store::{self, ApplyError};
use rdkafka::producer::FutureProducer;
use sqlx::{PgPool, Row};
use std::collections::{BTreeMap, BTreeSet};
use stock_common::config::Topics;
use stock_common::events::{
    Compensation, CompensationCause, Item, Reason, Status, StockResult, INTERNAL_VERSION,
};
use stock_common::kafka::{self, KafkaStepError, OutMessage};
use tokio_util::sync::CancellationToken;

/// Most reservations released or announced per transaction.
pub const SWEEP_LIMIT: i64 = 1000;

/// Releases up to [`SWEEP_LIMIT`] reservations past their deadline, in one transaction.
/// Returns how many were released.
pub async fn expire_due(pool: &PgPool) -> Result<usize, ApplyError> {
    let mut tx = pool.begin().await?;
    let gen = store::read_gen(&mut tx).await?;
    let candidates = sqlx::query(
        "SELECT order_id, items::text FROM order_ledger
         WHERE status = 'reserved' AND reserved_until <= now()
         ORDER BY reserved_until LIMIT $1",
    )
    .bind(SWEEP_LIMIT)
    .fetch_all(&mut *tx)
    .await?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let candidates = decode(&candidates)?;
    let products: BTreeSet<i64> = candidates
        .iter()
        .flat_map(|(_, items)| items.iter().map(|i| i.product_id))
        .collect();
    store::lock_stock(&mut tx, &products).await?;
    // Under the locks: only those still reserved and due (a payment may have won).
    let ids: Vec<&str> = candidates.iter().map(|(id, _)| id.as_str()).collect();
    let due = sqlx::query(
        "SELECT order_id, items::text FROM order_ledger
         WHERE order_id = ANY($1) AND status = 'reserved' AND reserved_until <= now()",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let due = decode(&due)?;
    let mut deltas = BTreeMap::new();
    let mut movements = Vec::new();
    for (id, items) in &due {
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
    let due_ids: Vec<&str> = due.iter().map(|(id, _)| id.as_str()).collect();
    sqlx::query(
        "UPDATE order_ledger
         SET status = 'released', release_reason = 'expired', settled_by = 'expiry', settled_at = now(),
             announced = false, comp_gen = $2
         WHERE order_id = ANY($1)",
    )
    .bind(&due_ids)
    .bind(gen)
    .execute(&mut *tx)
    .await?;
    store::apply_deltas(&mut tx, &deltas).await?;
    store::insert_movements(&mut tx, &movements).await?;
    stock_common::failpoint!("consumer.expiry.before_commit");
    tx.commit().await?;
    stock_common::failpoint!("consumer.expiry.after_release");
    Ok(due.len())
}

/// A release committed but not yet announced: the order, its items, and the
/// pre-deduction and generation its compensation names.
pub struct Unannounced {
    pub order_id: String,
    pub items: Vec<Item>,
    pub token: Option<String>,
    pub comp_gen: Option<i64>,
}

/// Releases that are committed but not yet announced.
pub async fn unannounced(pool: &PgPool) -> Result<Vec<Unannounced>, ApplyError> {
    let rows = sqlx::query(
        "SELECT order_id, items::text, token, comp_gen FROM order_ledger WHERE NOT announced LIMIT $1",
    )
    .bind(SWEEP_LIMIT)
    .fetch_all(pool)
    .await?;
    let items = decode(&rows)?;
    rows.iter()
        .zip(items)
        .map(|(r, (order_id, items))| {
            Ok(Unannounced {
                order_id,
                items,
                token: r.try_get(2)?,
                comp_gen: r.try_get(3)?,
            })
        })
        .collect()
}

pub async fn mark_announced(pool: &PgPool, ids: &[&str]) -> Result<(), ApplyError> {
    sqlx::query("UPDATE order_ledger SET announced = true WHERE order_id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// One sweep: release what is due, then announce every unannounced release. Returns how
/// many releases were announced.
pub async fn sweep(
    pool: &PgPool,
    producer: &FutureProducer,
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
            };
            out.push(OutMessage::json(&topics.compensate, id, &comp));
        }
        kafka::publish_all(producer, &out, shutdown).await?;
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

fn decode(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<(String, Vec<Item>)>, ApplyError> {
    rows.iter()
        .map(|r| {
            let id: String = r.try_get(0)?;
            let items: Vec<Item> = serde_json::from_str(r.try_get::<&str, _>(1)?)
                .map_err(|_| ApplyError::BadRow(id.clone()))?;
            Ok((id, items))
        })
        .collect()
}
