//! The nemesis workload: a seeded timeline of order events (valid orders on a hot SKU and
//! a long tail, multi-item orders, pays and cancels at chosen delays — some racing the
//! reservation TTL, some after it —, duplicated events, invalid orders, orders for a
//! product that does not exist, and bytes that are no event at all), and the publisher
//! that plays it onto the `orders` topic in real time.
//!
//! Every valid order names a customer drawn from a skewed population ([`Rng::skewed`]:
//! a fifth of the customers send four fifths of the orders), except a few percent that
//! carry no `customer_id` at all; the hot SKU may carry a per-customer limit
//! ([`WorkloadShape::hot_limit`], contract "Per-customer limits"), so that the busiest
//! customers run into it and an order for the hot SKU without a customer is
//! `rejected`/`invalid_order`.
//!
//! The stock is sized from the plan: the hot SKU gets a fraction of its demand (it sells
//! out, and cancellations and expiries put stock back for later orders), every tail
//! product more than all the orders that name it could ever take. So a refusal that names
//! a tail product is always wrong (contract guarantee 6: nothing wrongly rejected).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use stock_common::config::KafkaArgs;
use stock_common::events::Item;
use stock_devkit::rng::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The hot SKU.
pub const HOT: i64 = 1;
/// A product that has no stock row: orders naming it are `unknown_product`.
pub const MISSING_PRODUCT: i64 = 900_000_001;

/// What the contract says the `order_created` of an order must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `reserved`, or `rejected`/`insufficient_stock` naming the hot SKU.
    Valid,
    /// `rejected`/`invalid_order` (a broken rule, or no customer for a limited product).
    Invalid,
    /// `rejected`/`unknown_product` naming this product.
    UnknownProduct(i64),
}

/// What the workload does with an order after creating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fate {
    /// Nothing: a reservation expires.
    Abandoned,
    /// Paid well within the TTL.
    PayQuick,
    /// Paid around the TTL: races the expiry sweeper.
    PayRacing,
    /// Paid after the TTL: `ignored`/`already_released` unless the pipeline lagged.
    PayLate,
    CancelQuick,
    CancelLate,
    /// Cancelled, then paid: the pay is `ignored`/`already_released`.
    CancelThenPay,
}

/// One order id of the workload and what was sent for it.
#[derive(Debug, Clone)]
pub struct PlannedOrder {
    pub id: String,
    /// The `customer_id` of its `order_created` events (`None`: none sent).
    pub customer: Option<String>,
    /// The items of its first `order_created` (empty for an invalid order).
    pub items: Vec<Item>,
    pub expect: Expect,
    pub fate: Fate,
    /// `order_created` messages sent (duplicates and variants included).
    pub created: u32,
    /// Of those, how many named other items than the first.
    pub variants: u32,
    pub pays: u32,
    pub cancels: u32,
}

/// Bytes that are no order event: they must end in the dead-letter topic.
#[derive(Debug, Clone)]
pub struct Junk {
    pub key: String,
    pub bytes: Vec<u8>,
    pub what: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    Created,
    DuplicateCreated,
    VariantCreated,
    Paid,
    DuplicatePaid,
    Cancelled,
    Invalid,
    UnknownProduct,
    Junk(usize),
}

impl EventKind {
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Created => "order_created",
            EventKind::DuplicateCreated => "order_created (duplicate)",
            EventKind::VariantCreated => "order_created (same id, other items)",
            EventKind::Paid => "order_paid",
            EventKind::DuplicatePaid => "order_paid (duplicate)",
            EventKind::Cancelled => "order_cancelled",
            EventKind::Invalid => "invalid order event",
            EventKind::UnknownProduct => "order_created (unknown product)",
            EventKind::Junk(_) => "unparseable bytes",
        }
    }
}

/// One message of the timeline.
#[derive(Debug, Clone)]
pub struct Event {
    /// When to publish it, from the start of the workload.
    pub at: Duration,
    pub key: String,
    pub payload: Vec<u8>,
    pub kind: EventKind,
}

