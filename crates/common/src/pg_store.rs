//! Everything the pipeline keeps in PostgreSQL, and the only code that writes it.
//!
//! Tables, each with its row type here:
//! * `stock` ([`StockRow`]; a change of its columns is a [`Delta`]): the contract's columns
//!   plus `total_added`, whose `CHECK`s enforce guarantee 1.
//! * `stock_movement` ([`Movement`]): the history of every change of `stock`, one row per
//!   kind per transaction, its products and their sums as arrays ([`insert_movements`]
//!   sums a batch's orders); the view `stock_movement_item` reads it one product at a time.
//! * `order_ledger` ([`LedgerRow`]): one row per decided order, the permanent judge.
//! * `stock_request` ([`StockRequest`]): an operator's restock or set, once per request id.
//! * `redis_generation` ([`Generation`]): the Redis generation PostgreSQL answers to.
//! * `product_limit` ([`ProductLimit`]): the per-customer limit of a product, with the
//!   version of the change that set it (mirrored on `stock.limit_version`).
//! * `customer_units`: per limited product and customer, the units of that customer's
//!   `reserved` and `confirmed` orders ([`customer_units`], [`apply_unit_deltas`]).
//! * `limit_request` ([`LimitChange`]): an operator's limit change, once per request id
//!   ([`set_limit`]).
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
//! [`PgStoreError::Conflict`] when the key holds one of its orders already.
//!
//! `product_limit` and `customer_units` follow the same lock: every writer of
//! `customer_units` (the consumer's batch, the expiry sweep, [`set_limit`]) holds the
//! product's `stock` row lock first, and only [`set_limit`] writes `product_limit`, under
//! that lock. So while a transaction holds a product's stock row, its limit and its
//! customers' counts cannot move under it. [`lock_stock`] reads the limits with the lock, in
//! the same statement; because PostgreSQL rechecks only the locked row of a statement that
//! waited for a lock (the joined limit is the one of the statement's snapshot),
//! [`set_limit`] also writes the limit's version on the stock row (`limit_version`), and a
//! lock whose row and limit disagree is [`PgStoreError::Conflict`] (start again).
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
    /// An operator named a product that has no `stock` row: permanent.
    #[error("unknown product {0}")]
    UnknownProduct(i64),
    /// A limit request id already recorded for another change: permanent (the operator
    /// must pick a new request id).
    #[error("request id {request_id} was already used for {was}")]
    LimitRequestReused { request_id: String, was: String },
}

impl PgStoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            PgStoreError::Conflict(_) => true,
            PgStoreError::Db(e) => crate::db::is_transient(e),
            PgStoreError::BadRow(_)
            | PgStoreError::BadRequestRow(_)
            | PgStoreError::UnknownProduct(_)
            | PgStoreError::LimitRequestReused { .. } => false,
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
/// transaction's movements as one `stock_movement` row per kind, summed per product.
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
    /// The order's `customer_id`, as first decided (None: the order named none).
    pub customer: Option<String>,
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

/// An order still `reserved` past its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueOrder {
    pub order_id: String,
    pub items: Vec<Item>,
    /// Whose units of limited products its release gives back.
    pub customer: Option<String>,
}

/// A product's per-customer limit and the units its customers hold (`units > 0` only, by
/// customer id).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProductLimit {
    pub product_id: i64,
    pub per_customer: i64,
    /// The `limit_request` version that set it.
    pub version: i64,
    /// (customer, units), by customer id.
    pub units: Vec<(String, i64)>,
}

/// What [`set_limit`] did (or, `fresh == false`, had done under the same request id).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LimitChange {
    /// The Redis generation the change was committed in: its Redis half applies to that
    /// generation only.
    pub gen: i64,
    /// The change's version (increasing per change, from the `limit_version` sequence).
    pub version: i64,
    /// The limit before the change (None: there was none).
    pub previous: Option<i64>,
    /// The limit after it (None: removed, or still none).
    pub per_customer: Option<i64>,
    /// false: the request id was applied before; its recorded values are returned.
    pub fresh: bool,
}

/// The stock rows [`lock_stock`] locked, and what a decision needs of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockedStock {
    /// `available` of every product that has a row.
    pub available: HashMap<i64, i64>,
    /// The per-customer limit of every locked product that has one.
    pub limits: HashMap<i64, i64>,
}

