//! Operators' stock operations on PostgreSQL and Redis together: restock, set, show,
//! history and the drift check.
//!
//! # The ordering rule
//!
//! **Stock that leaves is taken from Redis first and PostgreSQL second; stock that comes
//! back or is added goes into PostgreSQL first and Redis second.** Then Redis never offers
//! stock PostgreSQL cannot give: a crash between the two steps leaves Redis *below*
//! PostgreSQL (an undersell until the retry or the drift check), never above it.
//!
//! # Request ids: a retried change applies once
//!
//! Every restock and set carries a request id (the CLI makes a UUID when none is given and
//! prints it). PostgreSQL remembers it in `stock_request`, in the same transaction as the
//! `stock` UPDATE and its `stock_movement` row; Redis remembers it as
//! `stockpipe:request:<id>` (written by `adjust.lua` in the same script as the stock change,
//! kept for `--order-memory`). Retrying with the same id therefore finishes what the first
//! attempt left undone and repeats nothing:
//!
//! * an increase that died after the PostgreSQL commit finds its `stock_request` row, skips
//!   PostgreSQL and gives Redis its share (`adjust.lua` says `already` if Redis had it);
//! * a decrease that died after Redis gave the stock up finds the Redis marker without a
//!   `stock_request` row and finishes the PostgreSQL step with the amount Redis gave;
//! * a decrease that PostgreSQL refused is undone in Redis (request `<id>:undo`) and both
//!   markers are removed, so the id can be retried from scratch.
//!
//! # Generations: a change overlapping a rebuild
//!
//! The PostgreSQL half of a change reads `redis_generation` first in its transaction (see
//! `crate::rebuild`), and its Redis half applies only in that generation (`adjust.lua`
//! says `stale` otherwise: the rebuild that replaced it loaded the change from its
//! snapshot). An increase that finds Redis not loaded waits for the load in progress (up
//! to [`LOAD_WAIT`]); a decrease takes from Redis in the current generation and commits in
//! PostgreSQL only if the generation is still that one, else takes again in the new one.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};
use std::collections::BTreeMap;
use std::time::Duration;
use stock_common::pg_store::{self, find_request, FoundRequest, PgStoreError, StockRequest};
use stock_common::redis_store::{AdjustOutcome, RedisStore, Risk, StoreError};

pub use stock_common::pg_store::StockRow;

/// How long an increase waits for a Redis that is being loaded.
pub const LOAD_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: {0}")]
    Store(#[from] StoreError),
    /// A PostgreSQL row this code cannot read (a ledger or request row): permanent.
    #[error("{0}")]
    Ledger(PgStoreError),
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
    #[error("product {0} has no stock row; create it with `stockctl set --product {0} --stock N`")]
    UnknownProduct(i64),
    #[error("request id {request_id} reused for a different change: it was {was}; use a new --request-id")]
    RequestReused { request_id: String, was: String },
    #[error(
        "Redis holds {have} of product {product_id}, less than the {take} to take: orders in flight \
         hold the rest (or Redis drifted, see `stockctl check`); nothing changed"
    )]
    RedisShort {
        product_id: i64,
        have: i64,
        take: i64,
    },
    #[error("Redis is not loaded (no stockpipe:loaded marker): run `stockctl rebuild` first; nothing changed")]
    RedisUnloaded,
    #[error("stock:{{{0}}} in Redis does not hold an integer: run `stockctl check --repair` first; nothing changed")]
    RedisCorrupt(i64),
    #[error(
        "PostgreSQL refused to take {take} from product {product_id} ({reason}); Redis was given \
         its {take} back, nothing changed"
    )]
    PgRefused {
        product_id: i64,
        take: i64,
        reason: String,
    },
    #[error(
        "Redis gave up {take} of product {product_id} but the PostgreSQL step did not finish \
         ({cause}); retry with --request-id {request_id} to finish the change"
    )]
    Interrupted {
        product_id: i64,
        take: i64,
        request_id: String,
        cause: String,
    },
}

impl From<PgStoreError> for AdminError {
    fn from(e: PgStoreError) -> Self {
        match e {
            PgStoreError::Db(e) => AdminError::Db(e),
            e => AdminError::Ledger(e),
        }
    }
}

