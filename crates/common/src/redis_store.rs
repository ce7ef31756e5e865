//! Everything the pipeline keeps in Redis, and the only code that writes it.
//!
//! Keys:
//! * `stock:{<product_id>}` (contract): stock the producer may still pre-deduct.
//! * `stockpipe:order:<order_id>`: the producer's memory of an order, an [`OrderRecord`],
//!   kept for `--order-memory` (longer than the `orders` topic's retention).
//! * `stockpipe:request:<request_id>`: an operator's restock or set already applied here.
//! * `stockpipe:loaded`: present once stock has been loaded from PostgreSQL. If Redis comes
//!   back empty the marker is gone, and both scripts refuse to act until a rebuild.
//!
//! The scripts (`lua/reserve.lua`, `lua/restore.lua`) pass every key in KEYS. They are
//! sent with EVALSHA in one pipeline per batch, preceded by SCRIPT LOAD so a Redis that
//! restarted and forgot them never answers NOSCRIPT. Every script is idempotent by order
//! id, so a whole pipeline can be re-run after a connection error.

use crate::config::RedisArgs;
use crate::events::{decode_items, encode_items, Item, Reason};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use std::sync::LazyLock;

/// Most scripts sent in one pipelined round trip.
pub const PIPELINE_CHUNK: usize = 500;

/// Marker key whose absence means "Redis is not loaded".
pub const LOADED_KEY: &str = "stockpipe:loaded";

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/reserve.lua")));
static RESTORE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/restore.lua")));
static ADJUST: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/adjust.lua")));

/// `stock:{42}` (contract).
pub fn stock_key(product_id: i64) -> String {
    format!("stock:{{{product_id}}}")
}

/// The marker of an operator's stock request applied to Redis.
pub fn request_key(request_id: &str) -> String {
    format!("stockpipe:request:{request_id}")
}

/// The key of the producer's record of one order.
pub fn order_key(order_id: &str) -> String {
    format!("stockpipe:order:{order_id}")
}

/// What Redis remembers of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderRecord {
    /// Pre-deducted here; the stock is held until PostgreSQL refuses it or the reservation
    /// ends (`R|<items>`).
    Held(Vec<Item>),
    /// Pre-deducted, then given back (`C|<items>`).
    Returned(Vec<Item>),
    /// Refused here; never reached PostgreSQL (`X|<reason>|<product_id>`).
    Refused {
        reason: Reason,
        product_id: Option<i64>,
    },
}

impl OrderRecord {
    pub fn encode(&self) -> String {
        match self {
            OrderRecord::Held(items) => format!("R|{}", encode_items(items)),
            OrderRecord::Returned(items) => format!("C|{}", encode_items(items)),
            OrderRecord::Refused { reason, product_id } => {
                format!(
                    "X|{}|{}",
                    reason,
                    product_id.map(|p| p.to_string()).unwrap_or_default()
                )
            }
        }
    }

    pub fn decode(s: &str) -> Option<OrderRecord> {
        let (tag, rest) = s.split_once('|')?;
        match tag {
            "R" => Some(OrderRecord::Held(decode_items(rest)?)),
            "C" => Some(OrderRecord::Returned(decode_items(rest)?)),
            "X" => {
                let (reason, pid) = rest.split_once('|')?;
                Some(OrderRecord::Refused {
                    reason: Reason::parse(reason)?,
                    product_id: if pid.is_empty() {
                        None
                    } else {
                        Some(pid.parse().ok()?)
                    },
                })
            }
            _ => None,
        }
    }
}

/// One `order_created` to decide. `forced` is a refusal decided without looking at stock
/// (an invalid order), recorded so that the order id keeps that one outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub order_id: String,
    pub items: Vec<Item>,
    pub forced: Option<Reason>,
}

/// What the reserve script said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Decided now (`fresh`) or earlier; the record is the order's one decision.
    Decided { record: OrderRecord, fresh: bool },
    /// Redis is not loaded: nothing was done.
    Unloaded,
    /// A stock key holds something that is not an integer: nothing was done.
    Corrupt(String),
}

/// What the adjust script said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdjustOutcome {
    Applied,
    Already,
    Unloaded,
    /// Taking would leave the key below zero: nothing done.
    Short,
}

/// What the restore script said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreOutcome {
    Restored,
    Already,
    Unloaded,
    Unknown,
    NotHeld,
    Mismatch,
}

/// Errors of the Redis layer. All are transient for the worker loop (connection trouble,
/// a restarting server): it retries the whole batch, which the scripts make idempotent.
/// `Protocol` (a reply of the wrong shape) means a script and this code disagree: a bug.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from a stock script: {0}")]
    Protocol(String),
}

/// The multiplexed, self-reconnecting connection, cloned into every task.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    record_ttl_secs: u64,
}

