//! Everything the pipeline keeps in Redis, and the only code that writes it.
//!
//! Keys:
//! * `stock:{<product_id>}` (contract): stock the producer may still pre-deduct.
//! * `stockpipe:rec:…`: the producer's memory of each order, an [`OrderRecord`], kept for
//!   `--order-memory` (up to half as long again): a field, keyed by order id, of a small
//!   hash bucketed by time window and id (`lua/record.lua`, the one home of that layout;
//!   a few bytes beyond the id and the record). A forgotten order is still decided once:
//!   PostgreSQL's ledger is the permanent judge, and gives a second pre-deduction back by
//!   its token.
//! * `stockpipe:request:<request_id>`: an operator's restock or set already applied here
//!   (`<product>:<delta>`); `stockpipe:request:<request_id>:undo` when a decrease was
//!   given back because PostgreSQL refused it.
//! * `stockpipe:loaded`: present once stock has been loaded from PostgreSQL; its value is
//!   the Redis generation, which PostgreSQL's `redis_generation` advanced for that load.
//!   If Redis comes back empty the marker is gone, and the scripts refuse to act until a
//!   rebuild.
//! * `stockpipe:epoch`: changed with every write that can add stock; with the loaded
//!   marker's value it guards the producer's sold-out marker ([`SoldOutMarker`]).
//! * `stockpipe:seq`: the sequence that names pre-deductions (tokens `<gen>.<seq>`).
//!
//! This module is the only code that writes Redis, and the only one that names a key: the
//! workers' scripts, the operators' changes ([`RedisStore::adjust`],
//! [`RedisStore::undo_adjust`], [`RedisStore::forget_request`]) and loads
//! ([`RedisStore::stop_selling`], [`RedisStore::load_generation`]).
//!
//! The scripts (`lua/reserve.lua`, `lua/restore.lua`, `lua/adjust.lua`) pass every key in
//! KEYS, except the record buckets, which `lua/record.lua` derives from the declared
//! record base (same hash slot). They are sent with EVALSHA only, in one pipeline per
//! batch: a Redis that does not hold a script (restarted, flushed, a replica promoted since)
//! answers NOSCRIPT, and the pipeline runs again once the script is loaded ([`Lua::query`]).
//! Sending the source with every pipeline (SCRIPT LOAD, about 20 KB for the reserve script)
//! cost Redis a SHA-1 of it per round trip. The reserve script decides a run of orders per
//! call (the per-call cost dominated: 30 µs per single-order call). Every script is
//! idempotent by order id, so a whole pipeline can be re-run after a connection error.
//!
//! # Redis Cluster
//! With `--redis-cluster-nodes`, the same keys live on a cluster ([`slots`]). The loaded
//! marker, epoch and sequence are kept per hash slot (`stockpipe:loaded:{<tag>}`, one tag
//! per slot), so a slot that lost its data stops only the orders that touch it. Every
//! script call and every pipeline stays within one slot. An order whose record and stock
//! keys share a slot is decided by `lua/reserve.lua` as on one Redis; any other order by the
//! cross-slot protocol of [`cross_slot`] (claim in the record's slot, hold in each stock
//! slot, decide in the record's slot, release on refusal), described in DESIGN.md.

mod cross_slot;
pub mod slots;

use crate::config::{ConfigError, RedisArgs, TlsFiles};
use crate::events::{decode_items, encode_items, Compensation, Item, Reason};
use crate::pg_store::{HeldOrder, ProductLimit};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use slots::Shard;
use std::collections::BTreeSet;
use std::sync::LazyLock;

/// The longest a producer waits for a cluster master's replica to confirm a batch's writes.
pub const REPLICA_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Most scripts sent in one pipelined round trip.
pub const PIPELINE_CHUNK: usize = 500;

/// Orders per reserve round trip for a batch of `orders` over `lanes` connections: the
/// batch spread evenly over the lanes, in whole script calls of `per_call`, at most
/// [`PIPELINE_CHUNK`].
pub fn reserve_trip_size(orders: usize, lanes: usize, per_call: usize) -> usize {
    let per_call = per_call.max(1);
    let even = orders.div_ceil(lanes.max(1)).div_ceil(per_call) * per_call;
    even.clamp(1, PIPELINE_CHUNK.max(per_call))
}

/// Marker key whose absence means "Redis is not loaded".
pub const LOADED_KEY: &str = "stockpipe:loaded";

/// Counter changed, atomically, by every write that can add stock to a `stock:{id}` key
/// (restore, adjust, load, repair). With the loaded marker's value it forms the epoch that
/// guards sold-out refusals (`lua/reserve.lua`).
pub const EPOCH_KEY: &str = "stockpipe:epoch";

/// Counter that names pre-deductions: each token is `<generation>.<sequence>`.
pub const SEQ_KEY: &str = "stockpipe:seq";

/// A script's source from its parts (`lua/*.lua`), after `lua/prelude.lua`: the one way
/// every script here is put together.
pub(crate) fn lua_source(parts: &[&str]) -> String {
    let mut source = String::from(include_str!("lua/prelude.lua"));
    for part in parts {
        source.push_str(part);
    }
    source
}

/// The reserve script's source (for benchmarks that drive it with other clients).
pub static RESERVE_LUA: LazyLock<String> = LazyLock::new(|| {
    lua_source(&[
        include_str!("lua/marker.lua"),
        include_str!("lua/token.lua"),
        include_str!("lua/integer.lua"),
        include_str!("lua/buyers.lua"),
        include_str!("lua/record.lua"),
        include_str!("lua/reserve.lua"),
    ])
});

/// A script with its source, run by EVALSHA alone: a server that answers NOSCRIPT is
/// given the source then ([`Lua::query`]).
struct Lua {
    source: String,
    script: Script,
}

impl Lua {
    fn new(source: String) -> Lua {
        Lua {
            script: Script::new(&source),
            source,
        }
    }

    /// Loads the script behind `conn`: on a cluster, on every master (the client sends
    /// SCRIPT LOAD to all of them).
    async fn load(&self, conn: &mut RedisConn) -> Result<(), StoreError> {
        let _: redis::Value = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(&self.source)
            .query_async(conn)
            .await?;
        Ok(())
    }

    /// Runs `run`, calls of this script only (one pipeline, or one per slot). A server
    /// that does not hold the script ran none of its calls and answers NOSCRIPT: the script
    /// is loaded through `conn` and `run` runs again, once (a call that ran meanwhile, after
    /// a SCRIPT FLUSH between two of them, runs again harmlessly: every script is
    /// idempotent by order id).
    async fn run_loaded<T, F, Fut>(&self, mut conn: RedisConn, run: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        match run().await {
            Err(StoreError::Redis(e)) if e.code() == Some("NOSCRIPT") => {
                self.load(&mut conn).await?;
                run().await
            }
            other => other,
        }
    }

    /// Runs `pipe`, calls of this script only, loading the script if need be
    /// ([`Lua::run_loaded`]).
    async fn query<T: redis::FromRedisValue>(
        &self,
        conn: RedisConn,
        pipe: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        self.run_loaded(conn.clone(), || {
            let mut conn = conn.clone();
            async move { Ok(pipe.query_async(&mut conn).await?) }
        })
        .await
    }
}

impl std::ops::Deref for Lua {
    type Target = Script;
    fn deref(&self) -> &Script {
        &self.script
    }
}

static RESERVE: LazyLock<Lua> = LazyLock::new(|| Lua::new(RESERVE_LUA.clone()));
/// Reads one order's record with its slot's loaded marker.
static REC_GET: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(lua_source(&[
        include_str!("lua/record.lua"),
        include_str!("lua/rec_get.lua"),
    ]))
});
/// Writes the records of a load.
static REC_PUT: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(lua_source(&[
        include_str!("lua/record.lua"),
        include_str!("lua/rec_put.lua"),
    ]))
});
static RESTORE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(lua_source(&[
        include_str!("lua/marker.lua"),
        include_str!("lua/buyers.lua"),
        include_str!("lua/record.lua"),
        include_str!("lua/restore.lua"),
    ]))
});
static NAME_IN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&lua_source(&[
        include_str!("lua/marker.lua"),
        include_str!("lua/name_in.lua"),
    ]))
});
static ADJUST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&lua_source(&[
        include_str!("lua/marker.lua"),
        include_str!("lua/adjust.lua"),
    ]))
});
static LIMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&lua_source(&[
        include_str!("lua/marker.lua"),
        include_str!("lua/limit.lua"),
    ]))
});

/// `stock:{42}` (contract). `lua/reserve.lua` reads a product's id back from it
/// (`product_of`) to name it in a refusal.
pub fn stock_key(product_id: i64) -> String {
    format!("stock:{{{product_id}}}")
}

/// `stockpipe:buyers:{42}`: product 42's per-customer limit and the units each customer
/// holds of it (DESIGN.md "Per-customer limits"), in the product's hash slot. The hash
/// exists only while the product has a limit: fields [`LIMIT_FIELD`], [`VERSION_FIELD`],
/// and one per customer holding units (removed at 0).
pub fn buyers_key(product_id: i64) -> String {
    format!("stockpipe:buyers:{{{product_id}}}")
}

/// The field of a buyers hash that holds the limit ('#' is in no customer id).
pub const LIMIT_FIELD: &str = "#limit";
/// The field of a buyers hash that holds the version of the change that set the limit.
pub const VERSION_FIELD: &str = "#version";

/// The marker of an operator's stock request applied to Redis (on one Redis).
pub fn request_key(request_id: &str) -> String {
    format!("stockpipe:request:{request_id}")
}

/// Key patterns a load drops (with every slot's on a cluster).
const FORGOTTEN_ON_LOAD: [&str; 4] = [
    "stockpipe:rec:*",
    "stockpipe:request:*",
    "stockpipe:hold:*",
    "stockpipe:buyers:*",
];

/// The request id under which an operator's change is undone in Redis.
fn undo_request_id(request_id: &str) -> String {
    format!("{request_id}:undo")
}

/// Whether a stored stock value is an integer as the scripts read one: an optional `-`
/// and 1 to 18 digits (see `lua/reserve.lua`).
pub fn is_stock_integer(raw: &str) -> bool {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    (1..=18).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// On a Redis Cluster, the order records live in this many hash slots (a bucket drawn from
/// the order id), not in one slot per order id: a batch's claims and decisions then share
/// script calls, as a batch's orders share them on one Redis.
pub const RECORD_BUCKETS: u16 = 256;

/// The base of the order records' keys on one Redis (`lua/record.lua`).
pub const RECORD_BASE: &str = "stockpipe:rec";

/// The field that holds an order's record in its bucket (`lua/record.lua`): the first 12
/// bytes of the SHA-256 of the order id. 14 bytes in a listpack whatever the id's length;
/// 96 bits, so that no two orders of a bucket (some 48, in each of up to three windows)
/// meet by chance, and a cryptographic hash, so that no id can be made to meet another.
pub fn record_field(order_id: &str) -> [u8; 12] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(order_id.as_bytes());
    let mut field = [0u8; 12];
    field.copy_from_slice(&digest[..12]);
    field
}