/// What one step of a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Done now.
    Applied,
    /// Done before under the same request id; nothing repeated.
    Already,
    /// Nothing to do (a set to the current value, or a decrease's Redis step, which came
    /// before PostgreSQL's).
    Unchanged,
    /// Redis is not loaded: PostgreSQL has the change, the next `stockctl rebuild` loads it.
    Unloaded,
    /// Redis was rebuilt after PostgreSQL took the change: the rebuild loaded it.
    Loaded,
    /// The request is older than Redis remembers requests (`--order-memory`): Redis was not
    /// touched, so that nothing is added twice. `stockctl check` shows whether it lacks it.
    Expired,
}

/// The outcome of a restock or set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StockChange {
    pub request_id: String,
    pub product_id: i64,
    /// `restock` or `set`.
    pub kind: &'static str,
    /// The change of `available` this request stands for (0 for a set to the current value).
    pub available_delta: i64,
    pub postgres: Step,
    pub redis: Step,
    /// PostgreSQL after the change.
    pub row: StockRow,
}

/// A fresh request id.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(crate) fn validate_request_id(id: &str) -> Result<(), AdminError> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(AdminError::Invalid(format!(
            "request id {id:?}: 1 to 128 characters of A-Z a-z 0-9 - _ . :"
        )))
    }
}

pub(crate) fn validate_product(product_id: i64) -> Result<(), AdminError> {
    if product_id < 1 {
        return Err(AdminError::Invalid(format!(
            "product id {product_id}: must be >= 1"
        )));
    }
    Ok(())
}

/// Fails unless the recorded request is the same change (`delta` None: any amount).
fn same_change(
    req: &StockRequest,
    request_id: &str,
    product_id: i64,
    kind: &str,
    delta: Option<i64>,
) -> Result<(), AdminError> {
    if req.product_id == product_id
        && req.kind == kind
        && delta.is_none_or(|d| d == req.available_delta)
    {
        return Ok(());
    }
    Err(AdminError::RequestReused {
        request_id: request_id.to_owned(),
        was: format!(
            "a {} of {:+} on product {}",
            req.kind, req.available_delta, req.product_id
        ),
    })
}

/// The PostgreSQL half of a change in generation `gen`: [`pg_store::apply_request`].
async fn apply_request(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    request_id: &str,
    product_id: i64,
    kind: &'static str,
    delta: i64,
    gen: i64,
) -> Result<bool, sqlx::Error> {
    let req = StockRequest {
        request_id: request_id.to_owned(),
        product_id,
        kind,
        available_delta: delta,
        gen: Some(gen),
    };
    pg_store::apply_request(tx, &req).await
}

/// The Redis half of an increase that PostgreSQL committed in generation `gen`:
/// `adjust.lua` once per request, in that generation only. A load of that very generation
/// under way is waited for (up to [`LOAD_WAIT`]): its snapshot came before the commit, so
/// it must still get the increase. Otherwise an unloaded Redis will be loaded by a later
/// rebuild, whose snapshot holds the increase ([`Step::Unloaded`]).
async fn give_to_redis(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    delta: i64,
    request_id: &str,
    gen: Option<i64>,
) -> Result<Step, AdminError> {
    let deadline = tokio::time::Instant::now() + LOAD_WAIT;
    let mut last_try = false;
    loop {
        return match store.adjust(product_id, delta, request_id, gen).await? {
            AdjustOutcome::Applied => Ok(Step::Applied),
            AdjustOutcome::Already => Ok(Step::Already),
            AdjustOutcome::Stale => Ok(Step::Loaded),
            AdjustOutcome::Unloaded
                if !last_try && tokio::time::Instant::now() < deadline && gen.is_some() =>
            {
                // A load of this generation under way is waited for. If none is, try once
                // more: the load may have finished between Redis' answer and this question.
                if crate::rebuild::loading(pool, gen.unwrap_or_default()).await? {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } else {
                    last_try = true;
                }
                continue;
            }
            AdjustOutcome::Unloaded => Ok(Step::Unloaded),
            AdjustOutcome::Corrupt => Err(AdminError::RedisCorrupt(product_id)),
            AdjustOutcome::Reused => Err(AdminError::RequestReused {
                request_id: request_id.to_owned(),
                was: "a change of another product or amount in Redis".into(),
            }),
            AdjustOutcome::Short => Err(StoreError::Protocol(format!(
                "adjust said short for an increase of {delta}"
            ))
            .into()),
        };
    }
}

