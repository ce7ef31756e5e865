//! The survey's PostgreSQL strategies (§2.1 to §2.3) on a table of the survey's shape,
//! `survey_stock(product_id, quantity, version)`, in the run's own database. The table has
//! no `CHECK (quantity >= 0)` on purpose: a strategy that oversold would leave a negative
//! quantity to be seen. Every order's items come sorted by product id, so the row locks
//! of a multi-item order are taken in one global order (no deadlock).
//!
//! * `pessimistic` (§2.1 `PessimisticLockStockService`): one transaction per order; per
//!   item `SELECT … FOR UPDATE`, compare, then the guarded `UPDATE`. Short → `ROLLBACK`,
//!   refused. (The survey throws when the guarded UPDATE changes no row, which under the
//!   lock cannot happen; here that rolls back and refuses too.)
//! * `optimistic` (§2.2 `OptimisticLockStockService`): per attempt, per item, read
//!   quantity and version without a lock, compare, then
//!   `UPDATE … SET version = version + 1 WHERE version = $v AND quantity >= q`.
//!   A single item runs in autocommit, as the
//!   survey's (non-transactional) service does; several items share one transaction,
//!   rolled back at the first miss. The survey's retry policy exactly: at most
//!   [`MAX_RETRY_TIMES`] attempts, sleeping `10 + i*5` ms after failed attempt `i`, the
//!   last one included (the survey's loop sleeps before it gives up), then refused. A
//!   shortage also fails an attempt and is retried, as in the survey's code.
//! * `atomic` (§2.3 `AtomicStockService`): the guarded `UPDATE` alone; one item in
//!   autocommit (`deductStock`), several in one transaction that rolls back when an
//!   UPDATE changes no row (`batchDeductStock`).
//!
//! Database errors are not retried (the survey logs them and retries in `optimistic`):
//! none is expected, and one stops the run.

use crate::driver::Client;
use crate::load::Order;
use anyhow::{bail, Context, Result};
use sqlx::{Connection, PgConnection, PgPool};
use std::collections::BTreeMap;
use std::time::Duration;
use stock_common::events::Item;

/// The survey's `MAX_RETRY_TIMES`.
pub const MAX_RETRY_TIMES: u64 = 3;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS survey_stock (
    product_id bigint PRIMARY KEY,
    quantity bigint NOT NULL,
    version bigint NOT NULL DEFAULT 0
)";
const SELECT_FOR_UPDATE: &str =
    "SELECT quantity FROM survey_stock WHERE product_id = $1 FOR UPDATE";
const SELECT: &str = "SELECT quantity, version FROM survey_stock WHERE product_id = $1";
const DEDUCT: &str = "UPDATE survey_stock SET quantity = quantity - $2 \
     WHERE product_id = $1 AND quantity >= $2";
const DEDUCT_WITH_VERSION: &str =
    "UPDATE survey_stock SET quantity = quantity - $2, version = version + 1 \
     WHERE product_id = $1 AND version = $3 AND quantity >= $2";

/// A PostgreSQL strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sql {
    Pessimistic,
    Optimistic,
    Atomic,
}

/// Creates the survey's table (once per run).
pub async fn create_table(pool: &PgPool) -> Result<()> {
    sqlx::query(CREATE)
        .execute(pool)
        .await
        .context("creating survey_stock")?;
    Ok(())
}

/// Empties the table and loads `stock` (version 0): a fresh table for every measurement.
pub async fn load(pool: &PgPool, stock: &BTreeMap<i64, i64>) -> Result<()> {
    let ids: Vec<i64> = stock.keys().copied().collect();
    let units: Vec<i64> = stock.values().copied().collect();
    sqlx::query("TRUNCATE survey_stock")
        .execute(pool)
        .await
        .context("emptying survey_stock")?;
    sqlx::query(
        "INSERT INTO survey_stock (product_id, quantity)
         SELECT * FROM UNNEST($1::bigint[], $2::bigint[])",
    )
    .bind(&ids)
    .bind(&units)
    .execute(pool)
    .await
    .context("loading survey_stock")?;
    sqlx::query("ANALYZE survey_stock")
        .execute(pool)
        .await
        .context("ANALYZE survey_stock")?;
    Ok(())
}