/// An order's record as read with its slot's loaded marker ([`RedisStore::read_record`]).
struct RecordRead {
    marker: Option<String>,
    record: Option<String>,
    /// When the record is forgotten (Unix seconds).
    expires: Option<i64>,
}

/// What Redis remembers of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderRecord {
    /// Pre-deducted here by the pre-deduction `token`; the stock is held until PostgreSQL
    /// refuses it or the reservation ends (`R|<token>|<items>`, or `R|<token>|<items>|
    /// <customer>` for an order with a customer: whose limit counts it gives back).
    Held {
        token: String,
        items: Vec<Item>,
        customer: Option<String>,
    },
    /// Pre-deducted, then given back (`C|<token>|<items>[|<customer>]`).
    Returned {
        token: String,
        items: Vec<Item>,
        customer: Option<String>,
    },
    /// Refused here; never reached PostgreSQL (`X|<reason>|<product_id>`). On a cluster,
    /// a refusal of an order across slots keeps its claim (`X|<reason>|<product_id>|<token>|
    /// <items>`), so that a redelivery can still give back what the claim held.
    Refused {
        reason: Reason,
        product_id: Option<i64>,
        claim: Option<Claim>,
    },
    /// Claimed by the cross-slot protocol, not decided yet (`P|<token>|<items>`; cluster
    /// only, never published).
    Pending(Claim),
}

/// A pre-deduction of an order across hash slots: its token and the items it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub token: String,
    pub items: Vec<Item>,
}

impl OrderRecord {
    pub fn encode(&self) -> String {
        match self {
            OrderRecord::Held {
                token,
                items,
                customer,
            } => held_record('R', token, items, customer.as_deref()),
            OrderRecord::Returned {
                token,
                items,
                customer,
            } => held_record('C', token, items, customer.as_deref()),
            OrderRecord::Refused {
                reason,
                product_id,
                claim,
            } => {
                let pid = product_id.map(|p| p.to_string()).unwrap_or_default();
                match claim {
                    None => format!("X|{reason}|{pid}"),
                    Some(c) => format!("X|{reason}|{pid}|{}|{}", c.token, encode_items(&c.items)),
                }
            }
            OrderRecord::Pending(c) => format!("P|{}|{}", c.token, encode_items(&c.items)),
        }
    }

    pub fn decode(s: &str) -> Option<OrderRecord> {
        let (tag, rest) = s.split_once('|')?;
        match tag {
            "R" | "C" => {
                let mut parts = rest.splitn(3, '|');
                let (token, items) = (parts.next()?.to_owned(), decode_items(parts.next()?)?);
                let customer = parts.next().map(str::to_owned);
                Some(if tag == "R" {
                    OrderRecord::Held {
                        token,
                        items,
                        customer,
                    }
                } else {
                    OrderRecord::Returned {
                        token,
                        items,
                        customer,
                    }
                })
            }
            "X" => {
                let mut parts = rest.splitn(4, '|');
                let (reason, pid) = (parts.next()?, parts.next()?);
                let claim = match (parts.next(), parts.next()) {
                    (None, None) => None,
                    (Some(token), Some(items)) => Some(Claim {
                        token: token.to_owned(),
                        items: decode_items(items)?,
                    }),
                    _ => return None,
                };
                Some(OrderRecord::Refused {
                    reason: Reason::parse(reason)?,
                    product_id: if pid.is_empty() {
                        None
                    } else {
                        Some(pid.parse().ok()?)
                    },
                    claim,
                })
            }
            "P" => {
                let (token, items) = rest.split_once('|')?;
                Some(OrderRecord::Pending(Claim {
                    token: token.to_owned(),
                    items: decode_items(items)?,
                }))
            }
            _ => None,
        }
    }
}

/// The text of a held (`R`) or given-back (`C`) record.
fn held_record(tag: char, token: &str, items: &[Item], customer: Option<&str>) -> String {
    match customer {
        None => format!("{tag}|{token}|{}", encode_items(items)),
        Some(c) => format!("{tag}|{token}|{}|{c}", encode_items(items)),
    }
}

/// One `order_created` to decide. `forced` is a refusal decided without looking at stock
/// (an invalid order), recorded so that the order id keeps that one outcome. `customer`
/// is the order's `customer_id`, counted against each limited product's limit.
/// `replaces` is, for an order decided again ([`CompensationCause::Redecide`]), the token
/// of its earlier pre-deduction that a rebuild of some of its slots left partly held: on a
/// cluster its remaining holds are given back and a claim or decision naming it is
/// replaced by a new claim (DESIGN "Rebuilding some slots").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub order_id: String,
    pub items: Vec<Item>,
    pub forced: Option<Reason>,
    pub customer: Option<String>,
    pub replaces: Option<String>,
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

/// Sold-out refusals for a batch, from the producer's [`SoldOutMarker`]: request `i` with
/// `sold_out[i]` is refused for `insufficient_stock` of its first item without looking at
/// stock, if the stock epoch is still `epoch` (no stock has come back since the product
/// was seen at 0). The default guards nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guards {
    pub epoch: String,
    pub sold_out: Vec<bool>,
}

/// What [`RedisStore::reserve_many`] learnt: one outcome per request, and the products seen
/// at 0 stock with the epoch they were seen in.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReserveReply {
    pub outcomes: Vec<ReserveOutcome>,
    pub zeros: Vec<(String, Vec<i64>)>,
}

impl ReserveReply {
    /// Adds one script call's reply, which decided `n` orders.
    fn absorb(&mut self, call: Vec<String>, n: usize) -> Result<(), StoreError> {
        let bad =
            || StoreError::Protocol(format!("reserve reply of the wrong shape for {n} orders"));
        match call.first().map(String::as_str) {
            Some("unloaded") => {
                self.outcomes
                    .extend(std::iter::repeat_n(ReserveOutcome::Unloaded, n));
                return Ok(());
            }
            Some("ok") => {}
            _ => return Err(bad()),
        }
        // {'ok', epoch, k, one entry per order, k products at 0} (lua/reserve.lua)
        let epoch = call.get(1).ok_or_else(bad)?.clone();
        let k: usize = call.get(2).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        if call.len() != 3 + n + k {
            return Err(bad());
        }
        let zeros = call[3 + n..]
            .iter()
            .map(|p| p.parse::<i64>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        for out in &call[3..3 + n] {
            let (rec, fresh) = match out.strip_prefix('~') {
                Some(seen) => (seen, false),
                None => (out.as_str(), true),
            };
            self.outcomes.push(match out.strip_prefix('!') {
                Some(key) => ReserveOutcome::Corrupt(key.to_owned()),
                None => OrderRecord::decode(rec)
                    .map(|record| ReserveOutcome::Decided { record, fresh })
                    .ok_or_else(|| StoreError::Protocol(format!("bad order record {rec:?}")))?,
            });
        }
        self.zeros.push((epoch, zeros));
        Ok(())
    }
}

/// The producer's local memory of products at 0 stock in Redis, valid for one stock epoch.
/// An order whose FIRST item is such a product is refused without reading stock (a later
/// item could not name the right product: an earlier item may be unknown or short). The
/// refusal is still recorded by the reserve script, in the same call as the other orders,
/// because an unrecorded refusal could turn into a reservation on a replay after a
/// restock. The guard makes a stale marker harmless: the script then decides on stock.
#[derive(Debug, Default)]
pub struct SoldOutMarker {
    epoch: String,
    products: std::collections::HashSet<i64>,
}

impl SoldOutMarker {
    /// The guards for `reqs` (false where stock must decide).
    pub fn guards(&self, reqs: &[ReserveRequest]) -> Guards {
        Guards {
            epoch: self.epoch.clone(),
            sold_out: reqs
                .iter()
                .map(|r| {
                    r.forced.is_none()
                        && r.items
                            .first()
                            .is_some_and(|first| self.products.contains(&first.product_id))
                })
                .collect(),
        }
    }

    /// Takes in what a reserve call saw. A new epoch forgets every product marked before.
    pub fn learn(&mut self, reply: &ReserveReply) {
        for (epoch, zeros) in &reply.zeros {
            if *epoch != self.epoch {
                self.epoch.clone_from(epoch);
                self.products.clear();
            }
            self.products.extend(zeros.iter().copied());
        }
    }

    /// Products currently marked sold out.
    pub fn len(&self) -> usize {
        self.products.len()
    }

    pub fn is_empty(&self) -> bool {
        self.products.is_empty()
    }
}

/// What the adjust script said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdjustOutcome {
    Applied,
    Already,
    Unloaded,
    /// Taking would leave the key below zero: nothing done.
    Short,
    /// Redis was rebuilt since the change's generation: the rebuild loaded it already.
    Stale,
    /// The stock key does not hold an integer: nothing done.
    Corrupt,
    /// The request id was applied to another product or amount: nothing done.
    Reused,
}

/// What the limit script said ([`RedisStore::set_limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitOutcome {
    Applied,
    /// This change or a newer one is here already, or there was no limit to remove.
    Already,
    /// The product has no limit in Redis: only a load adds one (with its counts).
    Absent,
    Unloaded,
    /// Redis was rebuilt since the change's generation: the load holds it.
    Stale,
}

/// A product's limit and its customers' held units as Redis holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buyers {
    pub per_customer: i64,
    pub version: i64,
    /// (customer, units held), units > 0, sorted by customer.
    pub units: Vec<(String, i64)>,
}

/// A buyers hash's fields read as [`Buyers`]; a field that does not read is a protocol
/// error (something other than the scripts wrote the hash).
fn read_buyers(
    product_id: i64,
    fields: Vec<(String, String)>,
) -> Result<Option<Buyers>, StoreError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let bad = |f: &str, v: &str| {
        StoreError::Protocol(format!(
            "{}: field {f:?} holds {v:?}",
            buyers_key(product_id)
        ))
    };
    let (mut per_customer, mut version, mut units) = (None, None, Vec::new());
    for (f, v) in fields {
        let n: i64 = v.parse().map_err(|_| bad(&f, &v))?;
        match f.as_str() {
            LIMIT_FIELD => per_customer = Some(n),
            VERSION_FIELD => version = Some(n),
            _ => units.push((f, n)),
        }
    }
    units.sort();
    match (per_customer, version) {
        (Some(per_customer), Some(version)) => Ok(Some(Buyers {
            per_customer,
            version,
            units,
        })),
        _ => Err(bad(LIMIT_FIELD, "nothing")),
    }
}

/// What the restore script said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreOutcome {
    Restored,
    /// Given back before (a redelivery).
    Already,
    Unloaded,
    /// Redis was rebuilt after the PostgreSQL change: its snapshot holds it already.
    Stale,
    /// No record: forgotten (older than `--order-memory`) or never held here.
    Unknown,
    /// The record names another pre-deduction: this one is not held in this Redis.
    Other,
    NotHeld,
    Mismatch,
}

