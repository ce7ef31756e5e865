//! The producer's Redis memory budget: what a flood of unique order ids does to Redis.
//!
//! Every order the producer decides leaves a record in Redis for `--order-memory` (its
//! decision and items: the fast path of idempotency; PostgreSQL's ledger is the judge). A
//! flood of unique ids therefore grows Redis by rate × order memory × bytes per record,
//! until `maxmemory` refuses every write and the sale stops. The guard reads each node's
//! `INFO memory` (at most once a second) against its budget (`--redis-memory-budget`:
//! by default the node's `maxmemory`) and acts in two stages:
//!
//! 1. **Shorten** (from `--redis-memory-shorten-at` of the budget, default 0.8): new
//!    records get `--order-memory-min` (default 1 h) instead of `--order-memory`, so that
//!    Redis holds rate × 1 h of records, not rate × 8 days. The sale goes on; an order
//!    re-sent after its shorter memory is still decided once (the consumer gives the
//!    second pre-deduction back, DESIGN rule 1). `--order-memory-min` must outlive a
//!    reservation (its give-back finds it by its record).
//! 2. **Shed** (from `--redis-memory-shed-at`, default 0.95): no batch is decided; the
//!    batch waits and is retried with backoff, no offset moves (back-pressure: orders wait
//!    in Kafka, none is lost, and no decision already published is touched), until records
//!    expire or the budget grows. `/readyz` names the node and its figures.
//!
//! Shortening ends when the memory falls below its threshold; shedding ends when it falls
//! to `--redis-memory-resume-at` (default: midway between the two thresholds), so that
//! the few KiB `INFO memory` moves by on its own (client buffers) do not let batches
//! through while Redis stands at its budget, each adding records. The metrics
//! `stockpipe_redis_memory_ratio` (used / budget, the fullest node) and
//! `stockpipe_redis_memory_pressure` (0 normal, 1 shortened, 2 shedding) show them.
//!
//! At start, a node with `maxmemory` and an `allkeys-*` eviction policy stops the producer:
//! such a policy can evict `stock:{p}` keys, and a product whose key vanished would be
//! refused as unknown. A `volatile-*` policy (which can evict only records, keys with a
//! lifetime) is allowed with a warning: the guard sheds before it would evict.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use stock_common::config::parse_duration;
use stock_common::metrics::Metrics;
use stock_common::redis_store::{NodeMemory, RedisStore};

/// How often `INFO memory` is read at most.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The memory budget of each Redis node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// The node's `maxmemory`; no budget where it has none.
    Auto,
    /// No budget: the guard never acts.
    Off,
    /// This many bytes per node (and at most its `maxmemory`, when it has one).
    Bytes(u64),
}

impl FromStr for Budget {
    type Err = String;

    /// `auto`, `off`, or a size: bytes, or with `kb`, `mb`, `gb` (powers of 1024).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => return Ok(Budget::Auto),
            "off" => return Ok(Budget::Off),
            _ => {}
        }
        let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?}: expected auto, off or a size such as 2gb"))?;
        let mult: u64 = match unit.trim() {
            "" | "b" => 1,
            "k" | "kb" => 1 << 10,
            "m" | "mb" => 1 << 20,
            "g" | "gb" => 1 << 30,
            other => return Err(format!("{s:?}: unknown unit {other:?} (b, kb, mb, gb)")),
        };
        n.checked_mul(mult)
            .filter(|b| *b > 0)
            .map(Budget::Bytes)
            .ok_or_else(|| format!("{s:?}: out of range"))
    }
}

fn fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("{s:?}: not a number"))?;
    if f > 0.0 && f <= 1.0 {
        Ok(f)
    } else {
        Err(format!("{s:?}: must be above 0 and at most 1"))
    }
}

/// Settings of the memory guard (module docs).
#[derive(clap::Args, Clone, Debug)]
pub struct MemoryArgs {
    /// Redis memory budget per node: `auto` (the node's `maxmemory`), `off`, or a size
    /// (`512mb`, `2gb`; at most the node's `maxmemory`).
    #[arg(
        long = "redis-memory-budget",
        env = "REDIS_MEMORY_BUDGET",
        default_value = "auto"
    )]
    pub budget: Budget,
    /// Share of the budget from which new order records get `--order-memory-min`.
    #[arg(long = "redis-memory-shorten-at", env = "REDIS_MEMORY_SHORTEN_AT", default_value = "0.8", value_parser = fraction)]
    pub shorten_at: f64,
    /// Share of the budget from which no batch is decided (back-pressure) until memory
    /// falls below it again.
    #[arg(long = "redis-memory-shed-at", env = "REDIS_MEMORY_SHED_AT", default_value = "0.95", value_parser = fraction)]
    pub shed_at: f64,
    /// Share of the budget to which memory must fall before shedding ends (default:
    /// midway between `--redis-memory-shorten-at` and `--redis-memory-shed-at`).
    #[arg(long = "redis-memory-resume-at", env = "REDIS_MEMORY_RESUME_AT", value_parser = fraction)]
    pub resume_at: Option<f64>,
    /// The order memory while Redis is close to its budget. Must outlive a reservation
    /// (the consumer's `--reservation-ttl`) and the consumer's lag.
    #[arg(long = "order-memory-min", env = "ORDER_MEMORY_MIN", default_value = "1h", value_parser = parse_duration)]
    pub order_memory_min: Duration,
}