/// Adds `quantity` (>= 1) units to an existing product: PostgreSQL first (the
/// `stock_request` row, the `stock` UPDATE and a `restock` movement in one transaction),
/// then Redis (once per request id). A retry with the same `request_id` adds nothing more
/// to either store and finishes what an interrupted attempt left undone. When Redis is not
/// loaded the result says [`Step::Unloaded`]: PostgreSQL has the stock and the next
/// `stockctl rebuild` puts it into Redis.
pub async fn restock(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    quantity: i64,
    request_id: &str,
) -> Result<StockChange, AdminError> {
    validate_product(product_id)?;
    validate_request_id(request_id)?;
    if quantity < 1 {
        return Err(AdminError::Invalid(format!(
            "quantity {quantity}: must be >= 1"
        )));
    }
    let memory = store.record_ttl_secs();
    // A set that gave up Redis stock under this id and did not finish owns it.
    if let Some(m) = store.request_marker(request_id, product_id).await? {
        if find_request(pool, request_id, memory).await?.is_none() {
            return Err(AdminError::RequestReused {
                request_id: request_id.to_owned(),
                was: format!("an unfinished change of {m} in Redis"),
            });
        }
    }
    let postgres = restock_postgres(pool, product_id, quantity, request_id).await?;
    let found = find_request(pool, request_id, memory)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    let redis = if postgres == Step::Already && found.expired {
        Step::Expired
    } else {
        let gen = found.request.gen;
        give_to_redis(pool, store, product_id, quantity, request_id, gen).await?
    };
    Ok(StockChange {
        request_id: request_id.to_owned(),
        product_id,
        kind: "restock",
        available_delta: quantity,
        postgres,
        redis,
        row: current_row(pool, product_id).await?,
    })
}

/// The PostgreSQL half of [`restock`], alone: [`Step::Applied`] or, when the request id is
/// known and is the same change, [`Step::Already`]. [`restock`] with the same id then
/// completes the Redis half; tests use it to stand for an attempt that died in between.
pub async fn restock_postgres(
    pool: &PgPool,
    product_id: i64,
    quantity: i64,
    request_id: &str,
) -> Result<Step, AdminError> {
    let mut tx = pool.begin().await?;
    let gen = pg_store::read_gen(&mut tx).await?;
    match apply_request(&mut tx, request_id, product_id, "restock", quantity, gen).await {
        Ok(true) => {
            tx.commit().await?;
            Ok(Step::Applied)
        }
        Ok(false) => {
            let found = find_request(&mut *tx, request_id, 0)
                .await?
                .ok_or(sqlx::Error::RowNotFound)?;
            same_change(
                &found.request,
                request_id,
                product_id,
                "restock",
                Some(quantity),
            )?;
            Ok(Step::Already)
        }
        Err(sqlx::Error::RowNotFound) => Err(AdminError::UnknownProduct(product_id)),
        Err(e) => Err(e.into()),
    }
}

async fn current_row(pool: &PgPool, product_id: i64) -> Result<StockRow, AdminError> {
    stock_rows(pool, &[product_id])
        .await?
        .into_iter()
        .next()
        .ok_or(AdminError::UnknownProduct(product_id))
}

/// Makes `product_id` hold `stock` available units, with a request id of its own. See
/// [`set_stock_with_request`]; this is the form the demo, the tests and the benchmarks use
/// to load stock.
pub async fn set_stock(
    pool: &PgPool,
    redis: &RedisStore,
    product_id: i64,
    stock: i64,
    force: bool,
) -> Result<StockRow, AdminError> {
    Ok(
        set_stock_with_request(pool, redis, product_id, stock, force, &new_request_id())
            .await?
            .row,
    )
}

