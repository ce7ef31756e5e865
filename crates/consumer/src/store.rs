//! The consumer's PostgreSQL side: one transaction per batch.
//!
//! Locking protocol (shared with every writer of `order_ledger`): lock the `stock` rows of
//! an order's products, in product-id order, before reading or changing its ledger row.
//! Two instances that hold the same order therefore serialize on its stock rows and never
//! deadlock. An order whose products have no row (unknown product) is protected by the
//! ledger's primary key instead: `INSERT … ON CONFLICT DO NOTHING` returns fewer rows than
//! planned and the whole batch is retried, now seeing the other instance's row.
//!
//! Generation fence: every transaction here first reads `redis_generation` ([`read_gen`]),
//! which holds the table's ACCESS SHARE lock until commit. A rebuild advances the
//! generation under ACCESS EXCLUSIVE in the transaction that takes the snapshot Redis is
//! loaded from, so each batch is wholly before that snapshot (and in it) or wholly after
//! (and sees the new generation).

use crate::decide::{self, Delta, LedgerRow, Movement, OrderStatus};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use stock_common::events::{DeductCommand, Item, Reason};

/// Errors of applying a batch, and what the loop does with each.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Another instance wrote an order of this batch meanwhile: retry at once.
    #[error("ledger changed under the batch ({0}); retrying")]
    Conflict(&'static str),
    /// PostgreSQL said no. Transient ones (connection, deadlock, shutdown) are retried with
    /// backoff; permanent ones make the loop apply the batch's commands one by one and
    /// dead-letter the ones that still fail.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A ledger row this code cannot read: permanent.
    #[error("bad ledger row for {0}")]
    BadRow(String),
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Conflict(_) => true,
            ApplyError::Db(e) => stock_common::db::is_transient(e),
            ApplyError::BadRow(_) => false,
        }
    }
}

/// Applies `ops` (in offset order) in one transaction and returns what was decided.
pub async fn apply_batch(
    pool: &PgPool,
    ops: &[DeductCommand],
    reservation_ttl: Duration,
) -> Result<decide::Plan, ApplyError> {
    let mut ids: Vec<String> = ops.iter().map(|o| o.order_id().to_owned()).collect();
    ids.sort_unstable();
    ids.dedup();
    let settles = ops
        .iter()
        .any(|o| !matches!(o, DeductCommand::Reserve { .. }));

    let mut tx = pool.begin().await?;
    // First, before any row lock (a rebuild waiting for this lock must not wait on us
    // while we wait on a row another batch holds behind the rebuild).
    let gen = read_gen(&mut tx).await?;
    // The products to lock: every reserved item, and for pay/cancel the items the ledger
    // holds (read once without a lock to learn them, checked again under the lock).
    let mut products: BTreeSet<i64> = ops
        .iter()
        .filter_map(|o| match o {
            DeductCommand::Reserve { items, .. } => Some(items.iter().map(|i| i.product_id)),
            _ => None,
        })
        .flatten()
        .collect();
    if settles {
        for row in fetch_ledger(&mut tx, &ids).await?.values() {
            products.extend(row.items.iter().map(|i| i.product_id));
        }
    }
    let available = lock_stock(&mut tx, &products).await?;
    let known = fetch_ledger(&mut tx, &ids).await?;
    if settles
        && known
            .values()
            .flat_map(|r| r.items.iter())
            .any(|i| !products.contains(&i.product_id))
    {
        return Err(ApplyError::Conflict(
            "an order appeared with unlocked products",
        ));
    }

    let plan = decide::plan(ops, known, &available, gen);
    insert_orders(&mut tx, &plan.inserts, reservation_ttl).await?;
    update_orders(&mut tx, &plan.updates).await?;
    apply_deltas(&mut tx, &plan.deltas).await?;
    insert_movements(&mut tx, &plan.movements).await?;
    stock_common::failpoint!("consumer.before_commit");
    tx.commit().await?;
    Ok(plan)
}

/// The Redis generation PostgreSQL answers to; call it first in a transaction whose effect
/// must reach Redis (module docs: the generation fence).
pub async fn read_gen(tx: &mut Transaction<'_, Postgres>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT gen FROM redis_generation")
        .fetch_one(&mut **tx)
        .await
}