/// Shape of the workload.
#[derive(Debug, Clone)]
pub struct WorkloadShape {
    /// Valid orders (each with one first `order_created`).
    pub orders: usize,
    /// Tail products (ids 2..=products+1).
    pub products: usize,
    /// Share of orders that include the hot SKU.
    pub hot_share: f64,
    /// Stock of the hot SKU as a share of what its orders ask for.
    pub hot_stock_share: f64,
    /// Share of orders with 2 to 4 items.
    pub multi_share: f64,
    pub ttl: Duration,
    /// Over how long the `order_created` events are spread.
    pub duration: Duration,
    /// Customers, `c-0` to `c-<n-1>`, drawn skewed ([`Rng::skewed`]); 0: no valid order
    /// names a customer.
    pub customers: usize,
    /// Share of valid orders sent without `customer_id`.
    pub no_customer_share: f64,
    /// Per-customer limit of the hot SKU, set before the workers start (`None`: none).
    pub hot_limit: Option<i64>,
}

/// The whole workload.
#[derive(Debug, Clone)]
pub struct Plan {
    pub orders: Vec<PlannedOrder>,
    pub index: HashMap<String, usize>,
    pub junk: Vec<Junk>,
    /// Sorted by `at`; the events of one order keep the order they were planned in.
    pub events: Vec<Event>,
    /// Initial stock per product.
    pub stock: BTreeMap<i64, i64>,
    /// Per-customer limits (product -> units), set before the workers start.
    pub limits: BTreeMap<i64, i64>,
}

impl Plan {
    pub fn order(&self, id: &str) -> Option<&PlannedOrder> {
        self.index.get(id).map(|&i| &self.orders[i])
    }

    /// Events by kind label.
    pub fn event_counts(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for e in &self.events {
            *out.entry(e.kind.label().to_owned()).or_insert(0) += 1;
        }
        out
    }

    pub fn tail_products(&self) -> impl Iterator<Item = i64> + '_ {
        self.stock.keys().copied().filter(|p| *p != HOT)
    }
}

fn created_json(id: &str, customer: Option<&str>, items: &[Item]) -> Vec<u8> {
    match customer {
        Some(c) => crate::harness::created_by(id, c, items),
        None => crate::harness::created(id, items),
    }
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

struct Builder<'a> {
    rng: &'a mut Rng,
    shape: &'a WorkloadShape,
    demand: BTreeMap<i64, i64>,
    events: Vec<(Duration, u64, Event)>,
    seq: u64,
}

impl Builder<'_> {
    fn push(&mut self, at: Duration, key: &str, payload: Vec<u8>, kind: EventKind) {
        self.seq += 1;
        self.events.push((
            at,
            self.seq,
            Event {
                at,
                key: key.to_owned(),
                payload,
                kind,
            },
        ));
    }

    fn tail(&mut self) -> i64 {
        // Skewed towards the low ids: a few popular products, a long tail.
        let u = self.rng.unit();
        2 + ((u * u) * self.shape.products as f64) as i64
    }

    fn items(&mut self) -> Vec<Item> {
        let n = if self.rng.chance(self.shape.multi_share) {
            self.rng.range(2, 5) as usize
        } else {
            1
        };
        let n = n.min(self.shape.products + 1);
        let mut products: Vec<i64> = Vec::with_capacity(n);
        if self.rng.chance(self.shape.hot_share) {
            products.push(HOT);
        }
        while products.len() < n {
            let p = self.tail();
            if !products.contains(&p) {
                products.push(p);
            }
        }
        self.rng.shuffle(&mut products);
        let items: Vec<Item> = products
            .into_iter()
            .map(|p| Item {
                product_id: p,
                quantity: if p == HOT {
                    self.rng.range(1, 3) as i64
                } else {
                    self.rng.range(1, 4) as i64
                },
            })
            .collect();
        for it in &items {
            *self.demand.entry(it.product_id).or_insert(0) += it.quantity;
        }
        items
    }
}

/// An order created once, with no pay or cancel yet.
fn planned(id: String, items: Vec<Item>, expect: Expect) -> PlannedOrder {
    PlannedOrder {
        id,
        customer: None,
        items,
        expect,
        fate: Fate::Abandoned,
        created: 1,
        variants: 0,
        pays: 0,
        cancels: 0,
    }
}

/// The time grid of the valid orders: order `i` is created at `span * i / n` plus up to
/// one `slot`, in milliseconds.
struct Grid {
    n: u64,
    span: u64,
    slot: u64,
    ttl: u64,
}