/// Every product's quantity at the end.
pub async fn levels(pool: &PgPool) -> Result<BTreeMap<i64, Option<i64>>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT product_id, quantity FROM survey_stock")
        .fetch_all(pool)
        .await
        .context("reading survey_stock")?;
    Ok(rows.into_iter().map(|(p, q)| (p, Some(q))).collect())
}

/// One task: its own connection (not a pool's) and the strategy.
pub struct SqlClient {
    conn: PgConnection,
    strategy: Sql,
}

impl SqlClient {
    /// `n` clients, each connected to `url`.
    pub async fn connect(url: &str, strategy: Sql, n: usize) -> Result<Vec<SqlClient>> {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = PgConnection::connect(url)
                .await
                .context("connecting to the survey database")?;
            clients.push(SqlClient { conn, strategy });
        }
        Ok(clients)
    }
}

impl Client for SqlClient {
    type Order = Order;

    async fn place(&mut self, order: &Order) -> Result<bool> {
        let conn = &mut self.conn;
        match self.strategy {
            Sql::Pessimistic => pessimistic(conn, &order.items).await,
            Sql::Optimistic => optimistic(conn, &order.items).await,
            Sql::Atomic => atomic(conn, &order.items).await,
        }
    }
}

async fn pessimistic(conn: &mut PgConnection, items: &[Item]) -> Result<bool> {
    let mut tx = conn.begin().await.context("BEGIN")?;
    for it in items {
        let quantity: Option<i64> = sqlx::query_scalar(SELECT_FOR_UPDATE)
            .bind(it.product_id)
            .fetch_optional(&mut *tx)
            .await
            .context("SELECT … FOR UPDATE")?;
        let Some(quantity) = quantity else {
            bail!("product {} does not exist (商品不存在)", it.product_id);
        };
        let taken = quantity >= it.quantity
            && deduct(&mut tx, it).await.context("UPDATE under the lock")?;
        if !taken {
            tx.rollback().await.context("ROLLBACK")?;
            return Ok(false);
        }
    }
    tx.commit().await.context("COMMIT")?;
    Ok(true)
}

async fn optimistic(conn: &mut PgConnection, items: &[Item]) -> Result<bool> {
    for i in 0..MAX_RETRY_TIMES {
        if optimistic_once(conn, items).await? {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(10 + i * 5)).await;
    }
    Ok(false)
}

/// One attempt (`deductStockOnce`), all items or none.
async fn optimistic_once(conn: &mut PgConnection, items: &[Item]) -> Result<bool> {
    if let [it] = items {
        return with_version(conn, it).await;
    }
    let mut tx = conn.begin().await.context("BEGIN")?;
    for it in items {
        if !with_version(&mut tx, it).await? {
            tx.rollback().await.context("ROLLBACK")?;
            return Ok(false);
        }
    }
    tx.commit().await.context("COMMIT")?;
    Ok(true)
}

async fn with_version(conn: &mut PgConnection, it: &Item) -> Result<bool> {
    let row: Option<(i64, i64)> = sqlx::query_as(SELECT)
        .bind(it.product_id)
        .fetch_optional(&mut *conn)
        .await
        .context("SELECT quantity, version")?;
    let Some((quantity, version)) = row else {
        bail!("product {} does not exist (商品不存在)", it.product_id);
    };
    if quantity < it.quantity {
        return Ok(false);
    }
    let updated = sqlx::query(DEDUCT_WITH_VERSION)
        .bind(it.product_id)
        .bind(it.quantity)
        .bind(version)
        .execute(&mut *conn)
        .await
        .context("UPDATE … WHERE version")?
        .rows_affected();
    Ok(updated == 1)
}

async fn atomic(conn: &mut PgConnection, items: &[Item]) -> Result<bool> {
    if let [it] = items {
        return deduct(conn, it).await;
    }
    let mut tx = conn.begin().await.context("BEGIN")?;
    for it in items {
        if !deduct(&mut tx, it).await? {
            tx.rollback().await.context("ROLLBACK")?;
            return Ok(false);
        }
    }
    tx.commit().await.context("COMMIT")?;
    Ok(true)
}

/// The guarded UPDATE; true when it changed the row.
async fn deduct(conn: &mut PgConnection, it: &Item) -> Result<bool> {
    let updated = sqlx::query(DEDUCT)
        .bind(it.product_id)
        .bind(it.quantity)
        .execute(&mut *conn)
        .await
        .context("UPDATE … WHERE quantity >= q")?
        .rows_affected();
    Ok(updated == 1)
}
