//! The consumer's PostgreSQL side: one transaction per batch, built from
//! [`stock_common::pg_store`], which issues every statement.
//!
//! Locking protocol (shared with every writer of `order_ledger`, see `pg_store`): lock the
//! `stock` rows of an order's products, in product-id order, before reading or changing its
//! ledger row. Two instances that hold the same order therefore serialize on its stock rows
//! and never deadlock. An order whose products have no row (unknown product) is protected by
//! the ledger's primary key instead: the ledger insert meets the other instance's row (a
//! unique violation) and the whole batch is retried, now seeing it.
//!
//! Generation fence: every transaction here first reads `redis_generation` (`pg_store::read_gen`;
//! the batch reads it with the slots' loads, `read_slot_loads`),
//! which holds the table's ACCESS SHARE lock until commit. A rebuild advances the
//! generation under ACCESS EXCLUSIVE in the transaction that takes the snapshot Redis is
//! loaded from, so each batch is wholly before that snapshot (and in it) or wholly after
//! (and sees the new generation).
//!
//! Per-customer limits: the limits of the batch's products come with their row locks
//! (`pg_store::lock_stock`); the counts the batch's reservations need are read after the
//! locks, in the same transaction (one statement, skipped when no reservation has a
//! limited item with a customer), and the batch's count changes are written with its
//! stock changes. Every writer of `customer_units` holds the product's stock row lock, so
//! the counts read stay true until commit.

use crate::decide;
use sqlx::PgPool;
use std::collections::BTreeSet;
use std::time::Duration;
use stock_common::events::DeductCommand;
use stock_common::pg_store::{
    apply_deltas, apply_unit_deltas, customer_units, fetch_ledger, insert_movements, insert_orders,
    lock_stock, read_slot_loads, update_orders,
};

/// Errors of applying a batch, and what the loop does with each: `Conflict` (another
/// instance wrote an order of this batch meanwhile) is retried at once; `Db` transient ones
/// (connection, deadlock, shutdown) with backoff, permanent ones make the loop apply the
/// batch's commands one by one; `BadRow` (a ledger row this code cannot read) is permanent.
pub type ApplyError = stock_common::pg_store::PgStoreError;

/// Applies `ops` (in offset order) in one transaction and returns what was decided.
///
/// A batch of decisions only (`reserve`, `refuse`: the usual one) first assumes that the
/// ledger knows none of its orders and skips reading it: the ledger insert (the primary
/// key) then tells whether that held. It did not (a redelivery, a
/// replay, another instance's batch): that transaction is rolled back and the batch is
/// applied again, reading the ledger first. The ledger read was a quarter of the
/// transaction's time (issue 12).
pub async fn apply_batch(
    pool: &PgPool,
    ops: &[DeductCommand],
    reservation_ttl: Duration,
) -> Result<decide::Plan, ApplyError> {
    let decisions_only = ops.iter().all(|o| {
        matches!(
            o,
            DeductCommand::Reserve { .. } | DeductCommand::Refuse { .. }
        )
    });
    if decisions_only {
        match apply(pool, ops, reservation_ttl, Ledger::AssumeUnknown).await {
            Err(ApplyError::Conflict(_)) => {
                tracing::debug!("an order of the batch is in the ledger; reading it");
            }
            done => return done,
        }
    }
    apply(pool, ops, reservation_ttl, Ledger::Read).await
}

/// Whether a batch reads the ledger rows of its orders before deciding.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ledger {
    Read,
    /// Decide as if the ledger held none of them; the insert fails with
    /// [`ApplyError::Conflict`] if one was there.
    AssumeUnknown,
}

async fn apply(
    pool: &PgPool,
    ops: &[DeductCommand],
    reservation_ttl: Duration,
    ledger: Ledger,
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
    // The generation and what each slot was loaded in, one statement (`read_gen`'s fence).
    let loads = read_slot_loads(&mut tx).await?;
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
    let locked = lock_stock(&mut tx, &products).await?;
    let known = match ledger {
        Ledger::Read => fetch_ledger(&mut tx, &ids).await?,
        Ledger::AssumeUnknown => Default::default(),
    };
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

    // Under the locks (the fast path included): the counts the reservations need.
    let pairs = decide::Limits::pairs_needed(ops, &locked.limits);
    let limits = decide::Limits {
        units: customer_units(&mut tx, &pairs).await?,
        per_customer: locked.limits,
    };
    let plan = decide::plan(ops, known, &locked.available, &limits, &loads);
    if ledger == Ledger::AssumeUnknown && plan.inserts.len() != ids.len() {
        // An order not recorded now (a pre-deduction of a replaced generation, sent to be
        // decided again) may be one the ledger knows: only the ledger can tell.
        return Err(ApplyError::Conflict(
            "an order of the batch was not decided now",
        ));
    }
    insert_orders(&mut tx, &plan.inserts, reservation_ttl).await?;
    update_orders(&mut tx, &plan.updates).await?;
    apply_deltas(&mut tx, &plan.deltas).await?;
    apply_unit_deltas(&mut tx, &plan.units).await?;
    insert_movements(&mut tx, &plan.movements).await?;
    stock_common::failpoint!("consumer.before_commit");
    tx.commit().await?;
    Ok(plan)
}