impl Default for MemoryArgs {
    fn default() -> Self {
        MemoryArgs {
            budget: Budget::Auto,
            shorten_at: 0.8,
            shed_at: 0.95,
            resume_at: None,
            order_memory_min: Duration::from_secs(3600),
        }
    }
}

impl MemoryArgs {
    /// The share of the budget at which shedding ends.
    pub fn resume_at(&self) -> f64 {
        self.resume_at
            .unwrap_or((self.shorten_at + self.shed_at) / 2.0)
    }

    /// Refuses thresholds out of order: shortening from above shedding, or a shedding
    /// that would end at or above its own start.
    pub fn validate(&self) -> Result<(), String> {
        if self.shorten_at > self.shed_at {
            return Err(format!(
                "--redis-memory-shorten-at ({}) is above --redis-memory-shed-at ({})",
                self.shorten_at, self.shed_at
            ));
        }
        if self.resume_at() >= self.shed_at {
            return Err(format!(
                "--redis-memory-resume-at ({}) must be below --redis-memory-shed-at ({})",
                self.resume_at(),
                self.shed_at
            ));
        }
        Ok(())
    }
}

/// How close Redis is to its budget.
#[derive(Clone, Debug, PartialEq)]
pub enum Pressure {
    Normal,
    /// New records get the shorter order memory.
    Shortened(Fullest),
    /// No batch is decided.
    Shedding(Fullest),
}

impl Pressure {
    fn level(&self) -> i64 {
        match self {
            Pressure::Normal => 0,
            Pressure::Shortened(_) => 1,
            Pressure::Shedding(_) => 2,
        }
    }
}

/// The fullest node against its budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Fullest {
    pub node: String,
    pub used: u64,
    pub budget: u64,
}

impl Fullest {
    pub fn ratio(&self) -> f64 {
        self.used as f64 / self.budget as f64
    }
}

impl std::fmt::Display for Fullest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "redis {} uses {:.1} MiB of its {:.1} MiB budget ({:.0}%)",
            self.node,
            self.used as f64 / 1_048_576.0,
            self.budget as f64 / 1_048_576.0,
            100.0 * self.ratio()
        )
    }
}

/// The budget of one node, if it has one.
fn budget_of(budget: Budget, node: &NodeMemory) -> Option<u64> {
    match (budget, node.maxmemory) {
        (Budget::Off, _) | (Budget::Auto, 0) => None,
        (Budget::Auto, max) => Some(max),
        (Budget::Bytes(b), 0) => Some(b),
        (Budget::Bytes(b), max) => Some(b.min(max)),
    }
}

/// The pressure `nodes` are under with `args`, from no pressure: the fullest node's
/// against the thresholds.
pub fn pressure(args: &MemoryArgs, nodes: &[NodeMemory]) -> Pressure {
    pressure_after(args, nodes, &Pressure::Normal)
}

/// The pressure `nodes` are under with `args` after `was`: shedding goes on down to
/// [`MemoryArgs::resume_at`].
pub fn pressure_after(args: &MemoryArgs, nodes: &[NodeMemory], was: &Pressure) -> Pressure {
    pressure_of(args, fullest(args.budget, nodes), was)
}

/// The node with a budget that is fullest against it.
fn fullest(budget: Budget, nodes: &[NodeMemory]) -> Option<Fullest> {
    nodes
        .iter()
        .filter_map(|n| {
            budget_of(budget, n).map(|budget| Fullest {
                node: n.node.clone(),
                used: n.used,
                budget,
            })
        })
        .max_by(|a, b| a.ratio().total_cmp(&b.ratio()))
}

fn pressure_of(args: &MemoryArgs, fullest: Option<Fullest>, was: &Pressure) -> Pressure {
    let shedding = matches!(was, Pressure::Shedding(_));
    match fullest {
        Some(f) if f.ratio() >= args.shed_at => Pressure::Shedding(f),
        Some(f) if shedding && f.ratio() > args.resume_at() => Pressure::Shedding(f),
        Some(f) if f.ratio() >= args.shorten_at => Pressure::Shortened(f),
        _ => Pressure::Normal,
    }
}