/// Makes `available` of `product_id` equal `stock`, leaving `reserved` and `sold` alone
/// (`total_added` moves with `available`, so conservation holds).
///
/// * A product without a row gets one (all zeros) and then an increase of `stock`.
/// * A product with reservations or sales is refused unless `force`
///   ([`AdminError::HasReservations`]).
/// * An increase goes as a restock does: PostgreSQL (under the row lock, so the result is
///   exactly `stock`), then Redis.
/// * A decrease takes from Redis first ([`AdminError::RedisShort`] when orders in flight
///   hold more than Redis can give, [`AdminError::RedisUnloaded`]; nothing changed in both
///   cases), then PostgreSQL by the same amount. If PostgreSQL refuses (orders reserved
///   meanwhile would leave `available` below zero), Redis gets the stock back and the
///   error says so ([`AdminError::PgRefused`]). Under traffic the final `available` can
///   differ from `stock` by what orders did in between; both stores still moved by the
///   same amount.
///
/// The same `request_id` again changes nothing more (it may finish an interrupted attempt).
pub async fn set_stock_with_request(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    stock: i64,
    force: bool,
    request_id: &str,
) -> Result<StockChange, AdminError> {
    validate_product(product_id)?;
    validate_request_id(request_id)?;
    if stock < 0 {
        return Err(AdminError::Invalid(format!("stock {stock}: must be >= 0")));
    }
    let memory = store.record_ttl_secs();
    let done = if let Some(req) = find_request(pool, request_id, memory).await? {
        set_again(pool, store, product_id, request_id, &req).await?
    } else if let Some((product, taken)) = store.pending_request(request_id, product_id).await? {
        set_finish_pending(pool, store, product_id, request_id, product, taken).await?
    } else {
        set_afresh(pool, store, product_id, stock, force, request_id).await?
    };
    Ok(StockChange {
        request_id: request_id.to_owned(),
        product_id,
        kind: "set",
        available_delta: done.delta,
        postgres: done.postgres,
        redis: done.redis,
        row: done.row,
    })
}

/// What one path of [`set_stock_with_request`] did.
struct SetDone {
    /// The change of `available` the request stands for.
    delta: i64,
    postgres: Step,
    redis: Step,
    /// PostgreSQL after the change.
    row: StockRow,
}

/// A set whose request PostgreSQL already holds: nothing again in PostgreSQL; an increase
/// still gives Redis its share (once).
async fn set_again(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    request_id: &str,
    found: &FoundRequest,
) -> Result<SetDone, AdminError> {
    let req = &found.request;
    same_change(req, request_id, product_id, "set", None)?;
    let redis = if req.available_delta <= 0 {
        Step::Unchanged
    } else if found.expired {
        Step::Expired
    } else {
        give_to_redis(
            pool,
            store,
            product_id,
            req.available_delta,
            request_id,
            req.gen,
        )
        .await?
    };
    Ok(SetDone {
        delta: req.available_delta,
        postgres: Step::Already,
        redis,
        row: current_row(pool, product_id).await?,
    })
}

/// A set whose earlier attempt took `taken` of `product` from Redis and died before
/// PostgreSQL: finishes the decrease (or refuses a request id reused for another change).
async fn set_finish_pending(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    request_id: &str,
    product: i64,
    taken: i64,
) -> Result<SetDone, AdminError> {
    if taken >= 0 || product != product_id {
        return Err(AdminError::RequestReused {
            request_id: request_id.to_owned(),
            was: format!("an unfinished change of {taken:+} on product {product} in Redis"),
        });
    }
    let postgres = finish_decrease(pool, store, product_id, taken, request_id).await?;
    Ok(SetDone {
        delta: taken,
        postgres,
        redis: Step::Already,
        row: current_row(pool, product_id).await?,
    })
}

/// A set never seen before: reads the row under its lock (creating it), then an increase
/// goes PostgreSQL first, a decrease Redis first.
async fn set_afresh(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    stock: i64,
    force: bool,
    request_id: &str,
) -> Result<SetDone, AdminError> {
    let mut tx = pool.begin().await?;
    let gen = pg_store::read_gen(&mut tx).await?;
    let (before, created) = pg_store::create_and_lock_product(&mut tx, product_id).await?;
    if (before.reserved > 0 || before.sold > 0) && !force {
        return Err(AdminError::HasReservations {
            product_id,
            reserved: before.reserved,
            sold: before.sold,
        });
    }
    let delta = stock - before.available;
    if delta > 0 {
        if !apply_request(&mut tx, request_id, product_id, "set", delta, gen).await? {
            return Err(AdminError::Invalid(format!(
                "request id {request_id} is being used by another command right now"
            )));
        }
        tx.commit().await?;
        let redis = give_to_redis(pool, store, product_id, delta, request_id, Some(gen)).await?;
        let row = current_row(pool, product_id).await?;
        return Ok(SetDone {
            delta,
            postgres: Step::Applied,
            redis,
            row,
        });
    }
    if delta == 0 {
        tx.commit().await?;
        // A new product with no stock still needs its Redis key, or the producer would
        // call it unknown.
        let redis = if created {
            give_to_redis(pool, store, product_id, 0, request_id, Some(gen)).await?
        } else {
            Step::Unchanged
        };
        return Ok(SetDone {
            delta: 0,
            postgres: Step::Unchanged,
            redis,
            row: before,
        });
    }
    tx.rollback().await?;
    // Stock leaves: Redis first.
    take_from_redis(store, product_id, delta, request_id).await?;
    let postgres = finish_decrease(pool, store, product_id, delta, request_id).await?;
    Ok(SetDone {
        delta,
        postgres,
        redis: Step::Applied,
        row: current_row(pool, product_id).await?,
    })
}