/// `SELECT … FOR UPDATE` of the stock rows, in product-id order; returns `available`.
pub async fn lock_stock(
    tx: &mut Transaction<'_, Postgres>,
    products: &BTreeSet<i64>,
) -> Result<HashMap<i64, i64>, sqlx::Error> {
    if products.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = products.iter().copied().collect();
    let rows = sqlx::query(
        "SELECT product_id, available FROM stock WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
        .collect()
}

/// The ledger rows of `ids` that exist.
pub async fn fetch_ledger(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[String],
) -> Result<HashMap<String, LedgerRow>, ApplyError> {
    let rows = sqlx::query(
        "SELECT order_id, status, reject_reason, reject_product, release_reason, settled_by, items::text,
                token, comp_gen
         FROM order_ledger WHERE order_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get(0)?;
        let row = decode_row(&r).ok_or_else(|| ApplyError::BadRow(id.clone()))?;
        out.insert(id, row);
    }
    Ok(out)
}

fn decode_row(r: &sqlx::postgres::PgRow) -> Option<LedgerRow> {
    let status = OrderStatus::parse(r.try_get::<&str, _>(1).ok()?)?;
    let reject = match r.try_get::<Option<&str>, _>(2).ok()? {
        Some(s) => Some((Reason::parse(s)?, r.try_get::<Option<i64>, _>(3).ok()?)),
        None => None,
    };
    let release_reason = match r.try_get::<Option<&str>, _>(4).ok()? {
        Some(s) => Some(Reason::parse(s)?),
        None => None,
    };
    let settled_by = r.try_get::<Option<String>, _>(5).ok()?;
    let items: Vec<Item> = serde_json::from_str(r.try_get::<&str, _>(6).ok()?).ok()?;
    Some(LedgerRow {
        status,
        reject,
        release_reason,
        settled_by,
        items,
        token: r.try_get(7).ok()?,
        comp_gen: r.try_get(8).ok()?,
    })
}

async fn insert_orders(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(String, LedgerRow)],
    reservation_ttl: Duration,
) -> Result<(), ApplyError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut status = Vec::with_capacity(rows.len());
    let mut rej_reason: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    let mut rej_product: Vec<Option<i64>> = Vec::with_capacity(rows.len());
    let mut rel_reason: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    let mut settled_by: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    let mut items = Vec::with_capacity(rows.len());
    let mut tokens: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    let mut comp_gens: Vec<Option<i64>> = Vec::with_capacity(rows.len());
    for (id, r) in rows {
        tokens.push(r.token.as_deref());
        comp_gens.push(r.comp_gen);
        ids.push(id.as_str());
        status.push(r.status.as_str());
        rej_reason.push(r.reject.map(|(reason, _)| reason.as_str()));
        rej_product.push(r.reject.and_then(|(_, p)| p));
        rel_reason.push(r.release_reason.map(Reason::as_str));
        settled_by.push(r.settled_by.as_deref());
        items.push(serde_json::to_string(&r.items).unwrap_or_else(|_| "[]".into()));
    }
    let inserted = sqlx::query(
        "INSERT INTO order_ledger
             (order_id, status, reject_reason, reject_product, release_reason, settled_by, items,
              reserved_until, settled_at, token, comp_gen)
         SELECT o, s, rr, rp, rel, sb, i::jsonb,
                CASE WHEN s = 'reserved' THEN now() + make_interval(secs => $8) END,
                CASE WHEN s IN ('confirmed', 'released') THEN now() END,
                tk, cg
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                     $9::text[], $10::bigint[])
              AS t(o, s, rr, rp, rel, sb, i, tk, cg)
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&status)
    .bind(&rej_reason)
    .bind(&rej_product)
    .bind(&rel_reason)
    .bind(&settled_by)
    .bind(&items)
    .bind(reservation_ttl.as_secs_f64())
    .bind(&tokens)
    .bind(&comp_gens)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted != rows.len() as u64 {
        return Err(ApplyError::Conflict(
            "an order was recorded by another instance",
        ));
    }
    Ok(())
}

async fn update_orders(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(String, LedgerRow)],
) -> Result<(), ApplyError> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    let status: Vec<&str> = rows.iter().map(|(_, r)| r.status.as_str()).collect();
    let rel: Vec<Option<&str>> = rows
        .iter()
        .map(|(_, r)| r.release_reason.map(Reason::as_str))
        .collect();
    let by: Vec<Option<&str>> = rows.iter().map(|(_, r)| r.settled_by.as_deref()).collect();
    let cg: Vec<Option<i64>> = rows.iter().map(|(_, r)| r.comp_gen).collect();
    sqlx::query(
        "UPDATE order_ledger l
         SET status = t.s, release_reason = t.rel, settled_by = t.sb, settled_at = now(), comp_gen = t.cg
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) AS t(o, s, rel, sb, cg)
         WHERE l.order_id = t.o",
    )
    .bind(&ids)
    .bind(&status)
    .bind(&rel)
    .bind(&by)
    .bind(&cg)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One aggregated UPDATE for every product that changed.
pub async fn apply_deltas(
    tx: &mut Transaction<'_, Postgres>,
    deltas: &BTreeMap<i64, Delta>,
) -> Result<(), ApplyError> {
    if deltas.is_empty() {
        return Ok(());
    }
    let p: Vec<i64> = deltas.keys().copied().collect();
    let a: Vec<i64> = deltas.values().map(|d| d.available).collect();
    let r: Vec<i64> = deltas.values().map(|d| d.reserved).collect();
    let s: Vec<i64> = deltas.values().map(|d| d.sold).collect();
    sqlx::query(
        "UPDATE stock s
         SET available = s.available + t.da, reserved = s.reserved + t.dr, sold = s.sold + t.ds, updated_at = now()
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS t(p, da, dr, ds)
         WHERE s.product_id = t.p",
    )
    .bind(&p)
    .bind(&a)
    .bind(&r)
    .bind(&s)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The history rows, in one statement.
pub async fn insert_movements(
    tx: &mut Transaction<'_, Postgres>,
    movements: &[Movement],
) -> Result<(), ApplyError> {
    if movements.is_empty() {
        return Ok(());
    }
    let p: Vec<i64> = movements.iter().map(|m| m.product_id).collect();
    let k: Vec<&str> = movements.iter().map(|m| m.kind).collect();
    let o: Vec<&str> = movements.iter().map(|m| m.order_id.as_str()).collect();
    let q: Vec<i64> = movements.iter().map(|m| m.quantity).collect();
    let a: Vec<i64> = movements.iter().map(|m| m.delta.available).collect();
    let r: Vec<i64> = movements.iter().map(|m| m.delta.reserved).collect();
    let s: Vec<i64> = movements.iter().map(|m| m.delta.sold).collect();
    sqlx::query(
        "INSERT INTO stock_movement (product_id, kind, ref, quantity, available_delta, reserved_delta, sold_delta)
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])",
    )
    .bind(&p)
    .bind(&k)
    .bind(&o)
    .bind(&q)
    .bind(&a)
    .bind(&r)
    .bind(&s)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
