//! The survey's Redis strategies (§3.1, §3.2, §7.1) in the run's own Redis database, keys
//! `survey:…`; no database behind them. Each script is a file of `lua/`, run through
//! `redis::Script` (EVALSHA, loaded again on NOSCRIPT).
//!
//! * `redis-lua` (§3.1 `RedisStockService`): per item the single-key script `deduct.lua`
//!   (GET, compare, SET) on `survey:stock:{p}`; when an item is short, the items already
//!   taken are given back with `INCRBY` and the order is refused. Two changes to the
//!   survey's text, both flaws of it: the 1-hour `EXPIRE` on stock keys is dropped (stock
//!   must not vanish), and the script returns -2 when short. The survey's script returns
//!   the current stock then, which its Java caller cannot tell from a success (it treats
//!   -1 as missing, other negatives as short and everything else as deducted), so as
//!   printed it grants every order once stock is short without taking anything.
//! * `redis-lock` (§3.2 `RedisDistributedLockStockService`): per product, in id order,
//!   `SET survey:lock:{p} <uuid> NX EX 10` (`lock.lua`); then per item GET, compare, SET of
//!   `survey:stock:{p}` (all items checked before any is written); then the compare-and-
//!   delete release (`unlock.lua`) of every lock tried, as the survey's `finally` does.
//!   Faithfully, a lock held by another order fails the order at once (the survey returns
//!   "获取锁失败，请稍后重试" and does not retry): those orders are refused although stock
//!   was there, and count as wrongly refused. That is the finding, not a bug.
//! * `redis-sharded` (§7.1 `ShardedStockService`): each product's stock split evenly over
//!   `--shards` keys `survey:shard:{p}:{i}`. Per item, the plan reads shard 0, 1, … with
//!   one GET each (not atomic) until it has found the quantity, taking from each shard what
//!   it holds; no plan (not enough seen) refuses. Each planned part is then taken with the
//!   survey's per-shard script (`shard_deduct.lua`); when one fails, the parts already
//!   taken (of this order's earlier items too) are given back with `INCRBY` and the order
//!   is refused.
//!
//! Redis errors are not retried: none is expected, and one stops the run.

use crate::driver::Client;
use crate::load::Order;
use anyhow::{bail, Context, Result};
use redis::aio::MultiplexedConnection;
use redis::Script;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use stock_common::events::Item;

static DEDUCT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/deduct.lua")));
static LOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/lock.lua")));
static UNLOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/unlock.lua")));
static SHARD_DEDUCT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/shard_deduct.lua")));

/// The survey's `LOCK_EXPIRE_TIME`, seconds.
pub const LOCK_EXPIRE_SECS: u64 = 10;
/// Keys per MGET/MSET.
const CHUNK: usize = 1000;

/// A Redis strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kv {
    Lua,
    Lock,
    /// Stock split over this many shards per product.
    Sharded(usize),
}

pub fn stock_key(product: i64) -> String {
    format!("survey:stock:{product}")
}

pub fn lock_key(product: i64) -> String {
    format!("survey:lock:{product}")
}

pub fn shard_key(product: i64, shard: usize) -> String {
    format!("survey:shard:{product}:{shard}")
}

/// `units` split over `shards`: the first `units % shards` shards hold one more.
pub fn split(units: i64, shards: usize) -> Vec<i64> {
    let n = shards.max(1) as i64;
    (0..n)
        .map(|i| units / n + i64::from(i < units % n))
        .collect()
}

/// Loads `stock` into the (flushed) database for `kind`.
pub async fn load(
    conn: &mut MultiplexedConnection,
    kind: Kv,
    stock: &BTreeMap<i64, i64>,
) -> Result<()> {
    let pairs: Vec<(String, i64)> = match kind {
        Kv::Lua | Kv::Lock => stock.iter().map(|(p, n)| (stock_key(*p), *n)).collect(),
        Kv::Sharded(shards) => stock
            .iter()
            .flat_map(|(p, n)| {
                split(*n, shards)
                    .into_iter()
                    .enumerate()
                    .map(|(i, units)| (shard_key(*p, i), units))
            })
            .collect(),
    };
    for chunk in pairs.chunks(CHUNK) {
        let mut cmd = redis::cmd("MSET");
        for (k, v) in chunk {
            cmd.arg(k).arg(v);
        }
        cmd.query_async::<()>(conn)
            .await
            .context("loading survey stock into Redis")?;
    }
    Ok(())
}

/// Every product's stock at the end (the sum of its shards for `Sharded`); None where no
/// key of it exists.
pub async fn levels(
    conn: &mut MultiplexedConnection,
    kind: Kv,
    products: &[i64],
) -> Result<BTreeMap<i64, Option<i64>>> {
    let keys: Vec<(i64, String)> = match kind {
        Kv::Lua | Kv::Lock => products.iter().map(|p| (*p, stock_key(*p))).collect(),
        Kv::Sharded(shards) => products
            .iter()
            .flat_map(|p| (0..shards).map(move |i| (*p, shard_key(*p, i))))
            .collect(),
    };
    let mut out: BTreeMap<i64, Option<i64>> = products.iter().map(|p| (*p, None)).collect();
    for chunk in keys.chunks(CHUNK) {
        let names: Vec<&str> = chunk.iter().map(|(_, k)| k.as_str()).collect();
        let values: Vec<Option<i64>> = redis::cmd("MGET")
            .arg(&names)
            .query_async(conn)
            .await
            .context("reading survey stock from Redis")?;
        for ((p, _), v) in chunk.iter().zip(values) {
            if let Some(v) = v {
                let slot = out.entry(*p).or_default();
                *slot = Some(slot.unwrap_or(0) + v);
            }
        }
    }
    Ok(out)
}