impl RestoreOutcome {
    /// Whether the compensation is done with: applied now or before, or nothing to apply.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            RestoreOutcome::Restored
                | RestoreOutcome::Already
                | RestoreOutcome::Stale
                | RestoreOutcome::Other
        )
    }
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
    /// The cluster changed under an order across slots (a rebuild dropped its claim, or
    /// ran between its steps): nothing was decided; the batch is run again.
    #[error("redis cluster: {0}; the batch is run again")]
    Retry(String),
    /// A setting that cannot be used (TLS files, password file): stop, it will not heal.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A setting of Redis that would lose decisions on a restart ([`RedisStore::persistence_risks`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "level", content = "what", rename_all = "snake_case")]
pub enum Risk {
    /// A restart would lose decisions: the operators' check fails.
    Danger(String),
    /// A trade-off the operators chose (reported, not failed).
    Note(String),
    /// Redis would not show the setting.
    Unknown(String),
}

/// A command of the settings check that failed: [`Risk::Unknown`] when the server answered
/// with an error (NOPERM, a renamed or unknown command: a managed service), else the error.
fn refused(e: redis::RedisError, command: &str) -> Result<Risk, StoreError> {
    if e.code().is_some() {
        Ok(Risk::Unknown(format!("{command} refused: {e}")))
    } else {
        Err(e.into())
    }
}

impl Risk {
    /// The same risk, naming the node it was found on.
    fn at(self, host: &str, port: u16) -> Risk {
        match self {
            Risk::Danger(w) => Risk::Danger(format!("{host}:{port}: {w}")),
            Risk::Note(w) => Risk::Note(format!("{host}:{port}: {w}")),
            Risk::Unknown(w) => Risk::Unknown(format!("{host}:{port}: {w}")),
        }
    }
}

/// What a restart of one Redis would lose, from its settings, asking it with `ask` (a
/// connection to that one server): see [`RedisStore::persistence_risks`].
async fn node_persistence_risks<F, Fut>(ask: F) -> Result<Vec<Risk>, StoreError>
where
    F: Fn(redis::Cmd) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<redis::Value>>,
{
    let mut get = redis::cmd("CONFIG");
    get.arg("GET").arg("appendonly").arg("appendfsync");
    let config: Vec<String> = match ask(get).await {
        Ok(v) => config_pairs(v)?,
        Err(e) => return Ok(vec![refused(e, "CONFIG GET")?]),
    };
    let setting = |name: &str| {
        config
            .chunks(2)
            .find(|kv| kv[0] == name)
            .and_then(|kv| kv.get(1).cloned())
            .unwrap_or_default()
    };
    let mut risks = Vec::new();
    if setting("appendonly") != "yes" {
        risks.push(Risk::Danger(
            "appendonly is not yes: a restart brings back the last snapshot (or nothing), \
             without the decisions since; set appendonly yes"
                .into(),
        ));
        return Ok(risks);
    }
    if setting("appendfsync") != "always" {
        risks.push(Risk::Note(format!(
            "appendfsync is {}: a crash of the machine loses the last second or so of \
             decisions (Redis above PostgreSQL until `stockctl check --repair`)",
            setting("appendfsync")
        )));
    }
    let mut user = redis::cmd("ACL");
    user.arg("GETUSER").arg("default");
    match ask(user).await.map(acl_grants) {
        Ok(None) => risks.push(Risk::Unknown(
            "ACL GETUSER default: a reply without commands, keys and channels".into(),
        )),
        Ok(Some(grants)) => {
            if grants != ["+@all", "~*", "&*"] {
                risks.push(Risk::Danger(format!(
                    "the ACL user default has `{}`: Redis replays its AOF as default and \
                     checks the ACL again at each EXEC (redis/redis#14541), so a restart \
                     drops every script's effects since the last AOF rewrite; keep \
                     default off and give it every command, key and channel: \
                     `user default off resetpass ~* &* +@all`",
                    grants.join(" ")
                )));
            }
        }
        Err(e) => risks.push(refused(e, "ACL GETUSER")?),
    }
    Ok(risks)
}

/// A `CONFIG GET` reply as name, value, name, value... (RESP2: a flat array; RESP3: a map).
fn config_pairs(v: redis::Value) -> Result<Vec<String>, StoreError> {
    match v {
        redis::Value::Map(pairs) => pairs
            .into_iter()
            .flat_map(|(k, v)| [k, v])
            .map(parse_value)
            .collect(),
        other => parse_value(other),
    }
}

/// The commands, keys and channels of an `ACL GETUSER` reply (RESP2: name, value pairs;
/// RESP3: a map); None for a reply without them.
fn acl_grants(v: redis::Value) -> Option<Vec<String>> {
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let pairs: Vec<(redis::Value, redis::Value)> = match v {
        redis::Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| Some((kv[0].clone(), kv.get(1)?.clone())))
            .collect(),
        redis::Value::Map(pairs) => pairs,
        _ => return None,
    };
    ["commands", "keys", "channels"]
        .iter()
        .map(|want| {
            pairs
                .iter()
                .find(|(k, _)| text(k).as_deref() == Some(*want))
                .and_then(|(_, v)| text(v))
        })
        .collect()
}

/// A reply read as `T`; a reply of another shape is a protocol error.
fn parse_value<T: redis::FromRedisValue>(v: redis::Value) -> Result<T, StoreError> {
    redis::from_redis_value(v).map_err(|e| StoreError::Protocol(e.to_string()))
}

/// Whether a connection error is a setting that will not heal: failed authentication, a
/// refused certificate (an I/O error of kind `InvalidData` from rustls), a bad setting.
fn is_refusal(e: &redis::RedisError) -> bool {
    // An I/O error that is not a refused, dropped or timed-out connection is the TLS
    // handshake's (redis-rs keeps the I/O error behind an `Arc`, out of `downcast_ref`'s reach).
    let tls = e.is_io_error()
        && !e.is_connection_refusal()
        && !e.is_connection_dropped()
        && !e.is_timeout();
    tls || matches!(
        e.kind(),
        redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig
    )
}

/// A client for `args`: the URL's address and database, the ACL user and password of the
/// settings (a password in the URL is used when they hold none), and for `rediss://` TLS
/// verified, host name included, against the CA file or the system's roots, with the
/// client certificate for mutual TLS when set.
pub fn client(args: &RedisArgs) -> Result<redis::Client, StoreError> {
    use redis::IntoConnectionInfo;
    let info = args.url.expose().into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &args.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = args.password()? {
        settings = settings.set_password(password.expose());
    }
    let info = info.set_redis_settings(settings);
    let tls = args.tls();
    if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
        if tls.any() {
            return Err(ConfigError::invalid(
                "redis",
                "TLS files are set but the URL is not rediss://",
            )
            .into());
        }
        return Ok(redis::Client::open(info)?);
    }
    tls.check("redis")?;
    if !tls.any() {
        return Ok(redis::Client::open(info)?);
    }
    Ok(redis::Client::build_with_tls(info, certificates(&tls)?)?)
}