/// One (product, customer) count of `customer_units`.
pub type UnitKey = (i64, String);

/// An order held in the rebuild's snapshot: its Redis record is loaded from this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldOrder {
    pub order_id: String,
    /// The pre-deduction its ledger row applied (empty: a row from before tokens).
    pub token: String,
    pub items: Vec<Item>,
    pub customer: Option<String>,
}

// ---------------------------------------------------------------------------------------
// redis_generation: the fence
// ---------------------------------------------------------------------------------------

/// The Redis generation PostgreSQL answers to; call it first in a transaction whose effect
/// must reach Redis (module docs: the generation fence).
pub async fn read_gen(tx: &mut Transaction<'_, Postgres>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(READ_GEN).fetch_one(&mut **tx).await
}

/// Which generation each part of Redis was loaded in: a pre-deduction named in an older
/// generation than one of its slots' is not held there (DESIGN "Rebuilding some slots").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotLoads {
    /// The generation these were read in (`redis_generation.gen`): they change only with it.
    pub gen: i64,
    /// The last load of the whole of Redis (`redis_generation.loaded_gen`).
    pub whole: i64,
    /// The ranges of a cluster's slots (first, last) that a partial rebuild loaded since,
    /// with its generation.
    pub ranges: Vec<(u16, u16, i64)>,
}

impl SlotLoads {
    /// Redis loaded whole in `gen`, and no slot apart since.
    pub fn whole(gen: i64) -> SlotLoads {
        SlotLoads {
            gen,
            whole: gen,
            ranges: Vec::new(),
        }
    }