impl Builder<'_> {
    /// The customer of a valid order: skewed over the population, or none (a few percent).
    fn customer(&mut self) -> Option<String> {
        if self.shape.customers == 0 || self.rng.chance(self.shape.no_customer_share) {
            return None;
        }
        Some(format!(
            "c-{}",
            self.rng.skewed(self.shape.customers as u64)
        ))
    }

    /// Valid order `i`: its `order_created` (sometimes twice, sometimes again with other
    /// items; always with the same customer), then what its [`Fate`] makes of it. Without
    /// a customer, an order for a limited product is `invalid_order`.
    fn valid_order(&mut self, i: usize, g: &Grid) -> PlannedOrder {
        let id = format!("o-{i}");
        let t = ms(g.span * i as u64 / g.n + self.rng.range(0, g.slot));
        let customer = self.customer();
        let items = self.items();
        let c = customer.as_deref();
        self.push(t, &id, created_json(&id, c, &items), EventKind::Created);
        let limited = self.shape.hot_limit.is_some() && items.iter().any(|it| it.product_id == HOT);
        let expect = if customer.is_none() && limited {
            Expect::Invalid
        } else {
            Expect::Valid
        };
        let mut o = planned(id.clone(), items.clone(), expect);
        o.customer = customer.clone();
        let c = customer.as_deref();
        if self.rng.chance(0.03) {
            let at = t + ms(self.rng.range(1, 400));
            self.push(
                at,
                &id,
                created_json(&id, c, &items),
                EventKind::DuplicateCreated,
            );
            o.created += 1;
        }
        if self.rng.chance(0.01) {
            let other = self.items();
            let at = t + ms(self.rng.range(1, 400));
            self.push(
                at,
                &id,
                created_json(&id, c, &other),
                EventKind::VariantCreated,
            );
            o.created += 1;
            o.variants += 1;
        }
        self.fate(&mut o, t, g.ttl);
        o
    }

    /// Draws what happens to order `o` created at `t` (pay or cancel, quick, racing the
    /// TTL or late; cancel then pay; nothing) and plans its events.
    fn fate(&mut self, o: &mut PlannedOrder, t: Duration, ttl: u64) {
        let id = o.id.clone();
        let r = self.rng.unit();
        let racing = |rng: &mut Rng| (ttl + rng.range(0, 2000)).saturating_sub(1000).max(200);
        let late = |rng: &mut Rng| ttl + rng.range(2000, 4000);
        let quick = |rng: &mut Rng| rng.range(200, 1500);
        let (fate, pay_at, cancel_at) = if r < 0.30 {
            (Fate::PayQuick, Some(quick(self.rng)), None)
        } else if r < 0.40 {
            (Fate::PayRacing, Some(racing(self.rng)), None)
        } else if r < 0.45 {
            (Fate::PayLate, Some(late(self.rng)), None)
        } else if r < 0.55 {
            (Fate::CancelQuick, None, Some(quick(self.rng)))
        } else if r < 0.58 {
            (Fate::CancelLate, None, Some(late(self.rng)))
        } else if r < 0.60 {
            let c = self.rng.range(200, 800);
            (
                Fate::CancelThenPay,
                Some(c + self.rng.range(400, 1200)),
                Some(c),
            )
        } else {
            (Fate::Abandoned, None, None)
        };
        o.fate = fate;
        if let Some(c) = cancel_at {
            self.push(
                t + ms(c),
                &id,
                crate::harness::cancelled(&id),
                EventKind::Cancelled,
            );
            o.cancels += 1;
        }
        if let Some(p) = pay_at {
            self.push(t + ms(p), &id, crate::harness::paid(&id), EventKind::Paid);
            o.pays += 1;
            if self.rng.chance(0.15) {
                let again = t + ms(p + self.rng.range(100, 1500));
                self.push(
                    again,
                    &id,
                    crate::harness::paid(&id),
                    EventKind::DuplicatePaid,
                );
                o.pays += 1;
            }
        }
    }

    /// Invalid order `i`: a readable id, a broken rule (one of seven, in turn).
    fn invalid_order(&mut self, i: usize, span: u64) -> PlannedOrder {
        let t = ms(self.rng.range(0, span));
        let mut id = format!("inv-{i}");
        let ok = json!([{"product_id": 2, "quantity": 1}]);
        let body = match i % 7 {
            0 => {
                json!({"type":"order_created","order_id":id,"items":[{"product_id":2,"quantity":0}]})
            }
            1 => {
                id = format!("bad id {i}");
                json!({"type":"order_created","order_id":id,"items":ok})
            }
            2 => json!({"type":"order_created","order_id":id,"items":[]}),
            3 => json!({"type":"order_created","order_id":id,
                         "items":[{"product_id":2,"quantity":1},{"product_id":2,"quantity":2}]}),
            4 => {
                json!({"type":"order_created","order_id":id,"items":[{"product_id":2,"quantity":1_000_001}]})
            }
            5 => {
                json!({"type":"order_created","order_id":id,"items":[{"product_id":0,"quantity":1}]})
            }
            _ => json!({"type":"order_created","order_id":id}),
        };
        self.push(t, &id, body.to_string().into_bytes(), EventKind::Invalid);
        let mut o = planned(id.clone(), Vec::new(), Expect::Invalid);
        if i % 7 == 1 {
            // A pay for an id that breaks the rules: ignored/not_reserved.
            let body = json!({"type":"order_paid","order_id":id}).to_string();
            self.push(t + ms(300), &id, body.into_bytes(), EventKind::Invalid);
            o.pays += 1;
            o.fate = Fate::PayQuick;
        }
        o
    }

    /// Order `i` naming a product that does not exist (every other one with a tail
    /// product first).
    fn unknown_product_order(&mut self, i: usize, span: u64) -> PlannedOrder {
        let t = ms(self.rng.range(0, span));
        let id = format!("unk-{i}");
        let mut items = Vec::new();
        if i % 2 == 1 {
            let p = self.tail();
            items.push(Item {
                product_id: p,
                quantity: 1,
            });
            *self.demand.entry(p).or_insert(0) += 1;
        }
        items.push(Item {
            product_id: MISSING_PRODUCT,
            quantity: 1,
        });
        self.push(
            t,
            &id,
            created_json(&id, None, &items),
            EventKind::UnknownProduct,
        );
        planned(id, items, Expect::UnknownProduct(MISSING_PRODUCT))
    }

    /// Unparseable message `i` (one of seven kinds of bytes that are no order event), the
    /// `index`-th of the plan's junk.
    fn junk(&mut self, i: usize, span: u64, index: usize) -> Junk {
        let key = format!("junk-{i}");
        let (what, bytes): (&'static str, Vec<u8>) = match i % 7 {
            0 => ("not JSON", format!("not json {i}").into_bytes()),
            1 => (
                "unknown type",
                json!({"type":"order_shipped","order_id":key})
                    .to_string()
                    .into_bytes(),
            ),
            2 => (
                "no order_id",
                json!({"type":"order_created","items":[{"product_id":2,"quantity":1}]})
                    .to_string()
                    .into_bytes(),
            ),
            3 => (
                "order_id not a string",
                json!({"type":"order_created","order_id":i})
                    .to_string()
                    .into_bytes(),
            ),
            4 => ("not an object", b"[1,2,3]".to_vec()),
            5 => ("not UTF-8", vec![0xff, 0xfe, 0x00, (i % 251) as u8, b'{']),
            _ => ("no type", json!({"order_id":key}).to_string().into_bytes()),
        };
        let t = ms(self.rng.range(0, span));
        self.push(t, &key, bytes.clone(), EventKind::Junk(index));
        Junk { key, bytes, what }
    }
}

