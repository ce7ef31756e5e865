//! Everything the pipeline keeps in PostgreSQL, and the only code that writes it.
//!
//! Tables, each with its row type here:
//! * `stock` ([`StockRow`]; a change of its columns is a [`Delta`]): the contract's columns
//!   plus `total_added`, whose `CHECK`s enforce guarantee 1.
//! * `stock_movement` ([`Movement`]): the history of every change of `stock`, one row per
//!   product and kind per transaction ([`insert_movements`] sums a batch's orders).
//! * `order_ledger` ([`LedgerRow`]): one row per decided order, the permanent judge.
//! * `stock_request` ([`StockRequest`]): an operator's restock or set, once per request id.
//! * `redis_generation` ([`Generation`]): the Redis generation PostgreSQL answers to.
//!
//! The consumer's batch and expiry sweep and `stockctl`'s restock, set and rebuild build
//! their transactions from the functions here; nothing else writes these tables (the
//! benchmarks' own tables and the tests' set-up excepted).
//!
//! # Locking protocol
//!
//! Every writer of `order_ledger` locks the `stock` rows of an order's products
//! ([`lock_stock`]), in product-id order, before reading or changing its ledger row. Two
//! consumer instances that hold the same order therefore serialize on its stock rows and
//! never deadlock. An order whose products have no row (unknown product) is protected by
//! the ledger's primary key instead: [`insert_orders`] fails with
//! [`PgStoreError::Conflict`] when it inserted fewer rows than planned.
//!
//! # Generation fence
//!
//! Every transaction whose effect must reach Redis reads `redis_generation` first
//! ([`read_gen`]), before any row lock, and so holds the table's ACCESS SHARE lock until
//! it commits. A rebuild advances the generation under ACCESS EXCLUSIVE in the transaction
//! that takes the snapshot Redis is loaded from ([`fence_and_snapshot`]), so each such
//! transaction is wholly before that snapshot (and in it) or wholly after (and sees the
//! new generation). See `docs/DESIGN.md`, "Generations".

use crate::events::{Item, Reason, StockResult};
use sql::*;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// Errors of the PostgreSQL layer, and what the callers' loops do with each.
#[derive(Debug, thiserror::Error)]
pub enum PgStoreError {
    /// Another writer recorded an order of this transaction meanwhile: retry at once.
    #[error("ledger changed under the batch ({0}); retrying")]
    Conflict(&'static str),
    /// PostgreSQL said no. Transient ones (connection, deadlock, shutdown) are retried with
    /// backoff ([`PgStoreError::is_transient`]); permanent ones are the caller's to judge.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// A ledger row this code cannot read: permanent.
    #[error("bad ledger row for {0}")]
    BadRow(String),
    /// A `stock_request` row this code cannot read: permanent.
    #[error("bad stock_request row for {0}")]
    BadRequestRow(String),
}

impl PgStoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            PgStoreError::Conflict(_) => true,
            PgStoreError::Db(e) => crate::db::is_transient(e),
            PgStoreError::BadRow(_) | PgStoreError::BadRequestRow(_) => false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Row types
// ---------------------------------------------------------------------------------------

/// One row of `stock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StockRow {
    pub product_id: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub total_added: i64,
}

impl StockRow {
    fn from_row(r: &PgRow) -> Result<StockRow, sqlx::Error> {
        Ok(StockRow {
            product_id: r.try_get("product_id")?,
            available: r.try_get("available")?,
            reserved: r.try_get("reserved")?,
            sold: r.try_get("sold")?,
            total_added: r.try_get("total_added")?,
        })
    }
}

/// Change of one product's `stock` columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

impl std::ops::AddAssign for Delta {
    fn add_assign(&mut self, d: Delta) {
        self.available += d.available;
        self.reserved += d.reserved;
        self.sold += d.sold;
    }
}

/// One change of a product by one order or request. [`insert_movements`] writes a
/// transaction's movements as one `stock_movement` row per product and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    pub product_id: i64,
    /// `reserve`, `confirm`, `release_cancelled`, `release_expired`, `compensation`
    /// (orders), `restock` or `set` (operators' requests).
    pub kind: &'static str,
    /// The order id, or the request id of a restock or set (column `ref`).
    pub reference: String,
    pub quantity: i64,
    pub delta: Delta,
}