/// How long a request to one Redis may wait for its reply, and a connection for its
/// handshake. redis-rs defaults to 500 ms and 1 s: a Redis with `appendfsync always`
/// answers only after its AOF's `fdatasync`, which a stalling volume holds for seconds
/// (up to 2.4 s measured, docs/perf/issue12-session23.txt), and a TLS handshake on a busy
/// box can take over a second. Waiting is right; a timeout only makes the caller retry.
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One multiplexed connection from `client` with [`REPLY_TIMEOUT`] and
/// [`CONNECT_TIMEOUT`]: for the tools, tests and benchmarks that talk to Redis around this
/// module (the workers use [`RedisStore`]).
pub async fn raw_connection(
    client: &redis::Client,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(REPLY_TIMEOUT))
        .set_connection_timeout(Some(CONNECT_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The CA and client certificate of the TLS settings, read from their files.
fn certificates(tls: &TlsFiles) -> Result<redis::TlsCertificates, StoreError> {
    let client_tls = match tls.client_pair("redis")? {
        Some((cert, key)) => Some(redis::ClientTlsConfig {
            client_cert: TlsFiles::read("redis", "the client certificate", cert)?,
            client_key: TlsFiles::read("redis", "the client key", key)?,
        }),
        None => None,
    };
    let root_cert = match &tls.ca {
        Some(ca) => Some(TlsFiles::read("redis", "the CA file", ca)?),
        None => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// A connection to one Redis (self-reconnecting) or to a cluster (following its slots:
/// `MOVED`, `ASK`, failovers). Both are multiplexed and cloned into every task.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(std::sync::Arc<ClusterHandle>),
}

/// A cluster connection that is replaced when it stops answering. redis-rs 1.8's cluster
/// connection can stay wedged after a node is killed or restarted: a slot refresh (or a
/// reconnect to the initial nodes) begun while the node is down never completes, and
/// every later request times out (seen with a master killed under load in
/// `tests/redis_cluster.rs` and with a master restarted empty in the cluster nemesis). A
/// request that times out or loses its connection therefore replaces the connection (at
/// most once a second); requests in flight on the old one finish or fail, and their
/// callers retry as after any Redis error.
pub struct ClusterHandle {
    client: redis::cluster::ClusterClient,
    conn: std::sync::RwLock<redis::cluster_async::ClusterConnection>,
    renewed: tokio::sync::Mutex<std::time::Instant>,
    /// Masters found not answering, and their slots (DESIGN "An unreachable master").
    down: std::sync::Mutex<Down>,
}

/// What [`RedisStore::probe_masters`] found: the masters that do not answer, their slots,
/// the ones that do, and when.
#[derive(Debug, Clone, Default)]
struct Down {
    masters: Vec<(String, u16)>,
    slots: BTreeSet<u16>,
    up: Vec<(String, u16)>,
    checked: Option<std::time::Instant>,
}

/// How often masters found down are probed again, and how long a probe waits for one.
const DOWN_RECHECK: std::time::Duration = std::time::Duration::from_millis(500);
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// Whether a request got no answer: it timed out or lost its connection (what replaces a
/// cluster connection, and what `stockctl rebuild --lost` runs again after).
pub fn did_not_answer(e: &redis::RedisError) -> bool {
    e.is_timeout() || e.is_io_error() || e.is_connection_dropped()
}

/// Whether `e` says a node did not answer (down, unreachable, failing over), rather than
/// answering no.
fn unreachable(e: &StoreError) -> bool {
    match e {
        StoreError::Redis(e) => {
            did_not_answer(e) || e.is_connection_refusal() || e.is_cluster_error()
        }
        _ => false,
    }
}

/// The outcomes of `reqs` in their order: `decided` for those `waits` left out (in order),
/// `waiting` for the others (they touch a master that does not answer).
fn with_waiting<R, O: Clone>(
    reqs: &[R],
    waits: impl Fn(&R) -> bool,
    decided: Vec<O>,
    waiting: O,
) -> Result<Vec<O>, StoreError> {
    let mut decided = decided.into_iter();
    reqs.iter()
        .map(|r| {
            if waits(r) {
                Ok(waiting.clone())
            } else {
                decided
                    .next()
                    .ok_or_else(|| StoreError::Protocol("fewer outcomes than requests".into()))
            }
        })
        .collect()
}

impl ClusterHandle {
    async fn connect(client: redis::cluster::ClusterClient) -> Result<Self, StoreError> {
        let conn = client.get_async_connection().await?;
        Ok(ClusterHandle {
            client,
            conn: std::sync::RwLock::new(conn),
            renewed: tokio::sync::Mutex::new(std::time::Instant::now()),
            down: std::sync::Mutex::new(Down::default()),
        })
    }

    fn current(&self) -> redis::cluster_async::ClusterConnection {
        match self.conn.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After `err`: a fresh connection if the request timed out or lost its connection.
    async fn after(&self, err: &redis::RedisError) {
        if !did_not_answer(err) {
            return;
        }
        let mut last = self.renewed.lock().await;
        if last.elapsed() < std::time::Duration::from_secs(1) {
            return;
        }
        *last = std::time::Instant::now();
        match self.client.get_async_connection().await {
            Ok(fresh) => {
                if let Ok(mut c) = self.conn.write() {
                    *c = fresh;
                }
                tracing::warn!(error = %err, "redis cluster: connection replaced after an error");
            }
            Err(again) => tracing::warn!(error = %again, "redis cluster: cannot connect yet"),
        }
    }

    async fn route_command(
        &self,
        cmd: redis::Cmd,
        route: redis::cluster_routing::RoutingInfo,
    ) -> redis::RedisResult<redis::Value> {
        let r = self.current().route_command(cmd, route).await;
        if let Err(e) = &r {
            self.after(e).await;
        }
        r
    }
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(h) => Box::pin(async move {
                let r = h.current().req_packed_command(cmd).await;
                if let Err(e) = &r {
                    h.after(e).await;
                }
                r
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(h) => Box::pin(async move {
                let r = h
                    .current()
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                if let Err(e) = &r {
                    h.after(e).await;
                }
                r
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

/// The address of a node in a `CLUSTER SLOTS` reply (`[host, port, id, ...]`).
fn node_address(node: redis::Value) -> Result<(String, u16), StoreError> {
    let node: Vec<redis::Value> = parse_value(node)?;
    match node.as_slice() {
        [h, p, ..] => Ok((parse_value(h.clone())?, parse_value(p.clone())?)),
        _ => Err(StoreError::Protocol("CLUSTER SLOTS: bad node".into())),
    }
}

/// The masters of a slot map ([`RedisStore::slot_ranges`]), each once.
fn masters_of(ranges: &[(u16, u16, String, u16)]) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for (.., host, port) in ranges {
        if !out.contains(&(host.clone(), *port)) {
            out.push((host.clone(), *port));
        }
    }
    out
}

/// The slots of a slot map served by the masters `which` picks.
fn slots_of(
    ranges: &[(u16, u16, String, u16)],
    which: impl Fn(&(String, u16)) -> bool,
) -> BTreeSet<u16> {
    ranges
        .iter()
        .filter(|(.., host, port)| which(&(host.clone(), *port)))
        .flat_map(|(lo, hi, ..)| *lo..=*hi)
        .collect()
}

/// A cluster client for `args.cluster_nodes`, with the credentials and TLS files of the
/// settings applied to every node.
pub fn cluster_client(args: &RedisArgs) -> Result<redis::cluster::ClusterClient, StoreError> {
    use redis::IntoConnectionInfo;
    let mut nodes = Vec::new();
    for n in &args.cluster_nodes {
        let info = n.as_str().into_connection_info()?;
        if info.redis_settings().password().is_some() {
            return Err(ConfigError::invalid(
                "redis",
                "a cluster node URL carries a password: use REDIS_PASSWORD or --redis-password-file",
            )
            .into());
        }
        if info.redis_settings().db() != 0 {
            return Err(ConfigError::invalid("redis", "a cluster has only database 0").into());
        }
        nodes.push(info);
    }
    let tls_url = nodes
        .iter()
        .any(|i| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. }));
    // Few retries inside the client, close together: a request to a master that does not
    // answer fails within seconds (redis-rs' defaults retry for minutes; a request in
    // flight on a connection to a killed node ends at the response timeout), and the
    // batch then leaves that master's orders waiting and goes on (`probe_masters`); the
    // worker's own loop retries the rest. Redirections (MOVED, ASK) need one retry each.
    let mut b = redis::cluster::ClusterClientBuilder::new(nodes)
        .connection_timeout(std::time::Duration::from_secs(2))
        .response_timeout(std::time::Duration::from_secs(5))
        .retries(4)
        .min_retry_wait(50)
        .max_retry_wait(500);
    if let Some(user) = &args.username {
        b = b.username(user);
    }
    if let Some(password) = args.password()? {
        b = b.password(password.expose());
    }
    let tls = args.tls();
    if !tls_url {
        if tls.any() {
            return Err(ConfigError::invalid(
                "redis",
                "TLS files are set but the cluster nodes are not rediss://",
            )
            .into());
        }
    } else {
        tls.check("redis")?;
        b = b.tls(redis::TlsMode::Secure).certs(certificates(&tls)?);
    }
    Ok(b.build()?)
}

/// One Redis node's memory (`INFO memory`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMemory {
    /// `redis` on one Redis, `host:port` of a cluster's master.
    pub node: String,
    /// `used_memory`, bytes.
    pub used: u64,
    /// `maxmemory`, bytes (0: none).
    pub maxmemory: u64,
    /// `maxmemory_policy`.
    pub policy: String,
}

impl NodeMemory {
    /// From the text of `INFO memory`.
    pub fn parse(node: &str, info: &str) -> Result<Self, StoreError> {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
                .map(str::to_owned)
        };
        let number = |name: &str| -> Result<u64, StoreError> {
            field(name)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| StoreError::Protocol(format!("INFO memory of {node}: no {name}")))
        };
        Ok(NodeMemory {
            node: node.to_owned(),
            used: number("used_memory")?,
            maxmemory: number("maxmemory")?,
            policy: field("maxmemory_policy").unwrap_or_default(),
        })
    }
}

/// The one writer of Redis: its scripts, loads and operators' changes.
#[derive(Clone)]
pub struct RedisStore {
    /// The connections, at least one: the first for everything, and all of them for the
    /// round trips of a batch's reserve calls ([`RedisStore::connect_producer`]). One on
    /// a cluster, which keeps its own connection per node.
    lanes: std::sync::Arc<[RedisConn]>,
    /// Whether Redis is a cluster: per-slot state and the cross-slot protocol.
    cluster: bool,
    /// The lifetime given to new order records, in seconds: `--order-memory`, shortened
    /// by the producer's memory guard while Redis is close to its memory budget
    /// ([`RedisStore::set_record_ttl_secs`]); shared by every clone.
    record_ttl_secs: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Orders per reserve script call (`--orders-per-call`).
    orders_per_call: usize,
}

impl RedisStore {
    /// One connection (one per node on a cluster): `stockctl`, loads, checks.
    pub async fn connect(args: &RedisArgs) -> Result<Self, StoreError> {
        Self::connect_lanes(args, 1).await
    }

    /// The producer's store: a batch's reserve calls spread over `--redis-connections`
    /// connections to one Redis ([`reserve_trip_size`]; a cluster is unchanged).
    pub async fn connect_producer(args: &RedisArgs) -> Result<Self, StoreError> {
        Self::connect_lanes(args, args.connections).await
    }

    async fn connect_lanes(args: &RedisArgs, lanes: u8) -> Result<Self, StoreError> {
        let conn = if args.cluster_nodes.is_empty() {
            RedisConn::Single(Self::connect_single(args).await?)
        } else {
            let handle = ClusterHandle::connect(cluster_client(args)?).await?;
            RedisConn::Cluster(std::sync::Arc::new(handle))
        };
        let cluster = matches!(conn, RedisConn::Cluster(_));
        let mut all = vec![conn];
        if !cluster {
            let more = (1..lanes).map(|_| Self::connect_single(args));
            for c in futures::future::try_join_all(more).await? {
                all.push(RedisConn::Single(c));
            }
        }
        Ok(RedisStore {
            cluster,
            lanes: all.into(),
            record_ttl_secs: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
                args.order_memory.as_secs().max(1),
            )),
            orders_per_call: usize::from(args.orders_per_call).max(1),
        })
    }

    async fn connect_single(args: &RedisArgs) -> Result<ConnectionManager, StoreError> {
        let client = client(args)?;
        // One plain attempt first: a refused certificate or password stops the caller at
        // once with the cause (the manager below would retry it for about 10 s).
        if let Err(e) = raw_connection(&client).await {
            if is_refusal(&e) {
                return Err(e.into());
            }
        }
        // A pipeline of scripts on a busy server can take far longer than the client's
        // default reply timeout of 500 ms (see REPLY_TIMEOUT).
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(REPLY_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        Ok(client.get_connection_manager_with_config(config).await?)
    }

    /// The raw connection, for tests and benchmarks that must act around this module (a
    /// drift, a corrupt key, a lost Redis). The workers and `stockctl` use the methods.
    pub fn connection(&self) -> RedisConn {
        self.conn()
    }

    /// The connection (cheap: a multiplexed handle).
    fn conn(&self) -> RedisConn {
        self.lanes[0].clone()
    }

    /// Whether Redis is a cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The base of the keys that hold an order's record (`lua/record.lua`), found from
    /// the order id alone: [`RECORD_BASE`] on one Redis, on a cluster
    /// `stockpipe:rec:{o<bucket>}` ([`RECORD_BUCKETS`]).
    pub fn record_base(&self, order_id: &str) -> String {
        if self.cluster {
            cross_slot::record_base(order_id)
        } else {
            RECORD_BASE.to_owned()
        }
    }

    /// The shard that holds `key`: the whole Redis, or the key's slot on a cluster.
    pub fn shard_of(&self, key: &str) -> Shard {
        if self.cluster {
            Shard::Slot(slots::slot(key))
        } else {
            Shard::Whole
        }
    }

    /// Every shard: the whole Redis, or each of a cluster's slots.
    fn shards(&self) -> Vec<Shard> {
        if self.cluster {
            (0..slots::SLOTS).map(Shard::Slot).collect()
        } else {
            vec![Shard::Whole]
        }
    }

    /// The marker key of request `request_id` for `product_id`: on a cluster it lives in
    /// the product's slot, beside the stock it changes.
    fn request_key_for(&self, request_id: &str, product_id: i64) -> String {
        if self.cluster {
            format!("stockpipe:request:{{{product_id}}}:{request_id}")
        } else {
            request_key(request_id)
        }
    }

    /// Decides every request, in order: runs of at most `--orders-per-call` orders per
    /// script call, at most [`PIPELINE_CHUNK`] orders per round trip. `guards` (made for
    /// `reqs`; the default for none) turn requests into sold-out refusals that the script
    /// applies only while the guards' epoch holds (see [`SoldOutMarker`]). On a cluster
    /// the guards are not used yet, and orders across slots take [`cross_slot`].
    pub async fn reserve_many(
        &self,
        reqs: &[ReserveRequest],
        guards: &Guards,
    ) -> Result<ReserveReply, StoreError> {
        if self.cluster {
            let down = self.down_slots().await?;
            if down.is_empty() {
                let reply = self.reserve_on_cluster(reqs).await;
                return self.noting_unreachable(reply).await;
            }
            // Orders touching a master that does not answer wait; the others go on. (A
            // forced refusal touches only its record.)
            let touches = |r: &ReserveRequest| {
                let items = if r.forced.is_some() {
                    &[][..]
                } else {
                    &r.items[..]
                };
                slots::touched(&r.order_id, items).any(|s| down.contains(&s))
            };
            let go: Vec<ReserveRequest> = reqs.iter().filter(|r| !touches(r)).cloned().collect();
            let reply = self.reserve_on_cluster(&go).await;
            let reply = self.noting_unreachable(reply).await?;
            return Ok(ReserveReply {
                outcomes: with_waiting(reqs, touches, reply.outcomes, ReserveOutcome::Unloaded)?,
                zeros: reply.zeros,
            });
        }
        // Every round trip is sent at once, spread over the lanes (one round trip each,
        // while they last): Redis reads 16 KB of one connection per turn of its event
        // loop and ends each turn that wrote with an fsync (`appendfsync always`), so a
        // batch on one connection waits for an fsync per 16 KB; on n lanes, for one per
        // n × 16 KB. Each lane runs its round trips in order; the lanes interleave.
        let size = reserve_trip_size(reqs.len(), self.lanes.len(), self.orders_per_call);
        let trips = reqs.chunks(size).enumerate().map(|(i, chunk)| {
            let at = i * size;
            let sold_out = guards.sold_out.get(at..at + chunk.len()).unwrap_or(&[]);
            let lane = self.lanes[i % self.lanes.len()].clone();
            self.reserve_chunk(lane, Shard::Whole, chunk, &guards.epoch, sold_out)
        });
        let mut reply = ReserveReply::default();
        for (calls, sizes) in futures::future::try_join_all(trips).await? {
            for (call, n) in calls.into_iter().zip(sizes) {
                reply.absorb(call, n)?;
            }
        }
        Ok(reply)
    }

    /// One round trip in `shard`: the script calls for `reqs`, and how many orders each
    /// decided.
    async fn reserve_chunk(
        &self,
        conn: RedisConn,
        shard: Shard,
        reqs: &[ReserveRequest],
        epoch: &str,
        sold_out: &[bool],
    ) -> Result<(Vec<Vec<String>>, Vec<usize>), StoreError> {
        if reqs.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut pipe = redis::pipe();
        let mut sizes = Vec::new();
        for (c, call) in reqs.chunks(self.orders_per_call).enumerate() {
            let mut inv = RESERVE.key(shard.loaded_key());
            inv.key(shard.epoch_key())
                .key(shard.seq_key())
                .arg(self.record_ttl_secs())
                .arg(epoch)
                .arg(shard.token_arg());
            for (j, r) in call.iter().enumerate() {
                inv.key(self.record_base(&r.order_id));
                for it in &r.items {
                    inv.key(stock_key(it.product_id));
                }
                for it in &r.items {
                    inv.key(buyers_key(it.product_id));
                }
                // The guard: a forced refusal, or "1" for an order the sold-out marker
                // may refuse, or "".
                let guard = match r.forced {
                    Some(reason) => OrderRecord::Refused {
                        reason,
                        product_id: None,
                        claim: None,
                    }
                    .encode(),
                    None if sold_out.get(c * self.orders_per_call + j) == Some(&true) => {
                        "1".to_owned()
                    }
                    None => String::new(),
                };
                inv.arg(&record_field(&r.order_id)[..])
                    .arg(r.items.len())
                    .arg(encode_items(&r.items))
                    .arg(guard)
                    .arg(r.customer.as_deref().unwrap_or(""));
                for it in &r.items {
                    inv.arg(it.quantity);
                }
            }
            pipe.invoke_script(&inv);
            sizes.push(call.len());
        }
        let calls: Vec<Vec<String>> = RESERVE.query(conn, &pipe).await?;
        crate::failpoint!("producer.mid_redis");
        if calls.len() != sizes.len() {
            return Err(StoreError::Protocol("reserve: too few replies".into()));
        }
        Ok((calls, sizes))
    }

    /// Runs the restore script for each compensation, in order, pipelined in round trips
    /// of at most [`PIPELINE_CHUNK`] scripts.
    pub async fn restore_many(
        &self,
        reqs: &[Compensation],
    ) -> Result<Vec<RestoreOutcome>, StoreError> {
        if self.cluster {
            let down = self.down_slots().await?;
            if down.is_empty() {
                let out = self.restore_on_cluster(reqs).await;
                return self.noting_unreachable(out).await;
            }
            // Give-backs touching a master that does not answer wait; the others go on.
            let touches =
                |c: &Compensation| slots::touched(&c.order_id, &c.items).any(|s| down.contains(&s));
            let go: Vec<Compensation> = reqs.iter().filter(|c| !touches(c)).cloned().collect();
            let out = self.restore_on_cluster(&go).await;
            let done = self.noting_unreachable(out).await?;
            return with_waiting(reqs, touches, done, RestoreOutcome::Unloaded);
        }
        let mut out = Vec::with_capacity(reqs.len());
        for chunk in reqs.chunks(PIPELINE_CHUNK) {
            out.extend(self.restore_chunk(Shard::Whole, chunk).await?);
        }
        Ok(out)
    }

    /// restore.lua for `reqs`, whose keys all live in `shard`, in one round trip.
    async fn restore_chunk(
        &self,
        shard: Shard,
        reqs: &[Compensation],
    ) -> Result<Vec<RestoreOutcome>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for c in reqs {
            let items = &c.items;
            let mut inv = RESTORE.key(shard.loaded_key());
            inv.key(shard.epoch_key())
                .key(self.record_base(&c.order_id));
            for it in items {
                inv.key(stock_key(it.product_id));
            }
            for it in items {
                inv.key(buyers_key(it.product_id));
            }
            inv.arg(c.token.as_deref().unwrap_or(""))
                .arg(c.gen.map(|g| g.to_string()).unwrap_or_default())
                .arg(encode_items(items))
                .arg(&record_field(&c.order_id)[..]);
            for it in items {
                inv.arg(it.quantity);
            }
            pipe.invoke_script(&inv);
        }
        let replies: Vec<String> = RESTORE.query(self.conn(), &pipe).await?;
        replies
            .into_iter()
            .map(|r| {
                Ok(match r.as_str() {
                    "restored" => RestoreOutcome::Restored,
                    "already" => RestoreOutcome::Already,
                    "unloaded" => RestoreOutcome::Unloaded,
                    "stale" => RestoreOutcome::Stale,
                    "unknown" => RestoreOutcome::Unknown,
                    "other" => RestoreOutcome::Other,
                    "not_held" => RestoreOutcome::NotHeld,
                    "mismatch" => RestoreOutcome::Mismatch,
                    other => return Err(StoreError::Protocol(format!("restore said {other:?}"))),
                })
            })
            .collect()
    }

    /// Adds `delta` (negative: takes) to `stock:{product_id}` once per `request_id`, only
    /// in generation `gen` (None: whichever is current).
    pub async fn adjust(
        &self,
        product_id: i64,
        delta: i64,
        request_id: &str,
        gen: Option<i64>,
    ) -> Result<AdjustOutcome, StoreError> {
        let shard = self.shard_of(&stock_key(product_id));
        let reply: String = ADJUST
            .key(shard.loaded_key())
            .key(stock_key(product_id))
            .key(self.request_key_for(request_id, product_id))
            .key(shard.epoch_key())
            .arg(delta)
            .arg(self.record_ttl_secs())
            .arg(gen.map(|g| g.to_string()).unwrap_or_default())
            .arg(product_id)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(match reply.as_str() {
            "applied" => AdjustOutcome::Applied,
            "already" => AdjustOutcome::Already,
            "unloaded" => AdjustOutcome::Unloaded,
            "short" => AdjustOutcome::Short,
            "stale" => AdjustOutcome::Stale,
            "corrupt" => AdjustOutcome::Corrupt,
            "reused" => AdjustOutcome::Reused,
            other => return Err(StoreError::Protocol(format!("adjust said {other:?}"))),
        })
    }

    /// Sets product `product_id`'s per-customer limit to `per_customer` (None: removes it
    /// and every customer's count), as PostgreSQL's change `version` of generation `gen`
    /// (None: whichever is current) made it: `lua/limit.lua`. A product without a limit
    /// here answers [`LimitOutcome::Absent`] to a new limit: only a load adds one.
    pub async fn set_limit(
        &self,
        product_id: i64,
        per_customer: Option<i64>,
        version: i64,
        gen: Option<i64>,
    ) -> Result<LimitOutcome, StoreError> {
        let shard = self.shard_of(&stock_key(product_id));
        let reply: String = LIMIT
            .key(shard.loaded_key())
            .key(buyers_key(product_id))
            .arg(gen.map(|g| g.to_string()).unwrap_or_default())
            .arg(version)
            .arg(per_customer.map(|n| n.to_string()).unwrap_or_default())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(match reply.as_str() {
            "applied" => LimitOutcome::Applied,
            "already" => LimitOutcome::Already,
            "absent" => LimitOutcome::Absent,
            "unloaded" => LimitOutcome::Unloaded,
            "stale" => LimitOutcome::Stale,
            other => return Err(StoreError::Protocol(format!("limit said {other:?}"))),
        })
    }

    /// Product `product_id`'s limit and held units as Redis holds them (None: no limit).
    pub async fn buyers(&self, product_id: i64) -> Result<Option<Buyers>, StoreError> {
        let fields: Vec<(String, String)> = self.conn().hgetall(buyers_key(product_id)).await?;
        read_buyers(product_id, fields)
    }

    /// Every product that has a limit in Redis.
    pub async fn limited_products(&self) -> Result<Vec<i64>, StoreError> {
        let mut products: Vec<i64> = self
            .scan_all("stockpipe:buyers:*")
            .await?
            .iter()
            .filter_map(|k| {
                k.strip_prefix("stockpipe:buyers:{")
                    .and_then(|r| r.strip_suffix('}'))
                    .and_then(|p| p.parse().ok())
            })
            .collect();
        products.sort_unstable();
        products.dedup();
        Ok(products)
    }

    /// Gives back, in whatever generation is current, what [`Self::adjust`] took under
    /// `request_id` (`delta` is the amount to add back): `adjust.lua` under the request's
    /// undo id, once.
    pub async fn undo_adjust(
        &self,
        product_id: i64,
        delta: i64,
        request_id: &str,
    ) -> Result<AdjustOutcome, StoreError> {
        self.adjust(product_id, delta, &undo_request_id(request_id), None)
            .await
    }

    /// The marker of request `request_id` (`<product>:<delta>`), if Redis applied it. On a
    /// cluster only a change of `product_id` is found (markers live beside their stock).
    pub async fn request_marker(
        &self,
        request_id: &str,
        product_id: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .get(self.request_key_for(request_id, product_id))
            .await?)
    }

    /// A change this request id applied here and did not undo: `(product, delta)`. A
    /// request that was undone (its undo marker present) is forgotten here (both markers
    /// deleted), so that the id starts afresh.
    pub async fn pending_request(
        &self,
        request_id: &str,
        product_id: i64,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let mut conn = self.conn();
        let keys = [
            self.request_key_for(request_id, product_id),
            self.request_key_for(&undo_request_id(request_id), product_id),
        ];
        let (taken, undone): (Option<String>, Option<String>) = conn.mget(&keys[..]).await?;
        match (taken, undone) {
            (_, Some(_)) => {
                let _: i64 = conn.del(&keys[..]).await?;
                Ok(None)
            }
            (Some(v), None) => v
                .split_once(':')
                .and_then(|(p, d)| Some((p.parse::<i64>().ok()?, d.parse::<i64>().ok()?)))
                .map(Some)
                .ok_or_else(|| {
                    StoreError::Protocol(format!("request marker {} holds {v:?}", keys[0]))
                }),
            (None, None) => Ok(None),
        }
    }

    /// Forgets request `request_id` and its undo (both markers), after it was undone.
    pub async fn forget_request(
        &self,
        request_id: &str,
        product_id: i64,
    ) -> Result<(), StoreError> {
        let keys = [
            self.request_key_for(request_id, product_id),
            self.request_key_for(&undo_request_id(request_id), product_id),
        ];
        let _: i64 = self.conn().del(&keys[..]).await?;
        Ok(())
    }

    /// On a cluster, waits until every master's replica holds this connection's writes so
    /// far (`WAIT 1`, at most [`REPLICA_WAIT`]); a failover then promotes a replica that has
    /// every decision published after this. Returns false if some master's replica did not
    /// confirm in time (none connected, or far behind): the caller goes on (a lone master
    /// cannot fail over) and counts it. True at once on one Redis.
    ///
    /// While a master does not answer (its orders wait: [`Self::down_slots`]), only the
    /// masters that answer are asked, each by its address.
    pub async fn wait_replicated(&self) -> Result<bool, StoreError> {
        if !self.cluster {
            return Ok(true);
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(REPLICA_WAIT.as_millis() as u64);
        let RedisConn::Cluster(h) = &self.lanes[0] else {
            return Ok(true);
        };
        let up = {
            let d = h.down.lock().unwrap_or_else(|e| e.into_inner());
            (!d.masters.is_empty()).then(|| d.up.clone())
        };
        let Some(up) = up else {
            let acked = wait.query_async::<i64>(&mut self.conn()).await;
            let acked = self
                .noting_unreachable(acked.map_err(StoreError::from))
                .await?;
            return Ok(acked >= 1);
        };
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let asks = up.into_iter().map(|(host, port)| {
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            h.route_command(wait.clone(), route)
        });
        let mut all = true;
        for answer in futures::future::join_all(asks).await {
            let acked: i64 = match answer {
                Ok(v) => parse_value(v)?,
                Err(e) => self.noting_unreachable(Err(e.into())).await?,
            };
            all &= acked >= 1;
        }
        Ok(all)
    }

    /// The slots of masters found not answering (DESIGN "An unreachable master"): empty
    /// while every master answers (no request sent). While some do not, they are probed
    /// again at most every [`DOWN_RECHECK`]: back, or replaced by a promoted replica.
    pub async fn down_slots(&self) -> Result<BTreeSet<u16>, StoreError> {
        let RedisConn::Cluster(h) = &self.lanes[0] else {
            return Ok(BTreeSet::new());
        };
        let due = {
            let d = h.down.lock().unwrap_or_else(|e| e.into_inner());
            if d.masters.is_empty() {
                return Ok(BTreeSet::new());
            }
            d.checked.is_none_or(|t| t.elapsed() >= DOWN_RECHECK)
        };
        if due {
            self.probe_masters().await?;
        }
        let d = h.down.lock().unwrap_or_else(|e| e.into_inner());
        Ok(d.slots.clone())
    }

    /// `result`; if it failed because a node did not answer, first finds which masters do
    /// not ([`Self::probe_masters`]), so that the batch, retried, leaves their orders
    /// waiting and decides the others.
    async fn noting_unreachable<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result {
            if self.cluster && unreachable(e) {
                if let Err(p) = self.probe_masters().await {
                    tracing::warn!(error = %p, "redis cluster: cannot probe the masters");
                }
            }
        }
        result
    }

    /// Asks every master of the slot map (`CLUSTER SLOTS`) for a `PING`, each by its
    /// address within [`PROBE_TIMEOUT`], and records those that do not answer with their
    /// slots.
    pub async fn probe_masters(&self) -> Result<(), StoreError> {
        let RedisConn::Cluster(h) = &self.lanes[0] else {
            return Ok(());
        };
        let ranges = self.slot_ranges().await?;
        let masters = masters_of(&ranges);
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let pings = masters.iter().map(|(host, port)| {
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            });
            tokio::time::timeout(PROBE_TIMEOUT, h.route_command(redis::cmd("PING"), route))
        });
        let answers = futures::future::join_all(pings).await;
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for (m, a) in masters.into_iter().zip(answers) {
            if matches!(a, Ok(Ok(_))) {
                up.push(m);
            } else {
                down.push(m);
            }
        }
        let slots = slots_of(&ranges, |m| down.contains(m));
        let mut d = h.down.lock().unwrap_or_else(|e| e.into_inner());
        if d.masters != down {
            if down.is_empty() {
                tracing::warn!("redis cluster: every master answers again");
            } else {
                tracing::warn!(masters = ?down, slots = slots.len(),
                    "redis cluster: masters do not answer; the orders touching their slots wait");
            }
        }
        *d = Down {
            masters: down,
            slots,
            up,
            checked: Some(std::time::Instant::now()),
        };
        Ok(())
    }

    /// Whether stock has been loaded (the marker exists; on a cluster, every slot's).
    pub async fn is_loaded(&self) -> Result<bool, StoreError> {
        Ok(self.unloaded_shards().await?.is_empty())
    }

    /// The shards whose loaded marker is missing (the whole Redis, or a cluster's slots).
    pub async fn unloaded_shards(&self) -> Result<Vec<Shard>, StoreError> {
        let markers = self.markers().await?;
        Ok(markers
            .into_iter()
            .filter(|(_, m)| m.is_none())
            .map(|(s, _)| s)
            .collect())
    }

    /// Every shard's loaded marker.
    async fn markers(&self) -> Result<Vec<(Shard, Option<String>)>, StoreError> {
        let shards = self.shards();
        let keys: Vec<String> = shards.iter().map(|s| s.loaded_key()).collect();
        let mut values: Vec<Option<String>> = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(4096) {
            // A cluster splits MGET by slot and sends each node its part.
            let part: Vec<Option<String>> = self.conn().mget(chunk).await?;
            values.extend(part);
        }
        Ok(shards.into_iter().zip(values).collect())
    }

    /// The current Redis generation, the newest any slot names pre-deductions in (None:
    /// not loaded; on a cluster, some slot is not).
    pub async fn generation(&self) -> Result<Option<i64>, StoreError> {
        let mut gen = None;
        for (_, marker) in self.slot_markers().await? {
            let Some(m) = marker else { return Ok(None) };
            gen = Some(gen.map_or(m.named, |g: i64| g.max(m.named)));
        }
        Ok(gen)
    }

    /// Each slot's loaded marker, read (None: not loaded); on one Redis, the one of the
    /// whole Redis as slot 0.
    pub async fn slot_markers(&self) -> Result<Vec<(u16, Option<slots::Marker>)>, StoreError> {
        self.markers()
            .await?
            .into_iter()
            .map(|(shard, raw)| {
                let slot = match shard {
                    Shard::Whole => 0,
                    Shard::Slot(s) => s,
                };
                let m = raw
                    .map(|g| {
                        slots::Marker::parse(&g).ok_or_else(|| {
                            StoreError::Protocol(format!("{} holds {g:?}", shard.loaded_key()))
                        })
                    })
                    .transpose()?;
                Ok((slot, m))
            })
            .collect()
    }

    /// Step 1 of a load: deletes the loaded marker (every slot's on a cluster). From here
    /// on every script refuses to act: nothing is sold, refused, given back or adjusted
    /// until [`Self::load_generation`].
    pub async fn stop_selling(&self) -> Result<(), StoreError> {
        self.unmark(self.shards()).await
    }

    /// Step 1 of a partial rebuild (cluster only): deletes the loaded markers of `slots`;
    /// from then on no script acts in them, and every other slot goes on.
    pub async fn stop_selling_slots(&self, slots: &BTreeSet<u16>) -> Result<(), StoreError> {
        self.unmark(slots.iter().map(|s| Shard::Slot(*s)).collect())
            .await
    }

    /// Deletes the loaded markers of `shards`.
    async fn unmark(&self, shards: Vec<Shard>) -> Result<(), StoreError> {
        let keys: Vec<String> = shards.iter().map(|s| s.loaded_key()).collect();
        for chunk in keys.chunks(4096) {
            let _: () = self.conn().del(chunk).await?;
        }
        Ok(())
    }

    /// Step 3 of a partial rebuild, once PostgreSQL is fenced in `gen`: every slot still
    /// loaded (not in `except`) names its new pre-deductions in `gen`, keeping the
    /// generation it was loaded in (`lua/name_in.lua`). An order across slots claimed from
    /// then on is new enough for the slots being loaded in `gen`; one claimed before
    /// finds them stale and is claimed again (DESIGN "Rebuilding some slots").
    pub async fn name_in(&self, gen: i64, except: &BTreeSet<u16>) -> Result<(), StoreError> {
        use futures::StreamExt;
        let calls = (0..slots::SLOTS).filter(|s| !except.contains(s)).map(|s| {
            let mut conn = self.conn();
            async move {
                let _: i64 = NAME_IN
                    .key(Shard::Slot(s).loaded_key())
                    .arg(gen)
                    .invoke_async(&mut conn)
                    .await?;
                Ok::<_, StoreError>(())
            }
        });
        let mut done = futures::stream::iter(calls).buffer_unordered(256);
        while let Some(r) = done.next().await {
            r?;
        }
        Ok(())
    }

    /// The keys matching `pattern` on every node that holds data (each master of a cluster).
    async fn scan_all(&self, pattern: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        match self.conn() {
            RedisConn::Single(mut c) => {
                let mut iter: redis::AsyncIter<String> = c.scan_match(pattern).await?;
                while let Some(k) = iter.next_item().await {
                    keys.push(k?);
                }
            }
            RedisConn::Cluster(c) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                for (host, port) in self.masters().await? {
                    let mut cursor: u64 = 0;
                    loop {
                        let mut cmd = redis::cmd("SCAN");
                        cmd.arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(1000);
                        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port,
                        });
                        let v = c.route_command(cmd, route).await?;
                        let (next, batch): (u64, Vec<String>) = parse_value(v)?;
                        keys.extend(batch);
                        cursor = next;
                        if cursor == 0 {
                            break;
                        }
                    }
                }
            }
        }
        Ok(keys)
    }

    /// The address of each master of the cluster (`CLUSTER SLOTS`).
    pub async fn masters(&self) -> Result<Vec<(String, u16)>, StoreError> {
        Ok(masters_of(&self.slot_ranges().await?))
    }

    /// The slots the master at `host:port` serves now (`CLUSTER SLOTS`; none if it is
    /// not a master).
    pub async fn slots_served_by(
        &self,
        host: &str,
        port: u16,
    ) -> Result<BTreeSet<u16>, StoreError> {
        let ranges = self.slot_ranges().await?;
        Ok(slots_of(&ranges, |(h, p)| h == host && *p == port))
    }

    /// Each slot range of the cluster (first, last) with its master's address (`CLUSTER
    /// SLOTS`).
    async fn slot_ranges(&self) -> Result<Vec<(u16, u16, String, u16)>, StoreError> {
        let mut out = Vec::new();
        for parts in self.cluster_slots().await? {
            let (lo, hi): (u16, u16) = match parts.as_slice() {
                [lo, hi, ..] => (parse_value(lo.clone())?, parse_value(hi.clone())?),
                _ => return Err(StoreError::Protocol("CLUSTER SLOTS: bad range".into())),
            };
            let master = parts
                .get(2)
                .cloned()
                .ok_or_else(|| StoreError::Protocol("CLUSTER SLOTS: no master".into()))?;
            let (host, port) = node_address(master)?;
            out.push((lo, hi, host, port));
        }
        Ok(out)
    }

    /// Every node of the cluster that serves slots, masters and their replicas (`CLUSTER
    /// SLOTS`), each once.
    async fn nodes(&self) -> Result<Vec<(String, u16)>, StoreError> {
        let mut out: Vec<(String, u16)> = Vec::new();
        for parts in self.cluster_slots().await? {
            for node in parts.into_iter().skip(2) {
                let addr = node_address(node)?;
                if !out.contains(&addr) {
                    out.push(addr);
                }
            }
        }
        Ok(out)
    }

    /// `CLUSTER SLOTS`, each range as `[start, end, [host, port, id, ...], replicas...]`.
    async fn cluster_slots(&self) -> Result<Vec<Vec<redis::Value>>, StoreError> {
        // Asked of any node: one that does not answer is skipped on the next try.
        let mut tries = 0;
        let ranges: Vec<redis::Value> = loop {
            tries += 1;
            match redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async(&mut self.conn())
                .await
            {
                Ok(r) => break r,
                Err(e) if tries < 3 => {
                    tracing::debug!(error = %e, "CLUSTER SLOTS: asking again");
                }
                Err(e) => return Err(e.into()),
            }
        };
        ranges.into_iter().map(parse_value).collect()
    }

    /// Step 2 of a load, with selling stopped: forgets every order record, hold and request
    /// marker, sets every `stock:{p}` of `stock` (with its shard's epoch, atomically),
    /// writes the records of the orders still held (`held`: order id, token, items; on a
    /// cluster with their holds), then sets the loaded marker (every slot's) to `gen`:
    /// selling resumes in that generation.
    pub async fn load_generation(
        &self,
        gen: i64,
        stock: &[(i64, i64)],
        held: &[HeldOrder],
        limits: &[ProductLimit],
    ) -> Result<(), StoreError> {
        self.forget(|_| true).await?;
        self.write_snapshot(stock, held, limits, |_| true).await?;
        self.mark_loaded(self.shards(), gen).await
    }

    /// Step 4 of a partial rebuild (cluster only), with `slots` stopped
    /// ([`Self::stop_selling_slots`]) and every other slot naming in `gen`
    /// ([`Self::name_in`]): forgets what `slots` still hold (records, holds, request
    /// markers, counts), and returns the holds taken elsewhere, before `gen`, by orders
    /// whose record was in `slots` (lost with them: no redelivery finds that claim again),
    /// as (order id, claim with the hold's items).
    /// Those PostgreSQL does not hold reserved or confirmed under their token go back with
    /// [`Self::release_holds`].
    pub async fn forget_slots(
        &self,
        gen: i64,
        slots: &BTreeSet<u16>,
    ) -> Result<Vec<(String, Claim)>, StoreError> {
        self.forget(|key: &str| slots.contains(&slots::slot(key)))
            .await?;
        self.holds_of_lost_records(gen, slots).await
    }

    /// Step 5 of a partial rebuild: writes the snapshot's part in `slots` (stock, limits
    /// and counts, the records and holds of held reservations), then sets their markers to
    /// `gen`: they sell again.
    pub async fn load_slots(
        &self,
        gen: i64,
        slots: &BTreeSet<u16>,
        stock: &[(i64, i64)],
        held: &[HeldOrder],
        limits: &[ProductLimit],
    ) -> Result<(), StoreError> {
        let inside = |key: &str| slots.contains(&slots::slot(key));
        self.write_snapshot(stock, held, limits, inside).await?;
        self.mark_loaded(slots.iter().map(|s| Shard::Slot(*s)).collect(), gen)
            .await
    }

    /// The last step of a load: the loaded markers of `shards` say `gen`; they sell again.
    async fn mark_loaded(&self, shards: Vec<Shard>, gen: i64) -> Result<(), StoreError> {
        let markers: Vec<(String, String)> = shards
            .iter()
            .map(|s| (s.loaded_key(), gen.to_string()))
            .collect();
        for chunk in markers.chunks(4096) {
            let _: () = self.conn().mset(chunk).await?;
        }
        Ok(())
    }

    /// Deletes every order record, hold, request marker and limit hash for which `keep`
    /// (a key's place) says yes.
    async fn forget(&self, keep: impl Fn(&str) -> bool) -> Result<(), StoreError> {
        let mut conn = self.conn();
        for pattern in FORGOTTEN_ON_LOAD {
            let mut keys = self.scan_all(pattern).await?;
            keys.retain(|k| keep(k));
            for chunk in keys.chunks(1000) {
                let _: () = conn.unlink(chunk).await?;
            }
        }
        Ok(())
    }

    /// Writes the keys of a snapshot for which `keep` says yes: each product's stock (with
    /// its shard's epoch, atomically), each limited product's limit and counts, and the
    /// records of held reservations (on a cluster with their holds).
    async fn write_snapshot(
        &self,
        stock: &[(i64, i64)],
        held: &[HeldOrder],
        limits: &[ProductLimit],
        keep: impl Fn(&str) -> bool,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        // Atomic with the epoch change, so that no sold-out marker outlives these values.
        let mut by_shard: std::collections::BTreeMap<Shard, Vec<(i64, i64)>> =
            std::collections::BTreeMap::new();
        for (p, available) in stock {
            let key = stock_key(*p);
            if keep(&key) {
                by_shard
                    .entry(self.shard_of(&key))
                    .or_default()
                    .push((*p, *available));
            }
        }
        for (shard, values) in by_shard {
            for chunk in values.chunks(1000) {
                let mut pipe = redis::pipe();
                pipe.atomic().incr(shard.epoch_key(), 1).ignore();
                for (p, available) in chunk {
                    pipe.set(stock_key(*p), available).ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
            }
        }
        // Each limited product's hash whole, in one atomic step (its slot's).
        for l in limits.iter().filter(|l| keep(&buyers_key(l.product_id))) {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .hset_multiple(
                    buyers_key(l.product_id),
                    &[
                        (LIMIT_FIELD, l.per_customer.to_string()),
                        (VERSION_FIELD, l.version.to_string()),
                    ],
                )
                .ignore();
            for chunk in l.units.chunks(1000) {
                pipe.hset_multiple(buyers_key(l.product_id), chunk).ignore();
            }
            let _: () = pipe.query_async(&mut conn).await?;
        }
        for chunk in held.chunks(5000) {
            let mut records: Vec<(String, String, String)> = Vec::with_capacity(chunk.len());
            let mut writes: Vec<(String, String)> = Vec::new();
            for h in chunk {
                let rec = OrderRecord::Held {
                    token: h.token.clone(),
                    items: h.items.clone(),
                    customer: h.customer.clone(),
                };
                records.push((
                    self.record_base(&h.order_id),
                    h.order_id.clone(),
                    rec.encode(),
                ));
                writes.extend(self.holds_of(
                    &h.order_id,
                    &h.token,
                    &h.items,
                    h.customer.as_deref(),
                ));
            }
            records.retain(|(base, _, _)| keep(base));
            writes.retain(|(k, _)| keep(k));
            self.put_records(&records).await?;
            self.set_all(&writes).await?;
        }
        Ok(())
    }

    /// Writes order records as a load has them, (base, order id, record) each: one
    /// pipeline per base (in parallel on a cluster).
    async fn put_records(&self, records: &[(String, String, String)]) -> Result<(), StoreError> {
        let mut by_base: std::collections::BTreeMap<&str, Vec<(&str, &str)>> =
            std::collections::BTreeMap::new();
        for (base, id, rec) in records {
            by_base.entry(base).or_default().push((id, rec));
        }
        futures::future::try_join_all(by_base.into_iter().map(|(base, recs)| {
            let mut pipe = redis::pipe();
            for chunk in recs.chunks(PIPELINE_CHUNK) {
                let mut inv = REC_PUT.key(base);
                inv.arg(self.record_ttl_secs());
                for (id, rec) in chunk {
                    inv.arg(&record_field(id)[..]).arg(*rec);
                }
                pipe.invoke_script(&inv).ignore();
            }
            let conn = self.conn();
            async move { REC_PUT.query::<()>(conn, &pipe).await }
        }))
        .await?;
        Ok(())
    }

    /// Sets every key of `writes` for the order records' lifetime: one pipeline on one
    /// Redis, one per slot (in parallel) on a cluster.
    async fn set_all(&self, writes: &[(String, String)]) -> Result<(), StoreError> {
        let mut by_shard: std::collections::HashMap<Shard, redis::Pipeline> =
            std::collections::HashMap::new();
        for (k, v) in writes {
            by_shard
                .entry(self.shard_of(k))
                .or_default()
                .set_ex(k, v, self.record_ttl_secs())
                .ignore();
        }
        futures::future::try_join_all(by_shard.into_values().map(|pipe| {
            let mut conn = self.conn();
            async move { pipe.query_async::<()>(&mut conn).await }
        }))
        .await?;
        Ok(())
    }

    /// The keys of `keys` that exist and do not hold an integer.
    pub async fn corrupt_among(&self, keys: &[String]) -> Result<Vec<String>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = self.conn().mget(keys).await?;
        Ok(keys
            .iter()
            .zip(raw)
            .filter(|(_, v)| v.as_deref().is_some_and(|v| !is_stock_integer(v)))
            .map(|(k, _)| k.clone())
            .collect())
    }

    /// What a restart of this Redis would lose, from its settings (`CONFIG GET`,
    /// `ACL GETUSER default`), for the operators' check. A Redis that refuses to show them
    /// (a managed service, a user without the right) gives one [`Risk::Unknown`]. On a
    /// cluster every node of `CLUSTER SLOTS` is read, masters and replicas (a replica is
    /// promoted with its own settings), and each risk names its node (`host:port: ...`).
    pub async fn persistence_risks(&self) -> Result<Vec<Risk>, StoreError> {
        let RedisConn::Cluster(h) = &self.lanes[0] else {
            let conn = self.conn();
            return node_persistence_risks(|cmd| {
                let mut conn = conn.clone();
                async move { cmd.query_async::<redis::Value>(&mut conn).await }
            })
            .await;
        };
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let mut risks = Vec::new();
        for (host, port) in self.nodes().await? {
            let of_node = node_persistence_risks(|cmd| {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                });
                async move { h.route_command(cmd, route).await }
            })
            .await;
            let of_node = match of_node {
                Ok(r) => r,
                // A node that does not answer is named; the others are still read.
                Err(e) => vec![Risk::Unknown(format!("did not answer: {e}"))],
            };
            risks.extend(of_node.into_iter().map(|r| r.at(&host, port)));
        }
        Ok(risks)
    }

    /// `stock:{p}` of each product as stored (None where the key is missing), for the
    /// operators' views, which must show a value that is not an integer rather than fail.
    pub async fn stock_raw(&self, products: &[i64]) -> Result<Vec<Option<String>>, StoreError> {
        if products.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = products.iter().map(|p| stock_key(*p)).collect();
        Ok(self.conn().mget(keys).await?)
    }

    /// `stock:{p}` for each product (None where the key is missing).
    pub async fn stock_levels(&self, products: &[i64]) -> Result<Vec<Option<i64>>, StoreError> {
        if products.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = products.iter().map(|p| stock_key(*p)).collect();
        Ok(self.conn().mget(keys).await?)
    }

    /// The producer's record of an order, if it has one.
    pub async fn order_record(&self, order_id: &str) -> Result<Option<OrderRecord>, StoreError> {
        let read = self.read_record(order_id).await?;
        Ok(read.record.as_deref().and_then(OrderRecord::decode))
    }

    /// An order's record as stored, with the loaded marker of its slot (of the whole Redis
    /// on one Redis) and when the record is forgotten.
    async fn read_record(&self, order_id: &str) -> Result<RecordRead, StoreError> {
        let base = self.record_base(order_id);
        let mut pipe = redis::pipe();
        pipe.invoke_script(
            REC_GET
                .key(self.shard_of(&base).loaded_key())
                .key(&base)
                .arg(&record_field(order_id)[..]),
        );
        let ((marker, record, expires),): ((String, String, i64),) =
            REC_GET.query(self.conn(), &pipe).await?;
        let some = |v: String| (!v.is_empty()).then_some(v);
        Ok(RecordRead {
            marker: some(marker),
            record: some(record),
            expires: (expires >= 0).then_some(expires),
        })
    }

    /// When an order's record is forgotten (Unix seconds; None: no record, or kept for
    /// good).
    pub async fn record_expiry(&self, order_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.read_record(order_id).await?.expires)
    }

    /// Every order record (each master of a cluster) as stored, by its field
    /// ([`record_field`]; the empty field that keeps a bucket alive is none): for tests and
    /// checks, which read every bucket.
    pub async fn records(&self) -> Result<Vec<([u8; 12], String)>, StoreError> {
        let mut out = Vec::new();
        for key in self.scan_all("stockpipe:rec:*").await? {
            if key.ends_with(":i") {
                continue;
            }
            let fields: Vec<(Vec<u8>, String)> = self.conn().hgetall(&key).await?;
            for (f, rec) in fields.into_iter().filter(|(f, _)| !f.is_empty()) {
                let field: [u8; 12] = f
                    .try_into()
                    .map_err(|f| StoreError::Protocol(format!("bad record field {f:?}")))?;
                out.push((field, rec));
            }
        }
        Ok(out)
    }

    /// The lifetime given to new order records, in seconds.
    pub fn record_ttl_secs(&self) -> u64 {
        self.record_ttl_secs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Gives new order records `secs` of life from now on (this store and its clones).
    pub fn set_record_ttl_secs(&self, secs: u64) {
        self.record_ttl_secs
            .store(secs.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The memory of each node that holds data (each master of a cluster), from `INFO
    /// memory`.
    pub async fn memory(&self) -> Result<Vec<NodeMemory>, StoreError> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        match self.conn() {
            RedisConn::Single(mut c) => {
                let text: String = info.query_async(&mut c).await?;
                Ok(vec![NodeMemory::parse("redis", &text)?])
            }
            RedisConn::Cluster(c) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let mut out = Vec::new();
                for (host, port) in self.masters().await? {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port,
                    });
                    let v = c.route_command(info.clone(), route).await?;
                    let text: String = parse_value(v)?;
                    out.push(NodeMemory::parse(&format!("{host}:{port}"), &text)?);
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn acl_grants_read_both_protocols_and_refuse_other_shapes() {
        let bulk = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        let resp2 = redis::Value::Array(vec![
            bulk("flags"),
            redis::Value::Array(vec![bulk("off")]),
            bulk("commands"),
            bulk("-@all"),
            bulk("keys"),
            bulk(""),
            bulk("channels"),
            bulk(""),
        ]);
        assert_eq!(acl_grants(resp2), Some(strings(&["-@all", "", ""])));
        let resp3 = redis::Value::Map(vec![
            (bulk("commands"), bulk("+@all")),
            (bulk("keys"), bulk("~*")),
            (bulk("channels"), bulk("&*")),
        ]);
        assert_eq!(acl_grants(resp3), Some(strings(&["+@all", "~*", "&*"])));
        let partial = redis::Value::Array(vec![bulk("commands"), bulk("+@all")]);
        assert_eq!(acl_grants(partial), None, "no keys or channels: unknown");
        assert_eq!(acl_grants(redis::Value::Nil), None);
    }

    fn req(id: &str, products: &[i64], forced: Option<Reason>) -> ReserveRequest {
        ReserveRequest {
            order_id: id.into(),
            items: products
                .iter()
                .map(|&product_id| Item {
                    product_id,
                    quantity: 1,
                })
                .collect(),
            forced,
            customer: None,
            replaces: None,
        }
    }

    #[test]
    fn a_batch_is_spread_over_the_lanes_in_whole_calls() {
        // 5,000 orders on 8 lanes: 625 each, in whole calls 700, at most PIPELINE_CHUNK.
        assert_eq!(reserve_trip_size(5000, 8, 100), 500);
        // At half rate a batch is a few hundred orders: one call per lane.
        assert_eq!(reserve_trip_size(300, 8, 100), 100);
        assert_eq!(reserve_trip_size(40, 8, 100), 100);
        // One lane: the round trips of before.
        assert_eq!(reserve_trip_size(5000, 1, 100), 500);
        assert_eq!(reserve_trip_size(300, 8, 7), 42);
        assert_eq!(reserve_trip_size(0, 8, 100), 1);
        // A call larger than a round trip's cap still goes whole.
        assert_eq!(reserve_trip_size(5000, 1, 800), 800);
    }

    #[test]
    fn reserve_reply_is_read_per_order_with_its_epoch() {
        let mut reply = ReserveReply::default();
        reply
            .absorb(
                strings(&[
                    "ok",
                    "t1#3",
                    "1",
                    "R|1.1|42:1",
                    "~X|insufficient_stock|42",
                    "!stock:{7}",
                    "42",
                ]),
                3,
            )
            .expect("reply");
        reply.absorb(strings(&["unloaded"]), 3).expect("unloaded");
        assert_eq!(reply.outcomes.len(), 6);
        assert!(matches!(
            reply.outcomes[0],
            ReserveOutcome::Decided {
                record: OrderRecord::Held { .. },
                fresh: true
            }
        ));
        assert_eq!(
            reply.outcomes[1],
            ReserveOutcome::Decided {
                record: OrderRecord::Refused {
                    reason: Reason::InsufficientStock,
                    product_id: Some(42),
                    claim: None,
                },
                fresh: false
            }
        );
        assert_eq!(
            reply.outcomes[2],
            ReserveOutcome::Corrupt("stock:{7}".to_string())
        );
        assert_eq!(reply.outcomes[5], ReserveOutcome::Unloaded);
        assert_eq!(reply.zeros, vec![("t1#3".to_string(), vec![42])]);
        // A reply that does not decide every order is a protocol error, never a guess.
        assert!(ReserveReply::default()
            .absorb(strings(&["ok", "t1#3", "0", "R|1.1|42:1"]), 2)
            .is_err());
        // Nor is one whose products at 0 do not add up.
        assert!(ReserveReply::default()
            .absorb(strings(&["ok", "t1#3", "2", "R|1.1|42:1", "42"]), 1)
            .is_err());
    }

    #[test]
    fn marker_guards_only_first_items_and_forgets_on_a_new_epoch() {
        let mut m = SoldOutMarker::default();
        let zero = |epoch: &str, ps: Vec<i64>| ReserveReply {
            outcomes: vec![],
            zeros: vec![(epoch.to_string(), ps)],
        };
        m.learn(&zero("e1", vec![7]));
        let reqs = [
            req("a", &[7], None),
            req("b", &[3, 7], None),
            req("c", &[7], Some(Reason::InvalidOrder)),
            req("d", &[8], None),
        ];
        assert_eq!(
            m.guards(&reqs),
            Guards {
                epoch: "e1".into(),
                sold_out: vec![true, false, false, false]
            }
        );
        m.learn(&zero("e1", vec![8]));
        assert_eq!(m.len(), 2);
        m.learn(&zero("e2", vec![]));
        assert!(m.is_empty(), "stock came back somewhere: start again");
    }

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
            OrderRecord::Held {
                token: "3.17".into(),
                items: items.clone(),
                customer: None,
            },
            OrderRecord::Held {
                token: "3.18".into(),
                items: items.clone(),
                customer: Some("c-1:x.y_z".into()),
            },
            OrderRecord::Returned {
                token: String::new(),
                items: items.clone(),
                customer: None,
            },
            OrderRecord::Returned {
                token: "3.19".into(),
                items,
                customer: Some("c".into()),
            },
            OrderRecord::Refused {
                reason: Reason::InsufficientStock,
                product_id: Some(42),
                claim: None,
            },
            OrderRecord::Refused {
                reason: Reason::InvalidOrder,
                product_id: None,
                claim: None,
            },
            OrderRecord::Refused {
                reason: Reason::InsufficientStock,
                product_id: Some(7),
                claim: Some(Claim {
                    token: "3.16385".into(),
                    items: vec![Item {
                        product_id: 7,
                        quantity: 1,
                    }],
                }),
            },
            OrderRecord::Pending(Claim {
                token: "3.16385".into(),
                items: vec![Item {
                    product_id: 42,
                    quantity: 2,
                }],
            }),
        ] {
            assert_eq!(OrderRecord::decode(&rec.encode()), Some(rec));
        }
        assert_eq!(
            OrderRecord::Held {
                token: "3.17".into(),
                items: vec![Item {
                    product_id: 42,
                    quantity: 2
                }],
                customer: None,
            }
            .encode(),
            "R|3.17|42:2"
        );
        assert_eq!(OrderRecord::decode("Z|1"), None);
    }

    #[test]
    fn keys_follow_the_contract() {
        assert_eq!(stock_key(42), "stock:{42}");
    }
}