impl RedisStore {
    pub async fn connect(args: &RedisArgs) -> Result<Self, StoreError> {
        let client = redis::Client::open(args.url.expose())?;
        // A pipeline of scripts on a busy server can take far longer than the client's
        // default reply timeout of 500 ms; waiting is right, a timeout only causes a retry.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(10)))
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)));
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(RedisStore {
            conn,
            record_ttl_secs: args.order_memory.as_secs().max(1),
        })
    }

    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs the reserve script for every request, in order, pipelined in round trips of
    /// at most [`PIPELINE_CHUNK`] scripts.
    pub async fn reserve_many(
        &self,
        reqs: &[ReserveRequest],
    ) -> Result<Vec<ReserveOutcome>, StoreError> {
        let mut out = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(PIPELINE_CHUNK) {
            out.extend(self.reserve_chunk(chunk).await?);
        }
        Ok(out)
    }

    async fn reserve_chunk(
        &self,
        reqs: &[ReserveRequest],
    ) -> Result<Vec<ReserveOutcome>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&RESERVE).ignore();
        for r in reqs {
            let mut inv = RESERVE.key(LOADED_KEY);
            inv.key(order_key(&r.order_id));
            for it in &r.items {
                inv.key(stock_key(it.product_id));
            }
            inv.arg(self.record_ttl_secs).arg(encode_items(&r.items));
            inv.arg(match r.forced {
                Some(reason) => OrderRecord::Refused {
                    reason,
                    product_id: None,
                }
                .encode(),
                None => String::new(),
            });
            for it in &r.items {
                inv.arg(it.quantity);
            }
            for it in &r.items {
                inv.arg(it.product_id);
            }
            pipe.invoke_script(&inv);
        }
        let replies: Vec<(String, String)> = pipe.query_async(&mut self.conn.clone()).await?;
        replies
            .into_iter()
            .map(|(kind, rec)| match kind.as_str() {
                "unloaded" => Ok(ReserveOutcome::Unloaded),
                "corrupt" => Ok(ReserveOutcome::Corrupt(rec)),
                "new" | "seen" => OrderRecord::decode(&rec)
                    .map(|record| ReserveOutcome::Decided {
                        record,
                        fresh: kind == "new",
                    })
                    .ok_or_else(|| StoreError::Protocol(format!("bad order record {rec:?}"))),
                other => Err(StoreError::Protocol(format!("reserve said {other:?}"))),
            })
            .collect()
    }

    /// Runs the restore script for each `(order_id, items)`, in order, pipelined in round
    /// trips of at most [`PIPELINE_CHUNK`] scripts.
    pub async fn restore_many(
        &self,
        reqs: &[(String, Vec<Item>)],
    ) -> Result<Vec<RestoreOutcome>, StoreError> {
        let mut out = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(PIPELINE_CHUNK) {
            out.extend(self.restore_chunk(chunk).await?);
        }
        Ok(out)
    }

    async fn restore_chunk(
        &self,
        reqs: &[(String, Vec<Item>)],
    ) -> Result<Vec<RestoreOutcome>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&RESTORE).ignore();
        for (order_id, items) in reqs {
            let mut inv = RESTORE.key(LOADED_KEY);
            inv.key(order_key(order_id));
            for it in items {
                inv.key(stock_key(it.product_id));
            }
            inv.arg(encode_items(items));
            for it in items {
                inv.arg(it.quantity);
            }
            pipe.invoke_script(&inv);
        }
        let replies: Vec<String> = pipe.query_async(&mut self.conn.clone()).await?;
        replies
            .into_iter()
            .map(|r| {
                Ok(match r.as_str() {
                    "restored" => RestoreOutcome::Restored,
                    "already" => RestoreOutcome::Already,
                    "unloaded" => RestoreOutcome::Unloaded,
                    "unknown" => RestoreOutcome::Unknown,
                    "not_held" => RestoreOutcome::NotHeld,
                    "mismatch" => RestoreOutcome::Mismatch,
                    other => return Err(StoreError::Protocol(format!("restore said {other:?}"))),
                })
            })
            .collect()
    }

    /// Adds `delta` (negative: takes) to `stock:{product_id}` once per `request_id`.
    pub async fn adjust(
        &self,
        product_id: i64,
        delta: i64,
        request_id: &str,
    ) -> Result<AdjustOutcome, StoreError> {
        let reply: String = ADJUST
            .key(LOADED_KEY)
            .key(stock_key(product_id))
            .key(request_key(request_id))
            .arg(delta)
            .arg(self.record_ttl_secs)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match reply.as_str() {
            "applied" => AdjustOutcome::Applied,
            "already" => AdjustOutcome::Already,
            "unloaded" => AdjustOutcome::Unloaded,
            "short" => AdjustOutcome::Short,
            other => return Err(StoreError::Protocol(format!("adjust said {other:?}"))),
        })
    }

    /// Whether stock has been loaded (the marker exists).
    pub async fn is_loaded(&self) -> Result<bool, StoreError> {
        Ok(self.conn.clone().exists(LOADED_KEY).await?)
    }

    /// `stock:{p}` for each product (None where the key is missing).
    pub async fn stock_levels(&self, products: &[i64]) -> Result<Vec<Option<i64>>, StoreError> {
        if products.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = products.iter().map(|p| stock_key(*p)).collect();
        Ok(self.conn.clone().mget(keys).await?)
    }

    /// The producer's record of an order, if it has one.
    pub async fn order_record(&self, order_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let raw: Option<String> = self.conn.clone().get(order_key(order_id)).await?;
        Ok(raw.as_deref().and_then(OrderRecord::decode))
    }

    /// The lifetime given to order records, in seconds.
    pub fn record_ttl_secs(&self) -> u64 {
        self.record_ttl_secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_codec_round_trips() {
        let items = vec![
            Item {
                product_id: 42,
                quantity: 2,
            },
            Item {
                product_id: 7,
                quantity: 1,
            },
        ];
        for rec in [
            OrderRecord::Held(items.clone()),
            OrderRecord::Returned(items),
            OrderRecord::Refused {
                reason: Reason::InsufficientStock,
                product_id: Some(42),
            },
            OrderRecord::Refused {
                reason: Reason::InvalidOrder,
                product_id: None,
            },
        ] {
            assert_eq!(OrderRecord::decode(&rec.encode()), Some(rec));
        }
        assert_eq!(
            OrderRecord::Held(vec![Item {
                product_id: 42,
                quantity: 2
            }])
            .encode(),
            "R|42:2"
        );
        assert_eq!(OrderRecord::decode("Z|1"), None);
    }

    #[test]
    fn keys_follow_the_contract() {
        assert_eq!(stock_key(42), "stock:{42}");
    }
}