/// State of an order in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Reserved,
    Rejected,
    Confirmed,
    Released,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "reserved",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserved" => OrderStatus::Reserved,
            "rejected" => OrderStatus::Rejected,
            "confirmed" => OrderStatus::Confirmed,
            "released" => OrderStatus::Released,
            _ => return None,
        })
    }
}

/// One row of `order_ledger`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub status: OrderStatus,
    /// Why `order_created` was rejected here, and the first product short.
    pub reject: Option<(Reason, Option<i64>)>,
    pub release_reason: Option<Reason>,
    pub settled_by: Option<String>,
    pub items: Vec<Item>,
    /// The pre-deduction this row applied (None: a Redis refusal, or a row from before
    /// tokens).
    pub token: Option<String>,
    /// The generation of the PostgreSQL change that gives the order's stock back to Redis
    /// (a refusal here, a cancel, an expiry); None while nothing is to be given back.
    pub comp_gen: Option<i64>,
}

impl LedgerRow {
    /// The result of the order's `order_created`, whatever happened to it since.
    pub fn created_outcome(&self, order_id: &str) -> StockResult {
        match self.reject {
            Some((reason, product)) => StockResult::rejected(order_id, reason, product),
            None => StockResult::reserved(order_id),
        }
    }
}

/// One row of `stock_request`: an operator's change, applied once per request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockRequest {
    pub request_id: String,
    pub product_id: i64,
    /// `restock` or `set`.
    pub kind: &'static str,
    pub available_delta: i64,
    /// The Redis generation the PostgreSQL half was committed in (None: before generations).
    pub gen: Option<i64>,
}

impl StockRequest {
    /// The kinds the table allows (its `CHECK`), as written.
    const KINDS: [&'static str; 2] = ["restock", "set"];
}

/// A [`StockRequest`] found again, with its age judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRequest {
    pub request: StockRequest,
    /// Older than the memory asked about (Redis forgot its marker).
    pub expired: bool,
}

/// The row of `redis_generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub gen: i64,
    /// From the fence until Redis holds `gen`.
    pub loading: bool,
}

/// An order still `reserved` that released its items: (order id, items).
pub type DueOrder = (String, Vec<Item>);

// ---------------------------------------------------------------------------------------
// redis_generation: the fence
// ---------------------------------------------------------------------------------------

/// The Redis generation PostgreSQL answers to; call it first in a transaction whose effect
/// must reach Redis (module docs: the generation fence).
pub async fn read_gen(tx: &mut Transaction<'_, Postgres>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(READ_GEN).fetch_one(&mut **tx).await
}

/// The `redis_generation` row, outside any transaction.
pub async fn generation(pool: &PgPool) -> Result<Generation, sqlx::Error> {
    let (gen, loading): (i64, bool) =
        sqlx::query_as("SELECT gen, loading FROM redis_generation WHERE id")
            .fetch_one(pool)
            .await?;
    Ok(Generation { gen, loading })
}

/// What Redis is loaded from: one snapshot, taken with the generation advanced.
pub struct Snapshot {
    pub gen: i64,
    /// (product, available)
    pub stock: Vec<(i64, i64)>,
    /// (order id, token, items) of every order still `reserved`.
    pub held: Vec<(String, String, Vec<Item>)>,
}

/// The rebuild's fence: advances `redis_generation` (`gen + 1`, `loading = true`) and reads
/// what Redis is loaded from, in one REPEATABLE READ transaction whose snapshot is taken
/// after `LOCK TABLE redis_generation IN ACCESS EXCLUSIVE MODE`.
pub async fn fence_and_snapshot(pool: &PgPool) -> Result<Snapshot, PgStoreError> {
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
        "UPDATE redis_generation SET gen = gen + 1, loading = true WHERE id RETURNING gen",
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
        let items = decode_items(&r, 2, &id)?;
        held.push((id, r.try_get(1)?, items));
    }
    Ok(Snapshot { gen, stock, held })
}