/// Why the producer cannot run on these nodes: an eviction policy that may evict stock.
pub fn refuse_policy(nodes: &[NodeMemory]) -> Option<String> {
    nodes
        .iter()
        .find(|n| n.maxmemory > 0 && n.policy.starts_with("allkeys"))
        .map(|n| {
            format!(
                "redis {} has maxmemory-policy {}: it may evict stock:{{p}} keys, and their \
                 products would be refused as unknown. Set maxmemory-policy noeviction \
                 (the producer sheds load before the budget is reached: --redis-memory-budget)",
                n.node, n.policy
            )
        })
}

struct State {
    checked: Option<Instant>,
    pressure: Pressure,
}

/// The guard (module docs); one per producer.
pub struct MemoryGuard {
    args: MemoryArgs,
    store: RedisStore,
    metrics: Metrics,
    /// `--order-memory`, the lifetime of records under no pressure, in seconds.
    normal_ttl: u64,
    state: Mutex<State>,
}

impl MemoryGuard {
    pub fn new(args: MemoryArgs, store: RedisStore, metrics: Metrics) -> Self {
        MemoryGuard {
            normal_ttl: store.record_ttl_secs(),
            args,
            store,
            metrics,
            state: Mutex::new(State {
                checked: None,
                pressure: Pressure::Normal,
            }),
        }
    }