/// Generates the workload of `shape` from `rng`: the valid orders over the run's span,
/// then invalid orders, orders for a missing product and unparseable messages at random
/// times, and the stock that makes the hot SKU sell out and the tail never run short.
pub fn generate(shape: &WorkloadShape, rng: &mut Rng) -> Plan {
    let mut b = Builder {
        rng,
        shape,
        demand: BTreeMap::new(),
        events: Vec::new(),
        seq: 0,
    };
    let n = shape.orders.max(1);
    let span = shape.duration.as_millis().max(1) as u64;
    let grid = Grid {
        n: n as u64,
        span,
        slot: (span / n as u64).max(1),
        ttl: shape.ttl.as_millis() as u64,
    };
    let mut orders = Vec::with_capacity(n + n / 50);
    for i in 0..shape.orders {
        orders.push(b.valid_order(i, &grid));
    }
    for i in 0..(shape.orders / 200).max(7) {
        orders.push(b.invalid_order(i, span));
    }
    for i in 0..(shape.orders / 500).max(2) {
        orders.push(b.unknown_product_order(i, span));
    }
    let mut junk = Vec::new();
    for i in 0..(shape.orders / 300).max(7) {
        let j = b.junk(i, span, junk.len());
        junk.push(j);
    }

    let mut stock = BTreeMap::new();
    let hot_demand = b.demand.get(&HOT).copied().unwrap_or(0);
    stock.insert(
        HOT,
        ((hot_demand as f64 * shape.hot_stock_share) as i64).max(10),
    );
    for p in 2..=(shape.products as i64 + 1) {
        // More than every order naming it could take: a tail product is never short.
        stock.insert(p, b.demand.get(&p).copied().unwrap_or(0) + 5);
    }

    let mut events = b.events;
    events.sort_by_key(|(at, seq, _)| (*at, *seq));
    let events: Vec<Event> = events.into_iter().map(|(_, _, e)| e).collect();
    let index = orders
        .iter()
        .enumerate()
        .map(|(i, o)| (o.id.clone(), i))
        .collect();
    let limits = shape.hot_limit.map(|l| (HOT, l)).into_iter().collect();
    Plan {
        orders,
        index,
        junk,
        events,
        stock,
        limits,
    }
}