/// The Redis half of a decrease (`delta` < 0), in the current generation; `Ok` when Redis
/// gave the stock (now or under this request id before).
async fn take_from_redis(
    store: &RedisStore,
    product_id: i64,
    delta: i64,
    request_id: &str,
) -> Result<(), AdminError> {
    let gen = store.generation().await?.ok_or(AdminError::RedisUnloaded)?;
    match store
        .adjust(product_id, delta, request_id, Some(gen))
        .await?
    {
        AdjustOutcome::Applied | AdjustOutcome::Already => Ok(()),
        AdjustOutcome::Unloaded | AdjustOutcome::Stale => Err(AdminError::RedisUnloaded),
        AdjustOutcome::Corrupt => Err(AdminError::RedisCorrupt(product_id)),
        AdjustOutcome::Reused => Err(AdminError::RequestReused {
            request_id: request_id.to_owned(),
            was: "a change of another product or amount in Redis".into(),
        }),
        AdjustOutcome::Short => {
            let have = store.stock_levels(&[product_id]).await?[0].unwrap_or(0);
            Err(AdminError::RedisShort {
                product_id,
                have,
                take: -delta,
            })
        }
    }
}

/// Why the PostgreSQL half of a decrease did not commit.
enum PgFailure {
    /// PostgreSQL answered no (a CHECK, a missing row): nothing committed.
    Refused(String),
    /// No answer (connection lost, pool timeout): the commit may or may not have happened.
    Unknown(sqlx::Error),
    /// Redis was rebuilt (or is being rebuilt) since it gave the stock: nothing committed.
    Regenerated,
    /// Redis could not be asked its generation: nothing committed.
    Redis(String),
}

impl From<sqlx::Error> for PgFailure {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Database(db) => PgFailure::Refused(db.message().to_owned()),
            e => PgFailure::Unknown(e),
        }
    }
}