    /// The generation slot `slot` was loaded in (on one Redis: the whole load's).
    pub fn loaded(&self, slot: u16) -> i64 {
        self.ranges
            .iter()
            .filter(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
            .map(|(.., g)| *g)
            .fold(self.whole, i64::max)
    }
}

/// [`read_gen`] with [`SlotLoads`], in one statement: the first of a transaction that
/// judges pre-deductions (the consumer's batch), so that no rebuild changes them before it
/// commits. One row, and one more per range a partial rebuild loaded since the last whole
/// load.
pub async fn read_slot_loads(tx: &mut Transaction<'_, Postgres>) -> Result<SlotLoads, sqlx::Error> {
    // (generation, whole load, first slot, last slot, its generation): one row without a
    // range when none.
    type Row = (i64, i64, Option<i32>, Option<i32>, Option<i64>);
    let rows: Vec<Row> = sqlx::query_as(READ_SLOT_LOADS).fetch_all(&mut **tx).await?;
    let (gen, whole) = rows
        .first()
        .map(|r| (r.0, r.1))
        .ok_or(sqlx::Error::RowNotFound)?;
    let ranges = rows
        .into_iter()
        .filter_map(|(_, _, lo, hi, g)| {
            let lo = u16::try_from(lo?).ok()?;
            let hi = u16::try_from(hi?).ok()?;
            Some((lo, hi, g?))
        })
        .collect();
    Ok(SlotLoads { gen, whole, ranges })
}

/// The `redis_generation` row, outside any transaction.
pub async fn generation(pool: &PgPool) -> Result<Generation, sqlx::Error> {
    let (gen, loading): (i64, bool) =
        sqlx::query_as("SELECT gen, loading FROM redis_generation WHERE id")
            .fetch_one(pool)
            .await?;
    Ok(Generation { gen, loading })
}

/// What Redis is loaded from: one snapshot, taken with the generation advanced. A partial
/// rebuild loads only the part of it in its slots.
pub struct Snapshot {
    pub gen: i64,
    /// (product, available)
    pub stock: Vec<(i64, i64)>,
    /// Every order still `reserved`.
    pub held: Vec<HeldOrder>,
    /// Every product with a limit, and its customers' units (`> 0`).
    pub limits: Vec<ProductLimit>,
}

/// The rebuild's fence: advances `redis_generation` (`gen + 1`, `loading = true`) and reads
/// what Redis is loaded from, in one REPEATABLE READ transaction whose snapshot is taken
/// after `LOCK TABLE redis_generation IN ACCESS EXCLUSIVE MODE`. `slots`: the cluster's
/// slots a partial rebuild loads (recorded in `redis_slot_generation` with the new
/// generation); None: the whole of Redis (`loaded_gen`, and no slot loaded apart).
pub async fn fence_and_snapshot(
    pool: &PgPool,
    slots: Option<&BTreeSet<u16>>,
) -> Result<Snapshot, PgStoreError> {
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
    match slots {
        None => {
            sqlx::query("UPDATE redis_generation SET loaded_gen = gen WHERE id")
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM redis_slot_generation")
                .execute(&mut *tx)
                .await?;
        }
        Some(slots) => {
            let ranges = crate::redis_store::slots::ranges(slots);
            let lo: Vec<i32> = ranges.iter().map(|r| i32::from(r.0)).collect();
            let hi: Vec<i32> = ranges.iter().map(|r| i32::from(r.1)).collect();
            sqlx::query(
                "INSERT INTO redis_slot_generation (gen, lo, hi)
                 SELECT $1, lo, hi FROM UNNEST($2::int[], $3::int[]) AS t(lo, hi)",
            )
            .bind(gen)
            .bind(&lo)
            .bind(&hi)
            .execute(&mut *tx)
            .await?;
        }
    }
    let stock = sqlx::query("SELECT product_id, available FROM stock ORDER BY product_id")
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(i64, i64)>, sqlx::Error>>()?;
    let rows = sqlx::query(
        "SELECT order_id, coalesce(token, ''), items::text, customer_id FROM order_ledger
         WHERE status = 'reserved'",
    )
    .fetch_all(&mut *tx)
    .await?;
    let limits = read_limits(&mut tx).await?;
    tx.commit().await?;
    let mut held = Vec::with_capacity(rows.len());
    for r in rows {
        let order_id: String = r.try_get(0)?;
        let items = decode_items(&r, 2, &order_id)?;
        held.push(HeldOrder {
            token: r.try_get(1)?,
            customer: r.try_get(3)?,
            order_id,
            items,
        });
    }
    Ok(Snapshot {
        gen,
        stock,
        held,
        limits,
    })
}

/// Of `orders`, those whose pre-deduction PostgreSQL holds (`reserved` or `confirmed`),
/// with its token: what a partial rebuild must not give back in Redis.
pub async fn holding(
    pool: &PgPool,
    orders: &[String],
) -> Result<std::collections::HashSet<(String, String)>, sqlx::Error> {
    let mut out = std::collections::HashSet::new();
    for chunk in orders.chunks(10_000) {
        let rows: Vec<(String, Option<String>)> =
            sqlx::query_as(HOLDING).bind(chunk).fetch_all(pool).await?;
        out.extend(rows.into_iter().map(|(o, t)| (o, t.unwrap_or_default())));
    }
    Ok(out)
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

/// `SELECT … FOR UPDATE` of the stock rows, in product-id order; returns `available` and
/// the products' limits, read in the same statement. [`PgStoreError::Conflict`] when a
/// limit changed while this statement waited for a row (module docs): start the
/// transaction again.
pub async fn lock_stock(
    tx: &mut Transaction<'_, Postgres>,
    products: &BTreeSet<i64>,
) -> Result<LockedStock, PgStoreError> {
    let mut locked = LockedStock::default();
    if products.is_empty() {
        return Ok(locked);
    }
    let ids: Vec<i64> = products.iter().copied().collect();
    let rows = sqlx::query(LOCK_STOCK)
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
    for r in &rows {
        let product: i64 = r.try_get(0)?;
        let row_version: Option<i64> = r.try_get(2)?;
        let limit: Option<i64> = r.try_get(3)?;
        let limit_version: Option<i64> = r.try_get(4)?;
        if row_version != limit_version {
            return Err(PgStoreError::Conflict(
                "a product's limit changed while its stock row was awaited",
            ));
        }
        locked.available.insert(product, r.try_get(1)?);
        if let Some(limit) = limit {
            locked.limits.insert(product, limit);
        }
    }
    Ok(locked)
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

/// The history of a transaction's changes, in one statement: one `stock_movement` row per
/// kind, whose arrays hold each product it changed (ascending) with that product's sums
/// (`quantity` and the deltas added up, `orders` counted); `ref` is the kind's first
/// movement's. A row per order and item was as costly as the ledger row itself, and a row
/// per product and kind still wrote ~220 rows a batch at half the maximum rate (issue 12);
/// each order's own story is its ledger row.
pub async fn insert_movements(
    tx: &mut Transaction<'_, Postgres>,
    movements: &[Movement],
) -> Result<(), sqlx::Error> {
    if movements.is_empty() {
        return Ok(());
    }
    #[derive(Default)]
    struct Sum {
        quantity: i64,
        delta: Delta,
        orders: i32,
    }
    // Kind-major, products ascending: each kind's elements are one run of the flat arrays.
    let mut sums: BTreeMap<(&str, i64), Sum> = BTreeMap::new();
    let mut first_ref: BTreeMap<&str, &str> = BTreeMap::new();
    for m in movements {
        first_ref.entry(m.kind).or_insert(&m.reference);
        let s = sums.entry((m.kind, m.product_id)).or_default();
        s.quantity += m.quantity;
        s.delta += m.delta;
        s.orders += 1;
    }
    let n = sums.len();
    let (mut p, mut q, mut o) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut a, mut r, mut s) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    // Per kind, its reference and the 1-based bounds of its run.
    let kinds = first_ref.len();
    let (mut kind, mut reference, mut first, mut last) = (
        Vec::with_capacity(kinds),
        Vec::with_capacity(kinds),
        Vec::with_capacity(kinds),
        Vec::with_capacity(kinds),
    );
    for ((k, product), sum) in &sums {
        if kind.last() != Some(k) {
            kind.push(*k);
            reference.push(first_ref[k]);
            first.push(p.len() as i32 + 1);
            last.push(0);
        }
        p.push(*product);
        q.push(sum.quantity);
        a.push(sum.delta.available);
        r.push(sum.delta.reserved);
        s.push(sum.delta.sold);
        o.push(sum.orders);
        if let Some(end) = last.last_mut() {
            *end = p.len() as i32;
        }
    }
    sqlx::query(INSERT_MOVEMENTS)
        .bind(&kind)
        .bind(&reference)
        .bind(&first)
        .bind(&last)
        .bind(&p)
        .bind(&q)
        .bind(&a)
        .bind(&r)
        .bind(&s)
        .bind(&o)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// product_limit, customer_units, limit_request: per-customer limits
// ---------------------------------------------------------------------------------------

/// The units the customers of `pairs` hold of the products (which the caller has locked
/// and knows to be limited): one statement. Pairs without a row hold 0 and are absent.
pub async fn customer_units(
    tx: &mut Transaction<'_, Postgres>,
    pairs: &BTreeSet<UnitKey>,
) -> Result<HashMap<UnitKey, i64>, sqlx::Error> {
    if pairs.is_empty() {
        return Ok(HashMap::new());
    }
    let (p, c): (Vec<i64>, Vec<&str>) = pairs.iter().map(|(p, c)| (*p, c.as_str())).unzip();
    let rows = sqlx::query(READ_UNITS)
        .bind(&p)
        .bind(&c)
        .fetch_all(&mut **tx)
        .await?;
    rows.iter()
        .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?)))
        .collect()
}

