//! Per-customer limits (contract "Per-customer limits", DESIGN.md): the operator's change,
//! what `stockctl show` tells of a product's limit, and the drift check of the customers'
//! counts.
//!
//! A change goes to PostgreSQL first ([`pg_store::set_limit`], once per request id, under
//! the product's row lock) and to Redis second. A changed or removed limit is applied in
//! place ([`RedisStore::set_limit`], in the generation of the PostgreSQL change, only if
//! newer than what Redis holds). A product that had no limit gets one by a load
//! ([`crate::rebuild::rebuild`]): the load brings every customer's count with it, and
//! fences what is in flight by its generation, which an in-place write could not (a
//! reservation taken before the limit reached Redis would never be counted there).

use crate::admin::{AdminError, Step};
use sqlx::PgPool;
use stock_common::pg_store::{self, ProductLimit};
use stock_common::redis_store::{Buyers, LimitOutcome, RedisStore};

/// The outcome of `stockctl limit`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LimitChange {
    pub request_id: String,
    pub product_id: i64,
    /// The limit before the change (None: none).
    pub previous: Option<i64>,
    /// The limit now (None: removed).
    pub per_customer: Option<i64>,
    pub postgres: Step,
    pub redis: Step,
}

/// Sets (`Some(n)`, n >= 0) or removes (None) `product_id`'s per-customer limit: module
/// docs. A retry with the same `request_id` changes nothing more and finishes what an
/// interrupted attempt left undone.
pub async fn set_limit(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    per_customer: Option<i64>,
    request_id: &str,
) -> Result<LimitChange, AdminError> {
    crate::admin::validate_product(product_id)?;
    crate::admin::validate_request_id(request_id)?;
    if let Some(n) = per_customer.filter(|n| *n < 0) {
        return Err(AdminError::Invalid(format!(
            "--per-customer {n}: must be >= 0"
        )));
    }
    let c = pg_store::set_limit(pool, request_id, product_id, per_customer).await?;
    stock_common::failpoint!("limit.after_postgres");
    let postgres = if c.fresh {
        Step::Applied
    } else {
        Step::Already
    };
    let redis = to_redis(pool, store, product_id, &c).await?;
    Ok(LimitChange {
        request_id: request_id.to_owned(),
        product_id,
        previous: c.previous,
        per_customer: c.per_customer,
        postgres,
        redis,
    })
}

/// The Redis half of a change PostgreSQL committed: in place in the change's generation;
/// a new limit by a load. A load of that very generation under way is waited for (up to
/// [`crate::admin::LOAD_WAIT`]): its snapshot came before the commit, so it lacks the
/// change. Otherwise an unloaded Redis gets it from the next rebuild's snapshot.
async fn to_redis(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    c: &pg_store::LimitChange,
) -> Result<Step, AdminError> {
    let deadline = tokio::time::Instant::now() + crate::admin::LOAD_WAIT;
    let mut last_try = false;
    loop {
        return Ok(
            match store
                .set_limit(product_id, c.per_customer, c.version, Some(c.gen))
                .await?
            {
                LimitOutcome::Applied => Step::Applied,
                LimitOutcome::Already => Step::Already,
                LimitOutcome::Stale => Step::Loaded,
                LimitOutcome::Unloaded if !last_try && tokio::time::Instant::now() < deadline => {
                    if crate::rebuild::loading(pool, c.gen).await? {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    } else {
                        last_try = true;
                    }
                    continue;
                }
                LimitOutcome::Unloaded => Step::Unloaded,
                LimitOutcome::Absent => {
                    // A new limit: Redis gets it, with every count, by a load.
                    crate::rebuild::rebuild(pool, store).await?;
                    Step::Loaded
                }
            },
        );
    }
}

/// A product's limit as `stockctl show` tells it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LimitReport {
    /// PostgreSQL's limit (None: no limit).
    pub per_customer: Option<i64>,
    /// Redis' limit (None: no limit there).
    pub redis: Option<i64>,
    /// Customers holding units, from PostgreSQL.
    pub customers: i64,
    /// The customers holding the most units (nearest the limit), most first.
    pub nearest: Vec<(String, i64)>,
}

/// `product_id`'s limit in both stores and the `list` customers nearest it.
pub async fn report(
    pool: &PgPool,
    store: &RedisStore,
    product_id: i64,
    list: i64,
) -> Result<LimitReport, AdminError> {
    let per_customer = pg_store::product_limit(pool, product_id)
        .await?
        .map(|(n, _)| n);
    let redis = store.buyers(product_id).await?.map(|b| b.per_customer);
    let customers = pg_store::customers_holding(pool, product_id).await?;
    let nearest = pg_store::top_customers(pool, product_id, list.max(0)).await?;
    Ok(LimitReport {
        per_customer,
        redis,
        customers,
        nearest,
    })
}

/// A product whose limit or customers' counts differ between the stores.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LimitDrift {
    pub product_id: i64,
    /// What differs, for the operator.
    pub what: String,
}

/// The drift check of limits (pipeline idle): every limited product's limit and counts in
/// PostgreSQL against its buyers hash in Redis, and every buyers hash of a product without
/// a limit in PostgreSQL.
pub async fn drift(pool: &PgPool, store: &RedisStore) -> Result<Vec<LimitDrift>, AdminError> {
    let limits = pg_store::all_limits(pool).await?;
    let mut out = Vec::new();
    let mut limited = std::collections::BTreeSet::new();
    for l in &limits {
        limited.insert(l.product_id);
        let redis = store.buyers(l.product_id).await?;
        if let Some(what) = differs(l, redis.as_ref()) {
            out.push(LimitDrift {
                product_id: l.product_id,
                what,
            });
        }
    }
    for p in store.limited_products().await? {
        if !limited.contains(&p) {
            out.push(LimitDrift {
                product_id: p,
                what: "a limit in Redis, none in PostgreSQL".into(),
            });
        }
    }
    Ok(out)
}

/// How Redis' `redis` differs from PostgreSQL's `pg`, if it does.
fn differs(pg: &ProductLimit, redis: Option<&Buyers>) -> Option<String> {
    let Some(r) = redis else {
        return Some(format!(
            "limit {} in PostgreSQL, none in Redis",
            pg.per_customer
        ));
    };
    if r.per_customer != pg.per_customer {
        return Some(format!(
            "limit {} in PostgreSQL, {} in Redis",
            pg.per_customer, r.per_customer
        ));
    }
    let mut want = pg.units.clone();
    want.sort();
    if r.units != want {
        let pg_map: std::collections::BTreeMap<&str, i64> =
            want.iter().map(|(c, n)| (c.as_str(), *n)).collect();
        let redis_map: std::collections::BTreeMap<&str, i64> =
            r.units.iter().map(|(c, n)| (c.as_str(), *n)).collect();
        let mut keys: Vec<&str> = pg_map.keys().chain(redis_map.keys()).copied().collect();
        keys.sort_unstable();
        keys.dedup();
        let diffs: Vec<String> = keys
            .iter()
            .filter(|k| pg_map.get(*k) != redis_map.get(*k))
            .take(5)
            .map(|k| {
                format!(
                    "{k}: {} in PostgreSQL, {} in Redis",
                    pg_map.get(k).copied().unwrap_or(0),
                    redis_map.get(k).copied().unwrap_or(0)
                )
            })
            .collect();
        return Some(format!("customers' counts differ ({})", diffs.join("; ")));
    }
    None
}