/// Plays `events` onto `topic` at their times (from `start`), waiting for every delivery
/// report. Returns each event's (partition, offset). Progress goes into `published`.
///
/// The client is this function's own ([`Publisher`]): one that stalls after a broker
/// restart (no delivery report for [`STALL`], librdkafka's re-bootstrap, see DESIGN) is
/// replaced, as the workers' stall watch replaces theirs, instead of waiting for good.
pub async fn play(
    kafka: &KafkaArgs,
    topic: &str,
    events: &[Event],
    start: Instant,
    published: &AtomicUsize,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<Option<(i32, i64)>>> {
    let mut publisher = Publisher::new(kafka)?;
    let mut positions = vec![None; events.len()];
    let mut next = 0;
    while next < events.len() {
        let now = start.elapsed();
        let end = next + events[next..].partition_point(|e| e.at <= now);
        if end > next {
            let got = publish_tracked(&mut publisher, topic, &events[next..end], stop).await?;
            positions[next..end].copy_from_slice(&got);
            published.store(end, Ordering::Relaxed);
            next = end;
            continue;
        }
        let wait = events[next].at.saturating_sub(now).min(ms(100));
        tokio::select! {
            _ = stop.cancelled() => anyhow::bail!("workload stopped"),
            _ = tokio::time::sleep(wait) => {}
        }
    }
    Ok(positions)
}

/// How long the workload waits for a batch's delivery reports before it takes its client
/// for stalled and sends what is not acknowledged again with a new one.
pub const STALL: Duration = Duration::from_secs(60);

/// The workload's Kafka client, replaced when it stalls.
struct Publisher<'a> {
    kafka: &'a KafkaArgs,
    producer: FutureProducer,
}

impl<'a> Publisher<'a> {
    fn new(kafka: &'a KafkaArgs) -> anyhow::Result<Self> {
        Ok(Self {
            kafka,
            producer: stock_common::kafka::producer(kafka)?,
        })
    }

    /// A new client in place of a stalled one. The stalled one is left as it is, never
    /// dropped: its destructor would wait on the very threads that are stuck.
    fn replace(&mut self) -> anyhow::Result<()> {
        let fresh = stock_common::kafka::producer(self.kafka)?;
        std::mem::forget(std::mem::replace(&mut self.producer, fresh));
        Ok(())
    }
}