/// Adds a transaction's unit changes, one per (product, customer) summed by the caller, in
/// one statement: an increase is an upsert, a decrease an update, and a count that reaches
/// 0 is deleted (a row exists only while units are held). The caller holds the products'
/// stock row locks. A decrease that finds no row, or more units taken than held, means the
/// counts drifted from the ledger (a bug or an outside write): it is logged and the count
/// stays at 0 rather than stopping the batch, which holds decided orders (DESIGN rule 9).
pub async fn apply_unit_deltas(
    tx: &mut Transaction<'_, Postgres>,
    deltas: &BTreeMap<UnitKey, i64>,
) -> Result<(), sqlx::Error> {
    let changes: Vec<(&UnitKey, i64)> = deltas
        .iter()
        .filter(|(_, d)| **d != 0)
        .map(|(k, d)| (k, *d))
        .collect();
    if changes.is_empty() {
        return Ok(());
    }
    let p: Vec<i64> = changes.iter().map(|((p, _), _)| *p).collect();
    let c: Vec<&str> = changes.iter().map(|((_, c), _)| c.as_str()).collect();
    let d: Vec<i64> = changes.iter().map(|(_, d)| *d).collect();
    let (touched, below): (i64, i64) = sqlx::query_as(APPLY_UNITS)
        .bind(&p)
        .bind(&c)
        .bind(&d)
        .fetch_one(&mut **tx)
        .await?;
    if touched != changes.len() as i64 || below != 0 {
        tracing::warn!(
            changes = changes.len(),
            touched,
            below_zero = below,
            "customer_units drifted from the ledger: a decrease found fewer units than it gives back"
        );
    }
    Ok(())
}