/// The load of generation `gen` reached Redis: `loading = false`.
pub async fn finish_loading(pool: &PgPool, gen: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE redis_generation SET loading = false WHERE id AND gen = $1")
        .bind(gen)
        .execute(pool)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// stock and stock_movement
// ---------------------------------------------------------------------------------------

/// `SELECT … FOR UPDATE` of the stock rows, in product-id order; returns `available`.
pub async fn lock_stock(
    tx: &mut Transaction<'_, Postgres>,
    products: &BTreeSet<i64>,
) -> Result<HashMap<i64, i64>, sqlx::Error> {
    if products.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = products.iter().copied().collect();
    let rows = sqlx::query(LOCK_STOCK)
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<i64, _>(1)?)))
        .collect()
}

/// Locks one product's row (`FOR UPDATE`) and returns it, creating it with all zeros
/// first if it does not exist. Returns the row and whether it was created now.
pub async fn create_and_lock_product(
    tx: &mut Transaction<'_, Postgres>,
    product_id: i64,
) -> Result<(StockRow, bool), sqlx::Error> {
    let created = sqlx::query(CREATE_PRODUCT)
        .bind(product_id)
        .execute(&mut **tx)
        .await?
        .rows_affected()
        == 1;
    let row = sqlx::query(LOCK_PRODUCT)
        .bind(product_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok((StockRow::from_row(&row)?, created))
}

/// Rows of `products` (all products when empty), by product id.
pub async fn stock_rows(pool: &PgPool, products: &[i64]) -> Result<Vec<StockRow>, sqlx::Error> {
    let rows = if products.is_empty() {
        sqlx::query("SELECT product_id, available, reserved, sold, total_added FROM stock ORDER BY product_id")
            .fetch_all(pool)
            .await?
    } else {
        sqlx::query(STOCK_ROWS_OF)
            .bind(products)
            .fetch_all(pool)
            .await?
    };
    rows.iter().map(StockRow::from_row).collect()
}

/// One aggregated UPDATE for every product that changed.
pub async fn apply_deltas(
    tx: &mut Transaction<'_, Postgres>,
    deltas: &BTreeMap<i64, Delta>,
) -> Result<(), sqlx::Error> {
    if deltas.is_empty() {
        return Ok(());
    }
    let p: Vec<i64> = deltas.keys().copied().collect();
    let a: Vec<i64> = deltas.values().map(|d| d.available).collect();
    let r: Vec<i64> = deltas.values().map(|d| d.reserved).collect();
    let s: Vec<i64> = deltas.values().map(|d| d.sold).collect();
    sqlx::query(APPLY_DELTAS)
        .bind(&p)
        .bind(&a)
        .bind(&r)
        .bind(&s)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The history of a transaction's changes, in one statement: one row per product and kind,
/// summing its movements (`quantity` and the deltas added up, `orders` counted, `ref` the
/// first one's). A row per order and item was as costly as the ledger row itself (issue 12);
/// each order's own story is its ledger row.
pub async fn insert_movements(
    tx: &mut Transaction<'_, Postgres>,
    movements: &[Movement],
) -> Result<(), sqlx::Error> {
    if movements.is_empty() {
        return Ok(());
    }
    struct Sum<'a> {
        reference: &'a str,
        quantity: i64,
        delta: Delta,
        orders: i32,
    }
    let mut sums: BTreeMap<(i64, &str), Sum> = BTreeMap::new();
    for m in movements {
        let s = sums.entry((m.product_id, m.kind)).or_insert(Sum {
            reference: &m.reference,
            quantity: 0,
            delta: Delta::default(),
            orders: 0,
        });
        s.quantity += m.quantity;
        s.delta += m.delta;
        s.orders += 1;
    }
    let n = sums.len();
    let (mut p, mut k, mut o, mut q) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut a, mut r, mut s, mut c) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((product, kind), sum) in &sums {
        p.push(*product);
        k.push(*kind);
        o.push(sum.reference);
        q.push(sum.quantity);
        a.push(sum.delta.available);
        r.push(sum.delta.reserved);
        s.push(sum.delta.sold);
        c.push(sum.orders);
    }
    sqlx::query(INSERT_MOVEMENTS)
        .bind(&p)
        .bind(&k)
        .bind(&o)
        .bind(&q)
        .bind(&a)
        .bind(&r)
        .bind(&s)
        .bind(&c)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// stock_request: operators' changes, once per request id
// ---------------------------------------------------------------------------------------

/// The request `request_id`, if recorded; `expired` when it is older than `memory_secs`.
pub async fn find_request<'e, E: sqlx::PgExecutor<'e>>(
    ex: E,
    request_id: &str,
    memory_secs: u64,
) -> Result<Option<FoundRequest>, PgStoreError> {
    let row = sqlx::query(FIND_REQUEST)
        .bind(request_id)
        .bind(memory_secs as f64)
        .fetch_optional(ex)
        .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let kind: &str = r.try_get(1)?;
    let kind = StockRequest::KINDS
        .into_iter()
        .find(|k| *k == kind)
        .ok_or_else(|| PgStoreError::BadRequestRow(request_id.to_owned()))?;
    Ok(Some(FoundRequest {
        request: StockRequest {
            request_id: request_id.to_owned(),
            product_id: r.try_get(0)?,
            kind,
            available_delta: r.try_get(2)?,
            gen: r.try_get(4)?,
        },
        expired: r.try_get(3)?,
    }))
}

/// Records `req` and applies it: the `stock_request` row, `available` and `total_added`
/// moved by its delta, and its `stock_movement` row. `Ok(false)` (nothing done) when the
/// request id is already recorded; `Err(RowNotFound)` when the product has no row.
pub async fn apply_request(
    tx: &mut Transaction<'_, Postgres>,
    req: &StockRequest,
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(INSERT_REQUEST)
        .bind(&req.request_id)
        .bind(req.product_id)
        .bind(req.kind)
        .bind(req.available_delta)
        .bind(req.gen)
        .execute(&mut **tx)
        .await?
        .rows_affected()
        == 1;
    if !inserted {
        return Ok(false);
    }
    let updated = sqlx::query(APPLY_REQUEST)
        .bind(req.product_id)
        .bind(req.available_delta)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    if updated != 1 {
        return Err(sqlx::Error::RowNotFound);
    }
    let movement = Movement {
        product_id: req.product_id,
        kind: req.kind,
        reference: req.request_id.clone(),
        quantity: req.available_delta.abs(),
        delta: Delta {
            available: req.available_delta,
            ..Delta::default()
        },
    };
    insert_movements(tx, std::slice::from_ref(&movement)).await?;
    Ok(true)
}

// ---------------------------------------------------------------------------------------
// order_ledger
// ---------------------------------------------------------------------------------------

/// The ledger rows of `ids` that exist.
pub async fn fetch_ledger(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[String],
) -> Result<HashMap<String, LedgerRow>, PgStoreError> {
    let rows = sqlx::query(FETCH_LEDGER)
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        let id: String = r.try_get(0)?;
        let row = decode_ledger_row(&r).ok_or_else(|| PgStoreError::BadRow(id.clone()))?;
        out.insert(id, row);
    }
    Ok(out)
}