async fn decrease_postgres(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    delta: i64,
    request_id: &str,
) -> Result<Step, PgFailure> {
    let mut tx = pool.begin().await?;
    let gen = pg_store::read_gen(&mut tx).await?;
    // Redis gave the stock in its current generation; if PostgreSQL answers to another one,
    // a rebuild loaded Redis from a snapshot without this decrease: take it there again.
    let redis_gen = store
        .generation()
        .await
        .map_err(|e| PgFailure::Redis(e.to_string()))?;
    if redis_gen != Some(gen) {
        return Err(PgFailure::Regenerated);
    }
    match apply_request(&mut tx, request_id, product_id, "set", delta, gen).await {
        Ok(true) => {
            tx.commit().await?;
            Ok(Step::Applied)
        }
        // Another run of this request id finished it.
        Ok(false) => Ok(Step::Already),
        Err(sqlx::Error::RowNotFound) => Err(PgFailure::Refused(format!(
            "product {product_id} has no stock row"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The PostgreSQL half of a decrease Redis already gave (`delta` < 0). If PostgreSQL
/// refuses, Redis gets the stock back (request `<id>:undo`) and both markers go, so the id
/// can be retried; if the outcome is unknown, nothing is undone and the error asks for a
/// retry with the same id (which finishes the change or finds it done).
async fn finish_decrease(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    delta: i64,
    request_id: &str,
) -> Result<Step, AdminError> {
    for _ in 0..3 {
        match decrease_postgres(pool, store, product_id, delta, request_id).await {
            Err(PgFailure::Regenerated) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                take_from_redis(store, product_id, delta, request_id).await?;
            }
            other => {
                return finish_decrease_answer(store, product_id, delta, request_id, other).await
            }
        }
    }
    Err(AdminError::Interrupted {
        product_id,
        take: -delta,
        request_id: request_id.to_owned(),
        cause: "Redis was rebuilt three times during the change".into(),
    })
}

async fn finish_decrease_answer(
    store: &RedisStore,
    product_id: i64,
    delta: i64,
    request_id: &str,
    answer: Result<Step, PgFailure>,
) -> Result<Step, AdminError> {
    match answer {
        Ok(step) => Ok(step),
        Err(PgFailure::Refused(reason)) => {
            let undo = store.undo_adjust(product_id, -delta, request_id).await;
            let undone = match undo {
                // Unloaded: Redis lost its data; the rebuild loads `available`, which never
                // had this decrease.
                Ok(AdjustOutcome::Applied | AdjustOutcome::Already | AdjustOutcome::Unloaded) => {
                    store.forget_request(request_id, product_id).await.is_ok()
                }
                _ => false,
            };
            if undone {
                Err(AdminError::PgRefused {
                    product_id,
                    take: -delta,
                    reason,
                })
            } else {
                Err(AdminError::Interrupted {
                    product_id,
                    take: -delta,
                    request_id: request_id.to_owned(),
                    cause: format!(
                        "PostgreSQL refused ({reason}) and giving it back to Redis failed"
                    ),
                })
            }
        }
        Err(PgFailure::Unknown(e)) => Err(AdminError::Interrupted {
            product_id,
            take: -delta,
            request_id: request_id.to_owned(),
            cause: e.to_string(),
        }),
        Err(PgFailure::Redis(e)) => Err(AdminError::Interrupted {
            product_id,
            take: -delta,
            request_id: request_id.to_owned(),
            cause: e,
        }),
        Err(PgFailure::Regenerated) => Err(AdminError::RedisUnloaded),
    }
}

/// PostgreSQL rows of `products` (all products when empty).
pub async fn stock_rows(pool: &PgPool, products: &[i64]) -> Result<Vec<StockRow>, AdminError> {
    Ok(pg_store::stock_rows(pool, products).await?)
}

/// One order currently holding a reservation of a product.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpenReservation {
    pub order_id: String,
    pub quantity: i64,
    pub reserved_until: Option<DateTime<Utc>>,
}

/// Orders in state `reserved` holding a product, from the ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpenReservations {
    pub orders: i64,
    pub quantity: i64,
    /// The oldest ones, at most as many as asked for.
    pub first: Vec<OpenReservation>,
}

/// Everything about one product: PostgreSQL, Redis, open reservations.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProductReport {
    pub product_id: i64,
    /// None: no stock row.
    pub postgres: Option<StockRow>,
    /// `stock:{p}`; None: no key, or not an integer (then `redis_corrupt` holds it).
    pub redis: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_corrupt: Option<String>,
    pub redis_loaded: bool,
    pub open_reservations: OpenReservations,
    /// The per-customer limit, with the customers nearest it (the first `list`).
    pub limit: crate::limits::LimitReport,
}

/// PostgreSQL's columns, Redis' `stock:{p}` and the open reservations of `product_id`
/// (count, units, and the first `list` orders).
pub async fn show(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    list: i64,
) -> Result<ProductReport, AdminError> {
    validate_product(product_id)?;
    let postgres = stock_rows(pool, &[product_id]).await?.into_iter().next();
    let (redis, redis_corrupt) = match redis_levels(store, &[product_id]).await?.pop() {
        Some(Level::Corrupt(raw)) => (None, Some(raw)),
        Some(Level::Int(v)) => (Some(v), None),
        _ => (None, None),
    };
    let redis_loaded = store.is_loaded().await?;
    // From the ledger's live reservations (the partial index of due reservations holds
    // exactly those), each with its item of this product.
    const OPEN: &str = "FROM order_ledger l, jsonb_array_elements(l.items) e
        WHERE l.status = 'reserved'
          AND l.items @> jsonb_build_array(jsonb_build_object('product_id', $1::bigint))
          AND (e->>'product_id')::bigint = $1";
    let totals = sqlx::query(&format!(
        "SELECT count(*), coalesce(sum((e->>'quantity')::bigint), 0)::bigint {OPEN}"
    ))
    .bind(product_id)
    .fetch_one(pool)
    .await?;
    let first = sqlx::query(&format!(
        "SELECT l.order_id, (e->>'quantity')::bigint, l.reserved_until {OPEN}
         ORDER BY l.reserved_until, l.order_id LIMIT $2"
    ))
    .bind(product_id)
    .bind(list.max(0))
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| {
        Ok(OpenReservation {
            order_id: r.try_get(0)?,
            quantity: r.try_get(1)?,
            reserved_until: r.try_get(2)?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let limit = crate::limits::report(pool, store, product_id, list).await?;
    Ok(ProductReport {
        product_id,
        postgres,
        redis,
        redis_corrupt,
        redis_loaded,
        limit,
        open_reservations: OpenReservations {
            orders: totals.try_get(0)?,
            quantity: totals.try_get(1)?,
            first,
        },
    })
}

/// One product's element of a `stock_movement` row (`stock_movement_item`): the sum of one
/// transaction's changes of one kind to the product (a consumer batch, an expiry sweep, an
/// operator's request).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Movement {
    pub id: i64,
    pub kind: String,
    /// The first order the row sums, or the request id of a restock or set.
    #[serde(rename = "ref")]
    pub reference: String,
    /// How many orders the row sums (1 for a restock or set).
    pub orders: i64,
    pub quantity: i64,
    pub available_delta: i64,
    pub reserved_delta: i64,
    pub sold_delta: i64,
    pub at: DateTime<Utc>,
}

/// The latest `limit` stock movements of `product_id`, newest first. The rows holding the
/// product are found through the GIN index on `products` (a rarely moved product) or by
/// reading the newest rows first (a busy one), as the planner's statistics say.
pub async fn history(
    pool: &PgPool,
    product_id: i64,
    limit: i64,
) -> Result<Vec<Movement>, AdminError> {
    validate_product(product_id)?;
    let rows = sqlx::query(
        "SELECT id, kind, ref, quantity, available_delta, reserved_delta, sold_delta, at, orders::bigint
         FROM stock_movement_item WHERE products @> ARRAY[$1::bigint] AND product_id = $1
         ORDER BY id DESC LIMIT $2",
    )
    .bind(product_id)
    .bind(limit.max(0))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            Ok(Movement {
                id: r.try_get(0)?,
                kind: r.try_get(1)?,
                reference: r.try_get(2)?,
                quantity: r.try_get(3)?,
                available_delta: r.try_get(4)?,
                reserved_delta: r.try_get(5)?,
                sold_delta: r.try_get(6)?,
                at: r.try_get(7)?,
                orders: r.try_get(8)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?)
}

/// One order's story, from its ledger row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OrderStory {
    pub order_id: String,
    /// `reserved`, `rejected`, `confirmed` or `released`.
    pub status: String,
    pub items: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_product: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_reason: Option<String>,
    /// The event that confirmed or released it (`p<partition>@<offset>` or `expiry`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_by: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_until: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<DateTime<Utc>>,
}

/// What the ledger holds of `order_id` (`None`: never decided).
pub async fn order_story(pool: &PgPool, order_id: &str) -> Result<Option<OrderStory>, AdminError> {
    let row = sqlx::query(
        "SELECT status, items::text, reject_reason, reject_product, release_reason, settled_by,
                created_at, reserved_until, settled_at
         FROM order_ledger WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let items: &str = r.try_get(1)?;
    Ok(Some(OrderStory {
        order_id: order_id.to_owned(),
        status: r.try_get(0)?,
        items: serde_json::from_str(items).unwrap_or(serde_json::Value::Null),
        reject_reason: r.try_get(2)?,
        reject_product: r.try_get(3)?,
        release_reason: r.try_get(4)?,
        settled_by: r.try_get(5)?,
        created_at: r.try_get(6)?,
        reserved_until: r.try_get(7)?,
        settled_at: r.try_get(8)?,
    }))
}

/// One product's disagreement with the contract's guarantees.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub product_id: i64,
    pub what: String,
}

/// Guarantee 1 on one row: no negative column, `available + reserved + sold = total_added`.
fn row_violations(r: &StockRow, out: &mut Vec<Violation>) {
    if r.available < 0 || r.reserved < 0 || r.sold < 0 {
        out.push(Violation {
            product_id: r.product_id,
            what: format!("negative column: {r:?}"),
        });
    }
    if r.available + r.reserved + r.sold != r.total_added {
        out.push(Violation {
            product_id: r.product_id,
            what: format!("not conserved: {r:?}"),
        });
    }
}

/// What a `stock:{p}` key holds, as the operators' views show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    Missing,
    Int(i64),
    /// Not an integer as the scripts read one.
    Corrupt(String),
}

impl Level {
    fn value(&self) -> Option<i64> {
        match self {
            Level::Int(v) => Some(*v),
            _ => None,
        }
    }
}

/// `stock:{p}` of every product, a thousand keys per round trip.
async fn redis_levels(store: &RedisStore, ids: &[i64]) -> Result<Vec<Level>, AdminError> {
    let mut levels = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        levels.extend(
            store
                .stock_raw(chunk)
                .await?
                .into_iter()
                .map(|raw| match raw {
                    None => Level::Missing,
                    Some(v) => match v.parse() {
                        Ok(n) if stock_common::redis_store::is_stock_integer(&v) => Level::Int(n),
                        _ => Level::Corrupt(v),
                    },
                }),
        );
    }
    Ok(levels)
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
    let levels = redis_levels(redis, &ids).await?;
    let mut v = Vec::new();
    let mut seen = BTreeMap::new();
    for (r, level) in rows.iter().zip(levels) {
        seen.insert(r.product_id, ());
        row_violations(r, &mut v);
        match level {
            Level::Int(l) if l < 0 => v.push(Violation {
                product_id: r.product_id,
                what: format!("redis negative: {l}"),
            }),
            Level::Int(l) if l != r.available => v.push(Violation {
                product_id: r.product_id,
                what: format!("redis {l} != available {}", r.available),
            }),
            Level::Missing => v.push(Violation {
                product_id: r.product_id,
                what: "redis key missing".into(),
            }),
            Level::Corrupt(raw) => v.push(Violation {
                product_id: r.product_id,
                what: format!("redis holds {raw:?}, not an integer"),
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

/// A product whose `stock:{p}` differs from `available`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Drift {
    pub product_id: i64,
    /// None: no key, or not an integer.
    pub redis: Option<i64>,
    pub postgres: i64,
}

/// What [`check_drift`] found and, with repair, changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DriftReport {
    /// Products in PostgreSQL.
    pub products: usize,
    pub redis_loaded: bool,
    /// Every difference found.
    pub drift: Vec<Drift>,
    /// The differences repaired: `stock:{p}` was `redis` and is now `postgres`.
    pub repaired: Vec<Drift>,
    /// Guarantee 1 broken in PostgreSQL (negatives, conservation); never repaired here.
    pub violations: Vec<Violation>,
    /// Limits or customers' counts that differ between the stores; repaired by the same
    /// rebuild as stock.
    pub limits: Vec<crate::limits::LimitDrift>,
    /// Whether the limit differences were repaired (by a rebuild).
    pub limits_repaired: bool,
    /// Redis settings under which a restart loses decisions
    /// ([`RedisStore::persistence_risks`]); a danger fails the check, never repaired here.
    pub redis_risks: Vec<Risk>,
}

impl DriftReport {
    /// Nothing left to fix: loaded, every difference repaired, no violation, no Redis
    /// setting that loses decisions on a restart.
    pub fn clean(&self) -> bool {
        self.redis_loaded
            && self.drift.len() == self.repaired.len()
            && self.violations.is_empty()
            && (self.limits.is_empty() || self.limits_repaired)
            && !self
                .redis_risks
                .iter()
                .any(|r| matches!(r, Risk::Danger(_)))
    }
}

/// The drift check (pipeline idle): compares `stock:{p}` with `available` for every
/// product and, with `repair` and any difference, rebuilds Redis from PostgreSQL (the
/// truth) with `crate::rebuild::rebuild`. A repair key by key would race what is in
/// flight (an expiry's give-back committed in PostgreSQL and not yet in Redis would be
/// counted twice); the rebuild fences everything in flight by its generation. A key that
/// holds something other than an integer is a difference like any other. Conservation and
/// negative columns are reported, never touched.
pub async fn check_drift(
    pool: &PgPool,
    store: &RedisStore,
    repair: bool,
) -> Result<DriftReport, AdminError> {
    let rows = stock_rows(pool, &[]).await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.product_id).collect();
    let levels = redis_levels(store, &ids).await?;
    let redis_loaded = store.is_loaded().await?;
    let mut violations = Vec::new();
    let mut drift = Vec::new();
    for (r, level) in rows.iter().zip(levels) {
        row_violations(r, &mut violations);
        if level.value() != Some(r.available) {
            drift.push(Drift {
                product_id: r.product_id,
                redis: level.value(),
                postgres: r.available,
            });
        }
    }
    let limits = crate::limits::drift(pool, store).await?;
    let mut repaired = Vec::new();
    let mut redis_loaded = redis_loaded;
    let mut limits_repaired = false;
    if repair && (!drift.is_empty() || !limits.is_empty()) {
        crate::rebuild::rebuild(pool, store).await?;
        redis_loaded = true;
        repaired = drift.clone();
        limits_repaired = true;
    }
    Ok(DriftReport {
        products: rows.len(),
        redis_loaded,
        drift,
        repaired,
        violations,
        limits,
        limits_repaired,
        redis_risks: store.persistence_risks().await?,
    })
}