/// The limit of `product_id`: (per customer, version), None when it has none.
pub async fn product_limit(
    pool: &PgPool,
    product_id: i64,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    sqlx::query_as(PRODUCT_LIMIT)
        .bind(product_id)
        .fetch_optional(pool)
        .await
}

/// How many customers hold units of `product_id` (a limited product's counts).
pub async fn customers_holding(pool: &PgPool, product_id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM customer_units WHERE product_id = $1 AND units > 0")
        .bind(product_id)
        .fetch_one(pool)
        .await
}

/// The `n` customers holding the most units of `product_id` (highest first, then by id).
pub async fn top_customers(
    pool: &PgPool,
    product_id: i64,
    n: i64,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT customer_id, units FROM customer_units WHERE product_id = $1 AND units > 0
         ORDER BY units DESC, customer_id LIMIT $2",
    )
    .bind(product_id)
    .bind(n)
    .fetch_all(pool)
    .await
}

/// Every limited product with its customers' units (`> 0`), by product id: what Redis
/// must mirror (the drift check).
pub async fn all_limits(pool: &PgPool) -> Result<Vec<ProductLimit>, PgStoreError> {
    let mut conn = pool.acquire().await?;
    read_limits(&mut conn).await
}

/// Every limit and its units, in one statement (one snapshot).
async fn read_limits(conn: &mut sqlx::PgConnection) -> Result<Vec<ProductLimit>, PgStoreError> {
    let rows = sqlx::query(
        "SELECT l.product_id, l.per_customer, l.version, u.customer_id, u.units
         FROM product_limit l
         LEFT JOIN customer_units u ON u.product_id = l.product_id AND u.units > 0
         ORDER BY l.product_id, u.customer_id",
    )
    .fetch_all(conn)
    .await?;
    let mut out: Vec<ProductLimit> = Vec::new();
    for r in &rows {
        let product_id: i64 = r.try_get(0)?;
        if out.last().map(|l| l.product_id) != Some(product_id) {
            out.push(ProductLimit {
                product_id,
                per_customer: r.try_get(1)?,
                version: r.try_get(2)?,
                units: Vec::new(),
            });
        }
        let customer: Option<String> = r.try_get(3)?;
        let units: Option<i64> = r.try_get(4)?;
        if let (Some(customer), Some(units), Some(limit)) = (customer, units, out.last_mut()) {
            limit.units.push((customer, units));
        }
    }
    Ok(out)
}