/// One task: its own connection and the strategy.
pub struct KvClient {
    conn: MultiplexedConnection,
    kind: Kv,
}

impl KvClient {
    /// `n` clients, each with a connection of its own to `url`.
    pub async fn connect(url: &str, kind: Kv, n: usize) -> Result<Vec<KvClient>> {
        let client = redis::Client::open(url).context("Redis URL")?;
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = stock_common::redis_store::raw_connection(&client)
                .await
                .context("connecting to the survey's Redis database")?;
            clients.push(KvClient { conn, kind });
        }
        Ok(clients)
    }
}

impl Client for KvClient {
    type Order = Order;

    async fn place(&mut self, order: &Order) -> Result<bool> {
        let conn = &mut self.conn;
        match self.kind {
            Kv::Lua => lua(conn, &order.items).await,
            Kv::Lock => locked(conn, &order.items).await,
            Kv::Sharded(shards) => sharded(conn, &order.items, shards).await,
        }
    }
}

async fn lua(conn: &mut MultiplexedConnection, items: &[Item]) -> Result<bool> {
    let mut taken: Vec<(String, i64)> = Vec::with_capacity(items.len());
    for it in items {
        let key = stock_key(it.product_id);
        let left: i64 = DEDUCT
            .key(&key)
            .arg(it.quantity)
            .invoke_async(conn)
            .await
            .context("deduct.lua")?;
        match left {
            -1 => bail!(
                "no stock key for product {} (库存数据不存在)",
                it.product_id
            ),
            -2 => {
                give_back(conn, &taken).await?;
                return Ok(false);
            }
            _ => taken.push((key, it.quantity)),
        }
    }
    Ok(true)
}

async fn locked(conn: &mut MultiplexedConnection, items: &[Item]) -> Result<bool> {
    let token = uuid::Uuid::new_v4().to_string();
    let mut tried: Vec<String> = Vec::with_capacity(items.len());
    let outcome = locked_deduct(conn, items, &token, &mut tried).await;
    for key in &tried {
        let _: i64 = UNLOCK
            .key(key)
            .arg(&token)
            .invoke_async(conn)
            .await
            .context("unlock.lua")?;
    }
    outcome
}

/// Takes the locks (recording each key tried in `tried`), then the stock.
async fn locked_deduct(
    conn: &mut MultiplexedConnection,
    items: &[Item],
    token: &str,
    tried: &mut Vec<String>,
) -> Result<bool> {
    for it in items {
        let key = lock_key(it.product_id);
        let acquired: i64 = LOCK
            .key(&key)
            .arg(token)
            .arg(LOCK_EXPIRE_SECS)
            .invoke_async(conn)
            .await
            .context("lock.lua")?;
        tried.push(key);
        if acquired != 1 {
            return Ok(false); // 获取锁失败，请稍后重试
        }
    }
    let mut new_levels = Vec::with_capacity(items.len());
    for it in items {
        let key = stock_key(it.product_id);
        let current: Option<i64> = redis::cmd("GET")
            .arg(&key)
            .query_async(conn)
            .await
            .context("GET stock")?;
        let Some(current) = current else {
            bail!(
                "no stock key for product {} (库存数据不存在)",
                it.product_id
            );
        };
        if current < it.quantity {
            return Ok(false);
        }
        new_levels.push((key, current - it.quantity));
    }
    for (key, level) in new_levels {
        redis::cmd("SET")
            .arg(&key)
            .arg(level)
            .query_async::<()>(conn)
            .await
            .context("SET stock")?;
    }
    Ok(true)
}

async fn sharded(conn: &mut MultiplexedConnection, items: &[Item], shards: usize) -> Result<bool> {
    let mut executed: Vec<(String, i64)> = Vec::new();
    for it in items {
        let Some(plan) = plan(conn, it, shards).await? else {
            give_back(conn, &executed).await?;
            return Ok(false);
        };
        for (key, units) in plan {
            let ok: i64 = SHARD_DEDUCT
                .key(&key)
                .arg(units)
                .invoke_async(conn)
                .await
                .context("shard_deduct.lua")?;
            if ok != 1 {
                give_back(conn, &executed).await?;
                return Ok(false);
            }
            executed.push((key, units));
        }
    }
    Ok(true)
}

/// The survey's `calculateDeductPlan`: (shard key, units) to take, or None when the shards
/// read hold too little.
async fn plan(
    conn: &mut MultiplexedConnection,
    it: &Item,
    shards: usize,
) -> Result<Option<Vec<(String, i64)>>> {
    let mut plan = Vec::new();
    let mut remaining = it.quantity;
    for i in 0..shards {
        if remaining <= 0 {
            break;
        }
        let key = shard_key(it.product_id, i);
        let held: Option<i64> = redis::cmd("GET")
            .arg(&key)
            .query_async(conn)
            .await
            .context("GET shard")?;
        let held = held.unwrap_or(0);
        if held > 0 {
            let take = held.min(remaining);
            plan.push((key, take));
            remaining -= take;
        }
    }
    Ok((remaining <= 0).then_some(plan))
}

/// `INCRBY` of every (key, units) taken: the survey's rollback.
async fn give_back(conn: &mut MultiplexedConnection, taken: &[(String, i64)]) -> Result<()> {
    for (key, units) in taken {
        redis::cmd("INCRBY")
            .arg(key)
            .arg(*units)
            .query_async::<()>(conn)
            .await
            .context("INCRBY (giving stock back)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_unit() {
        assert_eq!(split(23, 10), vec![3, 3, 3, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(split(3, 5), vec![1, 1, 1, 0, 0]);
        assert_eq!(split(7, 1), vec![7]);
        assert_eq!(split(0, 3), vec![0, 0, 0]);
    }
}