fn decode_ledger_row(r: &PgRow) -> Option<LedgerRow> {
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

/// Inserts the ledger rows of orders first seen (`ON CONFLICT DO NOTHING`); a `reserved`
/// one is due at `now() + reservation_ttl`. [`PgStoreError::Conflict`] when another writer
/// recorded one of them meanwhile (the caller retries its whole transaction).
pub async fn insert_orders(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(String, LedgerRow)],
    reservation_ttl: Duration,
) -> Result<(), PgStoreError> {
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
    let inserted = sqlx::query(INSERT_ORDERS)
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
        return Err(PgStoreError::Conflict(
            "an order was recorded by another instance",
        ));
    }
    Ok(())
}

/// Writes the new state of settled orders (status, release reason, the event that
/// settled them, `comp_gen`), `settled_at = now()`.
pub async fn update_orders(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[(String, LedgerRow)],
) -> Result<(), sqlx::Error> {
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
    sqlx::query(UPDATE_ORDERS)
        .bind(&ids)
        .bind(&status)
        .bind(&rel)
        .bind(&by)
        .bind(&cg)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Up to `limit` reservations past their deadline, oldest deadline first, read without a
/// lock (the caller locks their stock rows, then reads them again with [`due_among`]).
pub async fn due_reservations(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
) -> Result<Vec<DueOrder>, PgStoreError> {
    let rows = sqlx::query(DUE_RESERVATIONS)
        .bind(limit)
        .fetch_all(&mut **tx)
        .await?;
    decode_due(&rows)
}

/// The orders of `ids` still `reserved` and past their deadline.
pub async fn due_among(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[&str],
) -> Result<Vec<DueOrder>, PgStoreError> {
    let rows = sqlx::query(DUE_AMONG)
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?;
    decode_due(&rows)
}

/// Releases `ids` as expired in generation `gen`, to be announced (`announced = false`,
/// the outbox).
pub async fn release_expired(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[&str],
    gen: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(RELEASE_EXPIRED)
        .bind(ids)
        .bind(gen)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A release committed but not yet announced: the order, its items, and the
/// pre-deduction and generation its compensation names.
pub struct Unannounced {
    pub order_id: String,
    pub items: Vec<Item>,
    pub token: Option<String>,
    pub comp_gen: Option<i64>,
}

/// Up to `limit` releases that are committed but not yet announced.
pub async fn unannounced(pool: &PgPool, limit: i64) -> Result<Vec<Unannounced>, PgStoreError> {
    let rows = sqlx::query(UNANNOUNCED).bind(limit).fetch_all(pool).await?;
    let items = decode_due(&rows)?;
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

/// The releases of `ids` were announced (their result and compensation delivered).
pub async fn mark_announced(pool: &PgPool, ids: &[&str]) -> Result<(), sqlx::Error> {
    sqlx::query(MARK_ANNOUNCED).bind(ids).execute(pool).await?;
    Ok(())
}

/// (order id, items) of rows whose first column is the order id and second `items::text`.
fn decode_due(rows: &[PgRow]) -> Result<Vec<DueOrder>, PgStoreError> {
    rows.iter()
        .map(|r| {
            let id: String = r.try_get(0)?;
            let items = decode_items(r, 1, &id)?;
            Ok((id, items))
        })
        .collect()
}

fn decode_items(r: &PgRow, col: usize, order_id: &str) -> Result<Vec<Item>, PgStoreError> {
    serde_json::from_str(r.try_get::<&str, _>(col)?)
        .map_err(|_| PgStoreError::BadRow(order_id.to_owned()))
}

// ---------------------------------------------------------------------------------------
// The statements
// ---------------------------------------------------------------------------------------

/// Every statement run per batch, per sweep or per operator request, in one place so that
/// `tests/batch_plans.rs` (stock-e2e) can check the plan PostgreSQL caches for each: none
/// may scan a table that grows (the ledger, the history, the requests, the stock), on a
/// fresh database with no statistics as on a grown one. The workers' sessions forbid
/// sequential scans where an index can answer ([`crate::db::options`]: `enable_seqscan =
/// off`), so the plan does not depend on what the planner believed when it cached it.
/// Reads of whole tables (the rebuild's snapshot, `stockctl`'s reports) are not here.
pub mod sql {
    pub const READ_GEN: &str = "SELECT gen FROM redis_generation WHERE id";
    pub const LOCK_STOCK: &str = "SELECT product_id, available FROM stock WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE";
    pub const CREATE_PRODUCT: &str =
        "INSERT INTO stock (product_id, available, reserved, sold, total_added)
         VALUES ($1, 0, 0, 0, 0) ON CONFLICT (product_id) DO NOTHING";
    pub const LOCK_PRODUCT: &str =
        "SELECT product_id, available, reserved, sold, total_added FROM stock
         WHERE product_id = $1 FOR UPDATE";
    pub const STOCK_ROWS_OF: &str = "SELECT product_id, available, reserved, sold, total_added FROM stock WHERE product_id = ANY($1) ORDER BY product_id";
    pub const APPLY_DELTAS: &str = "UPDATE stock s
         SET available = s.available + t.da, reserved = s.reserved + t.dr, sold = s.sold + t.ds, updated_at = now()
         FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS t(p, da, dr, ds)
         WHERE s.product_id = t.p";
    pub const INSERT_MOVEMENTS: &str = "INSERT INTO stock_movement
             (product_id, kind, ref, quantity, available_delta, reserved_delta, sold_delta, orders)
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                              $7::bigint[], $8::int[])";
    pub const FIND_REQUEST: &str =
        "SELECT product_id, kind, available_delta, at < now() - make_interval(secs => $2), gen
         FROM stock_request WHERE request_id = $1";
    pub const INSERT_REQUEST: &str =
        "INSERT INTO stock_request (request_id, product_id, kind, available_delta, gen)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING";
    pub const APPLY_REQUEST: &str = "UPDATE stock SET available = available + $2, total_added = total_added + $2, updated_at = now()
         WHERE product_id = $1";
    pub const FETCH_LEDGER: &str = "SELECT order_id, status, reject_reason, reject_product, release_reason, settled_by, items::text,
                token, comp_gen
         FROM order_ledger WHERE order_id = ANY($1)";
    pub const INSERT_ORDERS: &str = "INSERT INTO order_ledger
             (order_id, status, reject_reason, reject_product, release_reason, settled_by, items,
              reserved_until, settled_at, token, comp_gen)
         SELECT o, s, rr, rp, rel, sb, i::jsonb,
                CASE WHEN s = 'reserved' THEN now() + make_interval(secs => $8) END,
                CASE WHEN s IN ('confirmed', 'released') THEN now() END,
                tk, cg
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                     $9::text[], $10::bigint[])
              AS t(o, s, rr, rp, rel, sb, i, tk, cg)
         ON CONFLICT (order_id) DO NOTHING";
    pub const UPDATE_ORDERS: &str = "UPDATE order_ledger l
         SET status = t.s, release_reason = t.rel, settled_by = t.sb, settled_at = now(), comp_gen = t.cg
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) AS t(o, s, rel, sb, cg)
         WHERE l.order_id = t.o";
    pub const DUE_RESERVATIONS: &str = "SELECT order_id, items::text FROM order_ledger
         WHERE status = 'reserved' AND reserved_until <= now()
         ORDER BY reserved_until LIMIT $1";
    pub const DUE_AMONG: &str = "SELECT order_id, items::text FROM order_ledger
         WHERE order_id = ANY($1) AND status = 'reserved' AND reserved_until <= now()";
    pub const RELEASE_EXPIRED: &str = "UPDATE order_ledger
         SET status = 'released', release_reason = 'expired', settled_by = 'expiry', settled_at = now(),
             announced = false, comp_gen = $2
         WHERE order_id = ANY($1)";
    pub const UNANNOUNCED: &str = "SELECT order_id, items::text, token, comp_gen FROM order_ledger WHERE NOT announced LIMIT $1";
    pub const MARK_ANNOUNCED: &str =
        "UPDATE order_ledger SET announced = true WHERE order_id = ANY($1)";

    /// (name, statement) of every statement above.
    pub const ALL: &[(&str, &str)] = &[
        ("READ_GEN", READ_GEN),
        ("LOCK_STOCK", LOCK_STOCK),
        ("CREATE_PRODUCT", CREATE_PRODUCT),
        ("LOCK_PRODUCT", LOCK_PRODUCT),
        ("STOCK_ROWS_OF", STOCK_ROWS_OF),
        ("APPLY_DELTAS", APPLY_DELTAS),
        ("INSERT_MOVEMENTS", INSERT_MOVEMENTS),
        ("FIND_REQUEST", FIND_REQUEST),
        ("INSERT_REQUEST", INSERT_REQUEST),
        ("APPLY_REQUEST", APPLY_REQUEST),
        ("FETCH_LEDGER", FETCH_LEDGER),
        ("INSERT_ORDERS", INSERT_ORDERS),
        ("UPDATE_ORDERS", UPDATE_ORDERS),
        ("DUE_RESERVATIONS", DUE_RESERVATIONS),
        ("DUE_AMONG", DUE_AMONG),
        ("RELEASE_EXPIRED", RELEASE_EXPIRED),
        ("UNANNOUNCED", UNANNOUNCED),
        ("MARK_ANNOUNCED", MARK_ANNOUNCED),
    ];
}