/// Sets (`Some`), changes or removes (`None`) the per-customer limit of `product_id`, once
/// per `request_id`, in one transaction:
/// 1. the generation fence ([`read_gen`]) first: the change belongs to that generation;
/// 2. the product's stock row `FOR UPDATE` ([`PgStoreError::UnknownProduct`] without one),
///    which every writer of `customer_units` holds first: counts cannot move meanwhile;
/// 3. the request id: recorded before for the same product and limit, its recorded change
///    is returned (`fresh: false`, nothing done); for another one,
///    [`PgStoreError::LimitRequestReused`];
/// 4. the previous limit; none → N: `customer_units` of the product computed from the
///    ledger (the `reserved` and `confirmed` orders with a customer; **a scan of the whole
///    ledger**, [`sql::COMPUTE_UNITS`], acceptable for an operator's rare change, and
///    exact because it runs under the stock row lock); N → M: the limit updated, counts
///    kept (lowering takes nothing back); N → none: the limit and the product's counts
///    deleted;
/// 5. `stock.limit_version` written (module docs: a waiting writer notices the change) and
///    the `limit_request` row inserted with a new version.
///
/// The Redis half is the caller's, in `gen` only; when `redis_generation` says `loading`
/// for `gen` (a rebuild fenced before this change and is loading a snapshot without it),
/// the caller waits for that load before applying it, as for a restock (`stockctl`'s
/// `give_to_redis`).
pub async fn set_limit(
    pool: &PgPool,
    request_id: &str,
    product_id: i64,
    per_customer: Option<i64>,
) -> Result<LimitChange, PgStoreError> {
    let mut tx = pool.begin().await?;
    let gen = read_gen(&mut tx).await?;
    let locked = sqlx::query(LOCK_PRODUCT)
        .bind(product_id)
        .fetch_optional(&mut *tx)
        .await?;
    if locked.is_none() {
        return Err(PgStoreError::UnknownProduct(product_id));
    }
    // After the lock: a concurrent change of the same product under this id has committed.
    /// (product, per customer, previous, version, generation)
    type Recorded = (i64, Option<i64>, Option<i64>, i64, i64);
    let found: Option<Recorded> = sqlx::query_as(FIND_LIMIT_REQUEST)
        .bind(request_id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some((product, limit, previous, version, gen)) = found {
        if product != product_id || limit != per_customer {
            let what = limit.map_or("no limit".to_owned(), |n| format!("a limit of {n}"));
            return Err(PgStoreError::LimitRequestReused {
                request_id: request_id.to_owned(),
                was: format!("{what} on product {product}"),
            });
        }
        return Ok(LimitChange {
            gen,
            version,
            previous,
            per_customer: limit,
            fresh: false,
        });
    }
    // A statement after the lock: it sees every change committed before it.
    let previous: Option<i64> = sqlx::query_as::<_, (i64, i64)>(PRODUCT_LIMIT)
        .bind(product_id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|(n, _)| n);
    let version: i64 = sqlx::query_scalar(NEXT_LIMIT_VERSION)
        .fetch_one(&mut *tx)
        .await?;
    match (previous, per_customer) {
        (_, Some(n)) => {
            sqlx::query(UPSERT_LIMIT)
                .bind(product_id)
                .bind(n)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            if previous.is_none() {
                sqlx::query(DELETE_UNITS_OF)
                    .bind(product_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sql::COMPUTE_UNITS)
                    .bind(product_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        (_, None) => {
            sqlx::query(DELETE_LIMIT)
                .bind(product_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(DELETE_UNITS_OF)
                .bind(product_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    sqlx::query(MARK_LIMIT_VERSION)
        .bind(product_id)
        .bind(per_customer.map(|_| version))
        .execute(&mut *tx)
        .await?;
    sqlx::query(INSERT_LIMIT_REQUEST)
        .bind(request_id)
        .bind(product_id)
        .bind(per_customer)
        .bind(previous)
        .bind(version)
        .bind(gen)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(LimitChange {
        gen,
        version,
        previous,
        per_customer,
        fresh: true,
    })
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
        customer: r.try_get(9).ok()?,
    })
}

/// Inserts the ledger rows of orders first seen; a `reserved` one is due at
/// `now() + reservation_ttl`. [`PgStoreError::Conflict`] when the ledger holds one of them
/// already (another writer recorded it meanwhile, or the caller assumed it unknown): the
/// primary key's unique violation, which also ends the transaction, so the caller starts
/// it again.
///
/// A plain `INSERT`, not `ON CONFLICT DO NOTHING`: every caller treats a row already there
/// as a conflict of the whole transaction, and a speculative insertion costs PostgreSQL a
/// second descent of the primary key per row (the pre-check), a speculative lock and a
/// second WAL record (its confirmation), all for the rare redelivery (issue 12).
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
    let mut customers: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    for (id, r) in rows {
        customers.push(r.customer.as_deref());
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
        .bind(&customers)
        .execute(&mut **tx)
        .await;
    match inserted {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(e))
            if e.is_unique_violation() && e.constraint() == Some("order_ledger_pkey") =>
        {
            Err(PgStoreError::Conflict(
                "an order of the batch is in the ledger already",
            ))
        }
        Err(e) => Err(e.into()),
    }
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
    rows.iter()
        .map(|r| {
            let order_id: String = r.try_get(0)?;
            Ok(Unannounced {
                items: decode_items(r, 1, &order_id)?,
                order_id,
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

/// Rows of (order id, `items::text`, customer id).
fn decode_due(rows: &[PgRow]) -> Result<Vec<DueOrder>, PgStoreError> {
    rows.iter()
        .map(|r| {
            let order_id: String = r.try_get(0)?;
            Ok(DueOrder {
                items: decode_items(r, 1, &order_id)?,
                customer: r.try_get(2)?,
                order_id,
            })
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
    /// `read_slot_loads`: the generation, the whole load's, and each range a partial
    /// rebuild loaded since (a few rows per rebuild, none after a whole load).
    pub const READ_SLOT_LOADS: &str = "SELECT g.gen, g.loaded_gen, s.lo, s.hi, s.gen
         FROM redis_generation g LEFT JOIN redis_slot_generation s ON s.gen > g.loaded_gen
         WHERE g.id";
    /// The stock rows and their limits (`limit_version` of the locked row version against
    /// the limit's own: see the module docs).
    pub const LOCK_STOCK: &str =
        "SELECT s.product_id, s.available, s.limit_version, l.per_customer, l.version
         FROM stock s LEFT JOIN product_limit l ON l.product_id = s.product_id
         WHERE s.product_id = ANY($1) ORDER BY s.product_id FOR UPDATE OF s";
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
             (kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders)
         SELECT g.kind, g.ref, ($5::bigint[])[g.first:g.last], ($6::bigint[])[g.first:g.last],
                ($7::bigint[])[g.first:g.last], ($8::bigint[])[g.first:g.last],
                ($9::bigint[])[g.first:g.last], ($10::int[])[g.first:g.last]
         FROM UNNEST($1::text[], $2::text[], $3::int[], $4::int[]) AS g(kind, ref, first, last)";
    pub const FIND_REQUEST: &str =
        "SELECT product_id, kind, available_delta, at < now() - make_interval(secs => $2), gen
         FROM stock_request WHERE request_id = $1";
    pub const INSERT_REQUEST: &str =
        "INSERT INTO stock_request (request_id, product_id, kind, available_delta, gen)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING";
    pub const APPLY_REQUEST: &str = "UPDATE stock SET available = available + $2, total_added = total_added + $2, updated_at = now()
         WHERE product_id = $1";
    pub const FETCH_LEDGER: &str = "SELECT order_id, status, reject_reason, reject_product, release_reason, settled_by, items::text,
                token, comp_gen, customer_id
         FROM order_ledger WHERE order_id = ANY($1)";
    pub const INSERT_ORDERS: &str = "INSERT INTO order_ledger
             (order_id, status, reject_reason, reject_product, release_reason, settled_by, items,
              reserved_until, settled_at, token, comp_gen, customer_id)
         SELECT o, s, rr, rp, rel, sb, i::jsonb,
                CASE WHEN s = 'reserved' THEN now() + make_interval(secs => $8) END,
                CASE WHEN s IN ('confirmed', 'released') THEN now() END,
                tk, cg, cu
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                     $9::text[], $10::bigint[], $11::text[])
              AS t(o, s, rr, rp, rel, sb, i, tk, cg, cu)";
    pub const UPDATE_ORDERS: &str = "UPDATE order_ledger l
         SET status = t.s, release_reason = t.rel, settled_by = t.sb, settled_at = now(), comp_gen = t.cg
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) AS t(o, s, rel, sb, cg)
         WHERE l.order_id = t.o";
    pub const DUE_RESERVATIONS: &str = "SELECT order_id, items::text, customer_id FROM order_ledger
         WHERE status = 'reserved' AND reserved_until <= now()
         ORDER BY reserved_until LIMIT $1";
    pub const DUE_AMONG: &str = "SELECT order_id, items::text, customer_id FROM order_ledger
         WHERE order_id = ANY($1) AND status = 'reserved' AND reserved_until <= now()";
    pub const RELEASE_EXPIRED: &str = "UPDATE order_ledger
         SET status = 'released', release_reason = 'expired', settled_by = 'expiry', settled_at = now(),
             announced = false, comp_gen = $2
         WHERE order_id = ANY($1)";
    pub const UNANNOUNCED: &str = "SELECT order_id, items::text, token, comp_gen FROM order_ledger WHERE NOT announced LIMIT $1";
    pub const MARK_ANNOUNCED: &str =
        "UPDATE order_ledger SET announced = true WHERE order_id = ANY($1)";
    /// The counts of (product, customer) pairs, by the primary key.
    pub const READ_UNITS: &str = "SELECT u.product_id, u.customer_id, u.units
         FROM UNNEST($1::bigint[], $2::text[]) AS t(p, c)
         JOIN customer_units u ON u.product_id = t.p AND u.customer_id = t.c";
    /// One change per (product, customer): each row is touched by one of the three parts
    /// (a count reaching 0 or below is deleted, a decrease updated, an increase upserted).
    /// Returns the rows touched and how many decreases took more than was held.
    pub const APPLY_UNITS: &str = "WITH t AS (SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[]) AS t(p, c, d)),
         gone AS (DELETE FROM customer_units u USING t
                  WHERE t.d < 0 AND u.product_id = t.p AND u.customer_id = t.c AND u.units + t.d <= 0
                  RETURNING u.units + t.d AS rest),
         down AS (UPDATE customer_units u SET units = u.units + t.d FROM t
                  WHERE t.d < 0 AND u.product_id = t.p AND u.customer_id = t.c AND u.units + t.d > 0
                  RETURNING 1),
         up AS (INSERT INTO customer_units (product_id, customer_id, units)
                SELECT p, c, d FROM t WHERE d > 0
                ON CONFLICT (product_id, customer_id) DO UPDATE SET units = customer_units.units + EXCLUDED.units
                RETURNING 1)
         SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM down) + (SELECT count(*) FROM up),
                (SELECT count(*) FROM gone WHERE rest < 0)";
    pub const PRODUCT_LIMIT: &str =
        "SELECT per_customer, version FROM product_limit WHERE product_id = $1";
    /// `set_limit`'s statements (its ledger scan, [`COMPUTE_UNITS`], is not here).
    pub const FIND_LIMIT_REQUEST: &str =
        "SELECT product_id, per_customer, previous, version, gen FROM limit_request WHERE request_id = $1";
    pub const NEXT_LIMIT_VERSION: &str = "SELECT nextval('limit_version')";
    pub const UPSERT_LIMIT: &str = "INSERT INTO product_limit (product_id, per_customer, version) VALUES ($1, $2, $3)
         ON CONFLICT (product_id) DO UPDATE SET per_customer = EXCLUDED.per_customer, version = EXCLUDED.version";
    pub const DELETE_LIMIT: &str = "DELETE FROM product_limit WHERE product_id = $1";
    pub const DELETE_UNITS_OF: &str = "DELETE FROM customer_units WHERE product_id = $1";
    pub const MARK_LIMIT_VERSION: &str =
        "UPDATE stock SET limit_version = $2, updated_at = now() WHERE product_id = $1";
    pub const INSERT_LIMIT_REQUEST: &str =
        "INSERT INTO limit_request (request_id, product_id, per_customer, previous, version, gen)
         VALUES ($1, $2, $3, $4, $5, $6)";

    /// Not in [`ALL`]: the counts of a product that gets a limit, computed from the whole
    /// ledger (every `reserved` and `confirmed` order with a customer, summing its item of
    /// that product). A sequential scan of `order_ledger`, run only by `set_limit` when a
    /// limit is first set (an operator's rare change), never per batch.
    pub const COMPUTE_UNITS: &str = "INSERT INTO customer_units (product_id, customer_id, units)
         SELECT $1, l.customer_id, sum((i ->> 'quantity')::bigint)
         FROM order_ledger l CROSS JOIN LATERAL jsonb_array_elements(l.items) AS i
         WHERE l.status IN ('reserved', 'confirmed') AND l.customer_id IS NOT NULL
           AND (i ->> 'product_id')::bigint = $1
         GROUP BY l.customer_id
         HAVING sum((i ->> 'quantity')::bigint) > 0";

    /// `holding`: a partial rebuild's question, per order of a lost record.
    pub const HOLDING: &str = "SELECT order_id, token FROM order_ledger
         WHERE order_id = ANY($1) AND status IN ('reserved', 'confirmed')";

    /// (name, statement) of every statement above.
    pub const ALL: &[(&str, &str)] = &[
        ("READ_GEN", READ_GEN),
        ("READ_SLOT_LOADS", READ_SLOT_LOADS),
        ("HOLDING", HOLDING),
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
        ("READ_UNITS", READ_UNITS),
        ("APPLY_UNITS", APPLY_UNITS),
        ("PRODUCT_LIMIT", PRODUCT_LIMIT),
        ("FIND_LIMIT_REQUEST", FIND_LIMIT_REQUEST),
        ("NEXT_LIMIT_VERSION", NEXT_LIMIT_VERSION),
        ("UPSERT_LIMIT", UPSERT_LIMIT),
        ("DELETE_LIMIT", DELETE_LIMIT),
        ("DELETE_UNITS_OF", DELETE_UNITS_OF),
        ("MARK_LIMIT_VERSION", MARK_LIMIT_VERSION),
        ("INSERT_LIMIT_REQUEST", INSERT_LIMIT_REQUEST),
    ];
}