/// Publishes `events` in order and waits for every delivery report; a failed delivery is
/// sent again (with capped backoff) until it is acknowledged, with a new client if the
/// reports did not come within [`STALL`].
async fn publish_tracked(
    publisher: &mut Publisher<'_>,
    topic: &str,
    events: &[Event],
    stop: &CancellationToken,
) -> anyhow::Result<Vec<Option<(i32, i64)>>> {
    let mut positions = vec![None; events.len()];
    let mut pending: Vec<usize> = (0..events.len()).collect();
    let mut delay = ms(100);
    loop {
        let producer = &publisher.producer;
        let mut futures = Vec::with_capacity(pending.len());
        for &i in &pending {
            let e = &events[i];
            loop {
                let rec = FutureRecord::to(topic)
                    .key(e.key.as_str())
                    .payload(&e.payload[..]);
                match producer.send_result(rec) {
                    Ok(f) => {
                        futures.push((i, f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(ms(5)).await;
                    }
                    Err((err, _)) => {
                        if let Some((code, reason)) = producer.client().fatal_error() {
                            anyhow::bail!("workload producer: fatal {code:?}: {reason}");
                        }
                        tracing::warn!(error = %err, "workload: cannot enqueue; retrying");
                        tokio::time::sleep(ms(200)).await;
                    }
                }
            }
        }
        let mut failed = Vec::new();
        let deadline = Instant::now() + STALL;
        let mut stalled = false;
        for (i, f) in futures {
            if stalled {
                failed.push(i);
                continue;
            }
            match tokio::time::timeout_at(deadline, f).await {
                Ok(Ok(Ok(d))) => positions[i] = Some((d.partition, d.offset)),
                Ok(Ok(Err((err, _)))) => {
                    tracing::warn!(error = %err, "workload: delivery failed; resending");
                    failed.push(i);
                }
                Ok(Err(_)) => failed.push(i),
                Err(_) => {
                    stalled = true;
                    failed.push(i);
                }
            }
        }
        if stalled {
            tracing::warn!(
                unacknowledged = failed.len(),
                "workload: no delivery report in {STALL:?}; a new client sends them again"
            );
            publisher.replace()?;
        }
        if failed.is_empty() {
            return Ok(positions);
        }
        if stop.is_cancelled() {
            anyhow::bail!("workload stopped");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        pending = failed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> WorkloadShape {
        WorkloadShape {
            orders: 2000,
            products: 50,
            hot_share: 0.3,
            hot_stock_share: 0.3,
            multi_share: 0.25,
            ttl: Duration::from_secs(4),
            duration: Duration::from_secs(20),
            customers: 300,
            no_customer_share: 0.03,
            hot_limit: Some(2),
        }
    }

    #[test]
    fn plan_is_deterministic_and_consistent() {
        let a = generate(&shape(), &mut Rng::new(3));
        let b = generate(&shape(), &mut Rng::new(3));
        assert_eq!(a.events.len(), b.events.len());
        assert!(a
            .events
            .iter()
            .zip(&b.events)
            .all(|(x, y)| x.payload == y.payload));
        assert!(a.events.windows(2).all(|w| w[0].at <= w[1].at));
        // Each order's first event is its first order_created.
        let mut first: HashMap<&str, &Event> = HashMap::new();
        for e in &a.events {
            first.entry(e.key.as_str()).or_insert(e);
        }
        for o in &a.orders {
            let e = first[o.id.as_str()];
            assert!(matches!(
                e.kind,
                EventKind::Created | EventKind::Invalid | EventKind::UnknownProduct
            ));
            if o.id.starts_with("o-") {
                assert_eq!(
                    e.payload,
                    created_json(&o.id, o.customer.as_deref(), &o.items)
                );
                // Without a customer, an order for the limited hot SKU is invalid.
                let hot = o.items.iter().any(|it| it.product_id == HOT);
                let invalid = o.customer.is_none() && hot;
                assert_eq!(o.expect == Expect::Invalid, invalid, "{}", o.id);
            }
        }
        // Tail stock covers every order that names the product.
        let mut demand: BTreeMap<i64, i64> = BTreeMap::new();
        for e in a.events.iter().filter(|e| {
            // A duplicate never deducts again: the first event of each id counts.
            matches!(
                e.kind,
                EventKind::Created | EventKind::VariantCreated | EventKind::UnknownProduct
            )
        }) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&e.payload) {
                if let Some(items) = v.get("items").and_then(|i| i.as_array()) {
                    for it in items {
                        let p = it["product_id"].as_i64().unwrap_or(0);
                        let q = it["quantity"].as_i64().unwrap_or(0);
                        if p > 1 && p != MISSING_PRODUCT && q > 0 && q <= 3 {
                            *demand.entry(p).or_insert(0) += q;
                        }
                    }
                }
            }
        }
        for (p, d) in demand {
            if a.stock.contains_key(&p) {
                assert!(a.stock[&p] > d, "product {p}");
            }
        }
        assert!(a.junk.len() >= 7);
        assert_eq!(a.limits, [(HOT, 2)].into_iter().collect());
        let valid = a.orders.iter().filter(|o| o.id.starts_with("o-"));
        let without = valid.clone().filter(|o| o.customer.is_none()).count();
        assert!(
            (20..120).contains(&without),
            "{without} orders without customer"
        );
        // Skewed: the first fifth of the customers sends about four fifths of the orders.
        let heavy = valid
            .filter_map(|o| {
                o.customer
                    .as_deref()?
                    .strip_prefix("c-")?
                    .parse::<usize>()
                    .ok()
            })
            .filter(|&c| c < 60)
            .count();
        assert!(
            (1450..1650).contains(&heavy),
            "{heavy} orders of the busiest fifth"
        );
        assert!(a.stock[&HOT] >= 10);
    }
}