    /// At start: refuses thresholds out of order ([`MemoryArgs::validate`]) and an
    /// eviction policy that may evict stock, warns of one that may
    /// evict records, and of a budget that cannot act. Redis not answering is not a
    /// refusal (warned; the producer waits for Redis as it always does).
    pub async fn check_settings(&self) -> anyhow::Result<()> {
        self.args.validate().map_err(anyhow::Error::msg)?;
        // A node down at start (a master failing over) must not stop the producer: the
        // guard reads the nodes again at every batch.
        let nodes = match self.store.memory().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::warn!(error = %e, "redis: cannot read INFO memory at start; the memory guard checks again with the first batch");
                return Ok(());
            }
        };
        if let Some(why) = refuse_policy(&nodes) {
            anyhow::bail!(why);
        }
        for n in &nodes {
            if n.maxmemory > 0 && n.policy.starts_with("volatile") {
                tracing::warn!(node = %n.node, policy = %n.policy,
                    "redis may evict order records before the producer sheds load; noeviction is safer");
            }
        }
        if self.args.budget == Budget::Auto && nodes.iter().all(|n| n.maxmemory == 0) {
            tracing::info!(
                "redis has no maxmemory: the memory guard is idle (set maxmemory or --redis-memory-budget)"
            );
        }
        Ok(())
    }

    /// The pressure now (read at most once a second; the last one in between, or when
    /// Redis does not answer). Applies it: the records' lifetime, the metrics, a log line
    /// when it changes.
    pub async fn check(&self) -> Pressure {
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.checked.is_some_and(|t| t.elapsed() < CHECK_EVERY) {
                return st.pressure.clone();
            }
        }
        let nodes = match self.store.memory().await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "redis: INFO memory failed; keeping the last pressure");
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.checked = Some(Instant::now());
                return st.pressure.clone();
            }
        };
        let full = fullest(self.args.budget, &nodes);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = pressure_of(&self.args, full.clone(), &st.pressure);
        let ttl = match now {
            Pressure::Normal => self.normal_ttl,
            _ => self.normal_ttl.min(self.args.order_memory_min.as_secs()),
        };
        self.store.set_record_ttl_secs(ttl);
        self.metrics
            .redis_memory_ratio
            .set(full.as_ref().map_or(0.0, Fullest::ratio));
        self.metrics.redis_memory_pressure.set(now.level());
        if st.pressure.level() != now.level() {
            match &now {
                Pressure::Normal => tracing::info!(
                    "redis memory back under its budget: order memory and selling as usual"
                ),
                Pressure::Shortened(f) => tracing::warn!(fullest = %f, order_memory_secs = ttl,
                    "redis memory close to its budget: new order records get the shorter order memory"),
                Pressure::Shedding(f) => tracing::error!(fullest = %f,
                    "redis memory at its budget: deciding no batch until records expire (orders wait in Kafka)"),
            }
        }
        st.checked = Some(Instant::now());
        st.pressure = now.clone();
        now
    }

    /// The reason `/readyz` gives while shedding.
    pub fn not_ready(&self) -> Option<String> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &st.pressure {
            Pressure::Shedding(f) => Some(format!(
                "{f}: deciding no order until records expire or the budget grows \
                 (orders wait in Kafka)"
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, used: u64, max: u64, policy: &str) -> NodeMemory {
        NodeMemory {
            node: name.into(),
            used,
            maxmemory: max,
            policy: policy.into(),
        }
    }

    #[test]
    fn budgets_parse() {
        assert_eq!("auto".parse(), Ok(Budget::Auto));
        assert_eq!("OFF".parse(), Ok(Budget::Off));
        assert_eq!("512mb".parse(), Ok(Budget::Bytes(512 << 20)));
        assert_eq!("2GB".parse(), Ok(Budget::Bytes(2 << 30)));
        assert_eq!("1000".parse(), Ok(Budget::Bytes(1000)));
        assert!("0".parse::<Budget>().is_err());
        assert!("2tb".parse::<Budget>().is_err());
        assert!("lots".parse::<Budget>().is_err());
        assert!(fraction("0").is_err() && fraction("1.5").is_err() && fraction("0.9").is_ok());
    }

    #[test]
    fn the_fullest_node_sets_the_pressure() {
        let args = MemoryArgs::default();
        let calm = [
            node("a", 50, 100, "noeviction"),
            node("b", 10, 0, "noeviction"),
        ];
        assert_eq!(pressure(&args, &calm), Pressure::Normal);
        let close = [
            node("a", 50, 100, "noeviction"),
            node("b", 85, 100, "noeviction"),
        ];
        assert!(matches!(pressure(&args, &close), Pressure::Shortened(f) if f.node == "b"));
        let full = [
            node("a", 96, 100, "noeviction"),
            node("b", 85, 100, "noeviction"),
        ];
        assert!(matches!(pressure(&args, &full), Pressure::Shedding(f) if f.node == "a"));
        // No maxmemory and no budget: never acts; a budget in bytes caps at maxmemory.
        assert_eq!(
            pressure(&args, &[node("a", 1 << 40, 0, "noeviction")]),
            Pressure::Normal
        );
        let bytes = MemoryArgs {
            budget: Budget::Bytes(1000),
            ..MemoryArgs::default()
        };
        assert!(matches!(
            pressure(&bytes, &[node("a", 960, 0, "")]),
            Pressure::Shedding(_)
        ));
        assert!(matches!(
            pressure(&bytes, &[node("a", 96, 100, "")]),
            Pressure::Shedding(_)
        ));
        let off = MemoryArgs {
            budget: Budget::Off,
            ..MemoryArgs::default()
        };
        assert_eq!(pressure(&off, &full), Pressure::Normal);
    }

    /// Shedding ends below `--redis-memory-resume-at`, not at the first reading a hair
    /// under `--redis-memory-shed-at`: `INFO memory` moves by tens of KiB on its own
    /// (client buffers), and a guard without that margin let whole batches through while
    /// Redis stood at its budget (the flaky `redis_memory` test of session 20).
    #[test]
    fn shedding_holds_until_memory_falls_to_the_resume_threshold() {
        let args = MemoryArgs::default(); // shorten 0.8, shed 0.95, resume midway: 0.875
        assert_eq!(args.resume_at(), 0.875);
        let at = |used| [node("a", used, 1000, "noeviction")];
        let mut was = Pressure::Normal;
        let mut seen = Vec::new();
        for used in [940, 951, 949, 900, 876, 874, 951, 760] {
            was = pressure_after(&args, &at(used), &was);
            seen.push(was.level());
        }
        assert_eq!(seen, [1, 2, 2, 2, 2, 1, 2, 0]);
        // Set explicitly; and it cannot be at or above the shedding threshold.
        let set = MemoryArgs {
            resume_at: Some(0.9),
            ..MemoryArgs::default()
        };
        assert_eq!(set.resume_at(), 0.9);
        assert!(set.validate().is_ok());
        let wrong = MemoryArgs {
            resume_at: Some(0.95),
            ..MemoryArgs::default()
        };
        assert!(wrong.validate().is_err());
        let reversed = MemoryArgs {
            shorten_at: 0.96,
            ..MemoryArgs::default()
        };
        assert!(reversed.validate().is_err());
    }

    #[test]
    fn an_eviction_policy_that_may_evict_stock_is_refused() {
        assert!(refuse_policy(&[node("a", 1, 100, "allkeys-lru")]).is_some());
        assert!(refuse_policy(&[node("a", 1, 100, "volatile-lru")]).is_none());
        assert!(refuse_policy(&[node("a", 1, 0, "allkeys-lru")]).is_none());
        assert!(refuse_policy(&[node("a", 1, 100, "noeviction")]).is_none());
    }
}
