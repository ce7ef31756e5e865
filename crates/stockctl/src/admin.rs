//! Stock operations on PostgreSQL and Redis together, in the order that keeps Redis from
//! offering stock PostgreSQL cannot give: stock that comes back (or is added) goes into
//! PostgreSQL first and Redis second.

use redis::AsyncCommands;
use sqlx::{PgPool, Row};
use std::collections::BTreeMap;
use stock_common::redis_store::{stock_key, RedisStore};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: {0}")]
    Store(#[from] stock_common::redis_store::StoreError),
    #[error(
        "product {product_id} has {reserved} reserved and {sold} sold; use --force to overwrite"
    )]
    HasReservations {
        product_id: i64,
        reserved: i64,
        sold: i64,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The PostgreSQL columns of one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StockRow {
    pub product_id: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    pub total_added: i64,
}

/// Makes `product_id` hold exactly `stock` available units and nothing reserved or sold,
/// in PostgreSQL, then in Redis. Refuses a product with reservations or sales unless
/// `force`. Meant for loading stock before selling starts.
pub async fn set_stock(
    pool: &PgPool,
    redis: &RedisStore,
    product_id: i64,
    stock: i64,
    force: bool,
) -> Result<StockRow, AdminError> {
    if product_id < 1 || stock < 0 {
        return Err(AdminError::Invalid(
            "product id must be >= 1 and stock >= 0".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    let existing = sqlx::query("SELECT reserved, sold FROM stock WHERE product_id = $1 FOR UPDATE")
        .bind(product_id)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(r) = existing {
        let (reserved, sold): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
        if (reserved > 0 || sold > 0) && !force {
            return Err(AdminError::HasReservations {
                product_id,
                reserved,
                sold,
            });
        }
    }
    sqlx::query(
        "INSERT INTO stock (product_id, available, reserved, sold, total_added) VALUES ($1, $2, 0, 0, $2)
         ON CONFLICT (product_id) DO UPDATE SET available = $2, reserved = 0, sold = 0, total_added = $2, updated_at = now()",
    )
    .bind(product_id)
    .bind(stock)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let _: () = redis.connection().set(stock_key(product_id), stock).await?;
    Ok(StockRow {
        product_id,
        available: stock,
        reserved: 0,
        sold: 0,
        total_added: stock,
    })
}

/// PostgreSQL rows of `products` (all products when empty).
pub async fn stock_rows(pool: &PgPool, products: &[i64]) -> Result<Vec<StockRow>, AdminError> {
    let rows = if products.is_empty() {
        sqlx::query("SELECT product_id, available, reserved, sold, total_added FROM stock ORDER BY product_id")
            .fetch_all(pool)
            .await?
    } else {
        sqlx::query(
            "SELECT product_id, available, reserved, sold, total_added FROM stock WHERE product_id = ANY($1) ORDER BY product_id",
        )
        .bind(products)
        .fetch_all(pool)
        .await?
    };
    rows.iter()
        .map(|r| {
            Ok(StockRow {
                product_id: r.try_get(0)?,
                available: r.try_get(1)?,
                reserved: r.try_get(2)?,
                sold: r.try_get(3)?,
                total_added: r.try_get(4)?,
            })
        })
        .collect()
}

/// One product's disagreement with the contract's guarantees.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub product_id: i64,
    pub what: String,
}

/// Checks guarantees 1 and 3 for `products` (all when empty): columns never negative,
/// `available + reserved + sold = total_added`, Redis non-negative and equal to
/// `available`. Meaningful once the pipeline is idle.
pub async fn check_invariants(
    pool: &PgPool,
    redis: &RedisStore,
    products: &[i64],
) -> Result<Vec<Violation>, AdminError> {
    let rows = stock_rows(pool, products).await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.product_id).collect();
    let levels = redis.stock_levels(&ids).await?;
    let mut v = Vec::new();
    let mut seen = BTreeMap::new();
    for (r, level) in rows.iter().zip(levels) {
        seen.insert(r.product_id, ());
        if r.available < 0 || r.reserved < 0 || r.sold < 0 {
            v.push(Violation {
                product_id: r.product_id,
                what: format!("negative column: {r:?}"),
            });
        }
        if r.available + r.reserved + r.sold != r.total_added {
            v.push(Violation {
                product_id: r.product_id,
                what: format!("not conserved: {r:?}"),
            });
        }
        match level {
            Some(l) if l < 0 => v.push(Violation {
                product_id: r.product_id,
                what: format!("redis negative: {l}"),
            }),
            Some(l) if l != r.available => v.push(Violation {
                product_id: r.product_id,
                what: format!("redis {l} != available {}", r.available),
            }),
            None => v.push(Violation {
                product_id: r.product_id,
                what: "redis key missing".into(),
            }),
            _ => {}
        }
    }
    for p in products {
        if !seen.contains_key(p) {
            v.push(Violation {
                product_id: *p,
                what: "no stock row".into(),
            });
        }
    }
    Ok(v)
}
