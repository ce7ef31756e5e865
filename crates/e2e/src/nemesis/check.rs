//! The checker: once the pipeline is idle, everything observable — the results topic, the
//! dead-letter topic, `order_ledger`, `stock`, `stock_movement` and Redis — is compared
//! with what the workload sent and with the contract's six guarantees, per order and per
//! product. Every disagreement is a [`Violation`] with a kind (`G1.…` to `G6.…` for the
//! guarantees, `L.…` for the order lifecycle, `LIM.…` for per-customer limits) and the
//! evidence.
//!
//! Per-customer limits (contract "Per-customer limits", [`check_limits`]) are checked three
//! ways: the final state (no customer above a limit in the ledger, PostgreSQL's
//! `customer_units` and Redis' buyers hash equal to the ledger's sums), the counts sampled
//! in both stores during the run ([`Sampled`]: never above a limit), and the results
//! (`limit_exceeded` only for a limited product of the order, with a customer; no
//! customer on a limited product is `invalid_order`).

use super::workload::{Expect, Fate, Plan, HOT};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use stock_common::events::{Item, Reason, Status, StockResult};
use stockctl::admin::{StockRow, Violation as InvariantViolation};

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    pub kind: String,
    pub detail: String,
}

/// An `order_ledger` row.
#[derive(Debug, Clone)]
pub struct LedgerRec {
    pub status: String,
    pub reject_reason: Option<String>,
    pub reject_product: Option<i64>,
    pub release_reason: Option<String>,
    pub items: Vec<Item>,
    pub announced: bool,
    /// The customer of the first decision.
    pub customer_id: Option<String>,
}

/// One product's element of a `stock_movement` row (`stock_movement_item`): one product,
/// one kind, summing `orders` orders of a batch.
#[derive(Debug, Clone)]
pub struct Mov {
    pub product_id: i64,
    pub kind: String,
    pub reference: String,
    pub orders: i64,
    pub quantity: i64,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

/// A message of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DlqMsg {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// Everything read back once the pipeline is idle.
#[derive(Debug, Default)]
pub struct Observed {
    pub outcomes: HashMap<String, Vec<StockResult>>,
    pub result_messages: usize,
    pub unparsed_results: usize,
    pub ledger: HashMap<String, LedgerRec>,
    pub movements: Vec<Mov>,
    pub stock: Vec<StockRow>,
    /// `stockctl::admin::check_invariants` over every product (guarantees 1 and 3).
    pub invariants: Vec<InvariantViolation>,
    pub redis_loaded: bool,
    pub dlq: Vec<DlqMsg>,
    pub orders_topic: String,
    /// Where each junk message of the plan was written (partition, offset).
    pub junk_positions: Vec<Option<(i32, i64)>>,
    /// Per-customer limits and counts, once idle, and as sampled during the run.
    pub limits: LimitsObserved,
}

/// A (product, customer) pair.
pub type Buyer = (i64, String);

/// A buyers hash as read from Redis: (limit, customer -> units).
pub type RedisBuyers = (i64, BTreeMap<String, i64>);

/// The limits and the customers' counts of both stores.
#[derive(Debug, Default, Clone)]
pub struct LimitsObserved {
    /// `product_limit`: product -> per-customer limit.
    pub pg_limits: BTreeMap<i64, i64>,
    /// `customer_units` (rows above 0).
    pub pg_units: BTreeMap<Buyer, i64>,
    /// Per product of the plan's limits, its buyers hash in Redis: (limit, customer ->
    /// units), `None` when the hash is missing.
    pub redis: BTreeMap<i64, Option<RedisBuyers>>,
    /// What `stockctl`'s limit drift check reported (PostgreSQL against Redis).
    pub drift: Vec<String>,
    pub sampled: Sampled,
}

/// The counts sampled in both stores while the run went on (about once a second, from the
/// start of the workload to the idle pipeline): the highest each customer reached.
#[derive(Debug, Default, Clone)]
pub struct Sampled {
    pub pg_samples: usize,
    pub redis_samples: usize,
    /// Samples that could not be taken (a store down during a fault).
    pub failed: usize,
    pub pg_max: BTreeMap<Buyer, i64>,
    pub redis_max: BTreeMap<Buyer, i64>,
}

impl Sampled {
    /// Keeps the highest count seen of each buyer.
    pub fn record(max: &mut BTreeMap<Buyer, i64>, rows: impl IntoIterator<Item = (Buyer, i64)>) {
        for (k, n) in rows {
            let e = max.entry(k).or_insert(n);
            *e = (*e).max(n);
        }
    }
}

/// The figures of the limits in a run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LimitFigures {
    /// product -> per-customer limit.
    pub limits: BTreeMap<i64, i64>,
    /// Orders refused `limit_exceeded`.
    pub limit_exceeded: usize,
    /// Valid orders sent without `customer_id`; of those, for a limited product (each must
    /// be `invalid_order`).
    pub without_customer: usize,
    pub without_customer_limited: usize,
    /// Customers holding units of a limited product at the end, and at its limit.
    pub customers_holding: usize,
    pub customers_at_limit: usize,
    /// Samples taken during the run (PostgreSQL, Redis, failed).
    pub samples_pg: usize,
    pub samples_redis: usize,
    pub samples_failed: usize,
    /// The highest count sampled, in PostgreSQL and in Redis.
    pub max_sampled_pg: i64,
    pub max_sampled_redis: i64,
    /// Customers seen at their limit in some sample (PostgreSQL).
    pub customers_seen_at_limit: usize,
}

/// The checker's verdict and the figures of the run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Findings {
    pub violations: Vec<Violation>,
    /// Distinct results per order, by `status[/reason]`.
    pub outcomes: BTreeMap<String, usize>,
    /// Final state of the orders that reached PostgreSQL.
    pub ledger: BTreeMap<String, usize>,
    /// What became of the valid orders, by what the workload did with them.
    pub lifecycle: BTreeMap<String, usize>,
    pub limits: LimitFigures,
}

fn status_str(s: Status) -> &'static str {
    match s {
        Status::Reserved => "reserved",
        Status::Rejected => "rejected",
        Status::Confirmed => "confirmed",
        Status::Released => "released",
        Status::Ignored => "ignored",
    }
}

/// `status[/reason]` of a result.
pub fn outcome_key(r: &StockResult) -> String {
    match r.reason {
        Some(reason) => format!("{}/{}", status_str(r.status), reason),
        None => status_str(r.status).to_owned(),
    }
}

fn ledger_key(l: &LedgerRec) -> String {
    match (&l.reject_reason, &l.release_reason) {
        (Some(r), _) => format!("{}/{r}", l.status),
        (_, Some(r)) => format!("{}/{r}", l.status),
        _ => l.status.clone(),
    }
}

fn sorted(items: &[Item]) -> Vec<(i64, i64)> {
    let mut v: Vec<(i64, i64)> = items.iter().map(|i| (i.product_id, i.quantity)).collect();
    v.sort_unstable();
    v
}

struct Out {
    v: Vec<Violation>,
}

impl Out {
    fn add(&mut self, kind: &str, detail: String) {
        self.v.push(Violation {
            kind: kind.to_owned(),
            detail,
        });
    }
}

/// Checks `obs` against `plan` and the contract.
pub fn check(plan: &Plan, obs: &Observed) -> Findings {
    let mut out = Out { v: Vec::new() };
    let mut f = Findings::default();
    let stock: HashMap<i64, &StockRow> = obs.stock.iter().map(|r| (r.product_id, r)).collect();
    let empty: Vec<StockResult> = Vec::new();

    for o in &plan.orders {
        let rs = obs.outcomes.get(&o.id).unwrap_or(&empty);
        let distinct: HashSet<&StockResult> = rs.iter().collect();
        for r in &distinct {
            *f.outcomes.entry(outcome_key(r)).or_insert(0) += 1;
        }
        let ledger = obs.ledger.get(&o.id);
        if let Some(l) = ledger {
            *f.ledger.entry(ledger_key(l)).or_insert(0) += 1;
        }
        check_created(o, &distinct, ledger, &stock, &plan.limits, &mut out);
        check_lifecycle(o, &distinct, ledger, &mut out, &mut f);
    }

    // Results, ledger rows and movements of ids the workload never sent.
    let junk_keys: HashSet<&str> = plan.junk.iter().map(|j| j.key.as_str()).collect();
    for (id, rs) in &obs.outcomes {
        if plan.order(id).is_none() {
            let kind = if junk_keys.contains(id.as_str()) {
                "G5.junk_got_a_result"
            } else {
                "G4.result_for_unknown_order"
            };
            out.add(kind, format!("{id}: {rs:?}"));
        }
    }
    if obs.unparsed_results > 0 {
        out.add(
            "G4.unreadable_result",
            format!(
                "{} messages on the results topic are not results",
                obs.unparsed_results
            ),
        );
    }
    for id in obs.ledger.keys() {
        if plan.order(id).is_none() {
            out.add("G2.ledger_row_for_unknown_order", id.clone());
        }
    }
    out.v
        .extend(history_disagreements(&obs.movements, &obs.ledger));
    check_products(plan, obs, &mut out);
    check_dlq(plan, obs, &mut out);
    check_limits(plan, obs, &mut out, &mut f);
    f.violations = out.v;
    f
}

/// Guarantee 4 (one outcome per `order_created`) and the outcome's agreement with the
/// ledger; guarantee 6's "nothing wrongly rejected".
fn check_created(
    o: &super::workload::PlannedOrder,
    distinct: &HashSet<&StockResult>,
    ledger: Option<&LedgerRec>,
    stock: &HashMap<i64, &StockRow>,
    limits: &BTreeMap<i64, i64>,
    out: &mut Out,
) {
    let created: Vec<&StockResult> = distinct
        .iter()
        .copied()
        .filter(|r| matches!(r.status, Status::Reserved | Status::Rejected))
        .collect();
    let id = &o.id;
    if created.is_empty() {
        out.add("G4.no_outcome", format!("{id}: results {distinct:?}"));
        return;
    }
    if created.len() > 1 {
        out.add("G4.conflicting_outcomes", format!("{id}: {created:?}"));
    }
    for c in created {
        match o.expect {
            Expect::Invalid => {
                if !(c.status == Status::Rejected && c.reason == Some(Reason::InvalidOrder)) {
                    out.add("G4.wrong_outcome", format!("{id} (invalid order): {c:?}"));
                }
            }
            Expect::UnknownProduct(p) => {
                if !(c.status == Status::Rejected
                    && c.reason == Some(Reason::UnknownProduct)
                    && c.product_id == Some(p))
                {
                    out.add(
                        "G4.wrong_outcome",
                        format!("{id} (names missing product {p}): {c:?}"),
                    );
                }
            }
            Expect::Valid => match (c.status, c.reason) {
                (Status::Reserved, _) => match ledger {
                    None => out.add(
                        "G4.reserved_not_in_ledger",
                        format!("{id}: `reserved` but PostgreSQL has no ledger row"),
                    ),
                    Some(l) if l.status == "rejected" => out.add(
                        "G4.reserved_but_ledger_rejected",
                        format!("{id}: `reserved` but the ledger says {}", ledger_key(l)),
                    ),
                    Some(l) => {
                        if sorted(&l.items) != sorted(&o.items) {
                            out.add(
                                "G4.items_differ_from_first_event",
                                format!(
                                    "{id}: sent {:?} first, ledger holds {:?}",
                                    o.items, l.items
                                ),
                            );
                        }
                    }
                },
                (Status::Rejected, Some(Reason::InsufficientStock)) => {
                    let names_hot = c.product_id == Some(HOT);
                    let has_hot = o.items.iter().any(|i| i.product_id == HOT);
                    if !(names_hot && has_hot) {
                        out.add(
                            "G6.wrongly_rejected",
                            format!(
                                "{id} {:?}: insufficient_stock naming {:?}, a product that always had enough",
                                o.items, c.product_id
                            ),
                        );
                    }
                }
                (Status::Rejected, Some(Reason::LimitExceeded)) => {
                    // Only for a limited product of the order, and only for an order with a
                    // customer (without one, the order is invalid_order).
                    let named = c.product_id.filter(|p| limits.contains_key(p));
                    let in_order = named.is_some_and(|p| o.items.iter().any(|i| i.product_id == p));
                    if !(in_order && o.customer.is_some()) {
                        out.add(
                            "LIM.wrong_limit_exceeded",
                            format!(
                                "{id} {:?} (customer {:?}): limit_exceeded naming {:?}, limits {limits:?}",
                                o.items, o.customer, c.product_id
                            ),
                        );
                    }
                }
                (Status::Rejected, Some(Reason::UnknownProduct)) => {
                    let exists = c.product_id.is_some_and(|p| stock.contains_key(&p));
                    out.add(
                        if exists {
                            "G6.wrongly_rejected"
                        } else {
                            "G4.wrong_outcome"
                        },
                        format!("{id} {:?}: unknown_product {:?}", o.items, c.product_id),
                    );
                }
                _ => out.add("G4.wrong_outcome", format!("{id} {:?}: {c:?}", o.items)),
            },
        }
        if c.status == Status::Rejected {
            if let Some(l) = ledger {
                let same = l.status == "rejected"
                    && l.reject_reason.as_deref() == c.reason.map(Reason::as_str)
                    && l.reject_product == c.product_id;
                if !same {
                    out.add(
                        "G4.result_disagrees_with_ledger",
                        format!(
                            "{id}: result {c:?}, ledger {} {:?}",
                            ledger_key(l),
                            l.reject_product
                        ),
                    );
                }
            }
        }
    }
    if let Some(l) = ledger {
        // A refusal Redis decided is recorded without items and without customer; every
        // order PostgreSQL decided keeps the customer it was sent with.
        let decided_by_pg = !l.items.is_empty();
        if (decided_by_pg || l.customer_id.is_some()) && l.customer_id != o.customer {
            out.add(
                "LIM.ledger_customer_differs",
                format!(
                    "{id}: sent customer {:?}, ledger {:?}",
                    o.customer, l.customer_id
                ),
            );
        }
    }
    if o.expect != Expect::Valid {
        // Every refusal is recorded in the ledger (the order's outcome for good); it must be
        // the refusal the order deserves, and nothing else.
        if let Some(l) = ledger {
            let reason = match o.expect {
                Expect::UnknownProduct(_) => Some("unknown_product"),
                Expect::Invalid => Some("invalid_order"),
                Expect::Valid => None,
            };
            let ok = l.status == "rejected" && l.reject_reason.as_deref() == reason;
            if !ok {
                out.add(
                    "G2.refused_order_in_ledger",
                    format!("{id} ({:?}): ledger {}", o.expect, ledger_key(l)),
                );
            }
        }
    }
}

/// Pay, cancel and expiry: one settlement per order, agreeing with the ledger; every
/// pay/cancel answered; late ones ignored with the right reason.
fn check_lifecycle(
    o: &super::workload::PlannedOrder,
    distinct: &HashSet<&StockResult>,
    ledger: Option<&LedgerRec>,
    out: &mut Out,
    f: &mut Findings,
) {
    let id = &o.id;
    let has =
        |s: Status, r: Option<Reason>| distinct.iter().any(|x| x.status == s && x.reason == r);
    let confirmed = has(Status::Confirmed, None);
    let cancelled = has(Status::Released, Some(Reason::Cancelled));
    let expired = has(Status::Released, Some(Reason::Expired));
    let settlements = [confirmed, cancelled, expired]
        .iter()
        .filter(|b| **b)
        .count();
    if settlements > 1 {
        out.add(
            "L.confirmed_and_released",
            format!("{id}: confirmed={confirmed} cancelled={cancelled} expired={expired}"),
        );
    }
    let status = ledger.map(|l| l.status.as_str());
    let release = ledger.and_then(|l| l.release_reason.as_deref());
    match (status, release) {
        (Some("reserved"), _) => out.add(
            "L.never_settled",
            format!("{id}: still reserved once idle (TTL long past)"),
        ),
        (Some("confirmed"), _) => {
            if !confirmed || cancelled || expired {
                out.add(
                    "L.result_disagrees_with_ledger",
                    format!("{id}: ledger confirmed, results {distinct:?}"),
                );
            }
        }
        (Some("released"), Some("cancelled")) => {
            if !cancelled || confirmed || expired {
                out.add(
                    "L.result_disagrees_with_ledger",
                    format!("{id}: ledger released/cancelled, results {distinct:?}"),
                );
            }
        }
        (Some("released"), Some("expired")) => {
            if !expired || confirmed || cancelled {
                out.add(
                    "L.result_disagrees_with_ledger",
                    format!("{id}: ledger released/expired, results {distinct:?}"),
                );
            }
        }
        (Some("released"), other) => out.add(
            "L.result_disagrees_with_ledger",
            format!("{id}: ledger released with reason {other:?}"),
        ),
        _ => {
            if settlements > 0 {
                out.add(
                    "L.settled_without_reservation",
                    format!("{id}: ledger {status:?}, results {distinct:?}"),
                );
            }
        }
    }
    if let Some(l) = ledger {
        if !l.announced {
            out.add(
                "L.release_not_announced",
                format!("{id}: announced = false once idle"),
            );
        }
    }
    for r in distinct.iter().filter(|r| r.status == Status::Ignored) {
        let ok = match r.reason {
            Some(Reason::AlreadyConfirmed) => status == Some("confirmed"),
            Some(Reason::AlreadyReleased) => status == Some("released"),
            Some(Reason::NotReserved) => matches!(status, None | Some("rejected")),
            _ => false,
        };
        if !ok {
            let kind = if r.reason == Some(Reason::NotReserved) {
                // A pay or cancel sent after its order_created (and after its delivery
                // report) reached PostgreSQL before the reservation did.
                "L.pay_or_cancel_overtook_its_order"
            } else {
                "L.ignored_with_wrong_reason"
            };
            out.add(
                kind,
                format!("{id}: {} while the ledger says {status:?}", outcome_key(r)),
            );
        }
    }
    if o.pays + o.cancels > 0 {
        let answered =
            confirmed || cancelled || distinct.iter().any(|r| r.status == Status::Ignored);
        if !answered {
            out.add(
                "L.pay_or_cancel_unanswered",
                format!(
                    "{id}: {} pays, {} cancels, results {distinct:?}",
                    o.pays, o.cancels
                ),
            );
        }
        let ignored = |reason| has(Status::Ignored, Some(reason));
        if o.pays > 0 && status == Some("released") && !ignored(Reason::AlreadyReleased) {
            out.add(
                "L.late_pay_not_ignored",
                format!("{id}: released ({release:?}) but its pay got {distinct:?}"),
            );
        }
        let more_than_one = o.pays + o.cancels > 1;
        if status == Some("confirmed") && more_than_one && !ignored(Reason::AlreadyConfirmed) {
            out.add(
                "L.second_settle_not_ignored",
                format!(
                    "{id}: confirmed, {} pays {} cancels, results {distinct:?}",
                    o.pays, o.cancels
                ),
            );
        }
    }
    if o.expect == Expect::Valid {
        let end = match (status, release) {
            (None, _) => "refused by Redis".to_owned(),
            (Some(s), Some(r)) => format!("{s}/{r}"),
            (Some(s), None) => s.to_owned(),
        };
        let late_pay = o.pays > 0 && status == Some("released");
        let key = format!(
            "{:?} -> {end}{}",
            o.fate,
            if late_pay { " (pay ignored)" } else { "" }
        );
        *f.lifecycle.entry(key).or_insert(0) += 1;
        if o.fate == Fate::Abandoned && status == Some("confirmed") {
            out.add(
                "L.confirmed_without_pay",
                format!("{id}: never paid, ledger confirmed"),
            );
        }
    }
}

/// Guarantee 2 in the history: every row's deltas are its kind's, and per product and
/// kind the rows sum exactly the ledger's orders — each order that was reserved counted
/// once in `reserve`, each settled one once in its settlement, each refusal PostgreSQL
/// made (a pre-deduction given back) once in `compensation`. An order applied twice, or a
/// movement of an order the ledger does not hold, makes a count or a sum differ.
pub fn history_disagreements(
    movements: &[Mov],
    ledger: &HashMap<String, LedgerRec>,
) -> Vec<Violation> {
    let mut out = Out { v: Vec::new() };
    for m in movements {
        let q = m.quantity;
        let expected = match m.kind.as_str() {
            "reserve" => (-q, q, 0),
            "confirm" => (0, -q, q),
            "release_cancelled" | "release_expired" => (q, -q, 0),
            "compensation" => (0, 0, 0),
            _ => (m.available, m.reserved, m.sold),
        };
        if (m.available, m.reserved, m.sold) != expected || m.orders < 1 {
            out.add("G2.movement_delta_wrong", format!("{m:?}"));
        }
    }
    // (product, kind) -> (orders, units), from the history and from the ledger.
    let mut moved: BTreeMap<(i64, &str), (i64, i64)> = BTreeMap::new();
    for m in movements {
        if matches!(m.kind.as_str(), "set" | "restock") {
            continue;
        }
        let e = moved.entry((m.product_id, m.kind.as_str())).or_default();
        e.0 += m.orders;
        e.1 += m.quantity;
    }
    let mut held: BTreeMap<(i64, &str), (i64, i64)> = BTreeMap::new();
    for l in ledger.values() {
        let mut kinds: Vec<&str> = Vec::new();
        match (l.status.as_str(), l.release_reason.as_deref()) {
            // A refusal by PostgreSQL keeps its items (its pre-deduction is given back); a
            // refusal by Redis or an invalid order has none.
            ("rejected", _) => kinds.push("compensation"),
            ("reserved", _) => kinds.push("reserve"),
            ("confirmed", _) => kinds.extend(["reserve", "confirm"]),
            ("released", Some("cancelled")) => kinds.extend(["reserve", "release_cancelled"]),
            ("released", Some("expired")) => kinds.extend(["reserve", "release_expired"]),
            _ => {}
        }
        for it in &l.items {
            for kind in &kinds {
                let e = held.entry((it.product_id, kind)).or_default();
                e.0 += 1;
                e.1 += it.quantity;
            }
        }
    }
    let keys: BTreeSet<(i64, &str)> = moved.keys().chain(held.keys()).copied().collect();
    for key @ (p, kind) in keys {
        let got = moved.get(&key).copied().unwrap_or_default();
        let want = held.get(&key).copied().unwrap_or_default();
        if got == want {
            continue;
        }
        let what = match kind {
            "reserve" if got.0 > want.0 => "G2.reserved_twice",
            "reserve" => "G2.reserve_movement_missing",
            "compensation" if got.0 > want.0 => "G2.refusal_recorded_twice",
            "compensation" => "G2.compensation_disagrees",
            _ if got.0 > want.0 => "G2.settled_twice",
            _ => "G2.settle_movement_disagrees",
        };
        out.add(
            what,
            format!(
                "product {p}, {kind}: the history sums {} orders ({} units), the ledger holds {} ({} units)",
                got.0, got.1, want.0, want.1
            ),
        );
    }
    out.v
}

/// Guarantees 1 to 3 per product: conservation and no negatives (PostgreSQL and Redis),
/// movements adding up to the columns, the columns equal to what the ledger holds, Redis
/// equal to `available`.
fn check_products(plan: &Plan, obs: &Observed, out: &mut Out) {
    for v in &obs.invariants {
        let kind = if v.what.starts_with("redis") && !v.what.starts_with("redis negative") {
            "G3.redis_differs_from_available"
        } else {
            "G1.invariant"
        };
        out.add(kind, format!("product {}: {}", v.product_id, v.what));
    }
    if !obs.redis_loaded {
        out.add(
            "G6.not_loaded_after_run",
            "stockpipe:loaded is missing once idle: selling is stopped".into(),
        );
    }
    #[derive(Default, Debug)]
    struct Sum {
        available: i64,
        reserved: i64,
        sold: i64,
        added: i64,
    }
    let mut sums: BTreeMap<i64, Sum> = BTreeMap::new();
    for m in &obs.movements {
        let s = sums.entry(m.product_id).or_default();
        s.available += m.available;
        s.reserved += m.reserved;
        s.sold += m.sold;
        if m.kind == "set" || m.kind == "restock" {
            s.added += m.available;
        }
    }
    let mut from_ledger: BTreeMap<i64, Sum> = BTreeMap::new();
    for l in obs.ledger.values() {
        for it in &l.items {
            let s = from_ledger.entry(it.product_id).or_default();
            match l.status.as_str() {
                "reserved" => {
                    s.reserved += it.quantity;
                    s.available -= it.quantity;
                }
                "confirmed" => {
                    s.sold += it.quantity;
                    s.available -= it.quantity;
                }
                _ => {}
            }
        }
    }
    let rows: HashMap<i64, &StockRow> = obs.stock.iter().map(|r| (r.product_id, r)).collect();
    for (&p, &initial) in &plan.stock {
        let Some(row) = rows.get(&p) else {
            out.add("G1.no_stock_row", format!("product {p}"));
            continue;
        };
        let m = sums.get(&p);
        let (ma, mr, ms, madded) =
            m.map_or((0, 0, 0, 0), |s| (s.available, s.reserved, s.sold, s.added));
        if (ma, mr, ms) != (row.available, row.reserved, row.sold) {
            out.add(
                "G2.movements_do_not_add_up",
                format!(
                    "product {p}: movements sum to available {ma} reserved {mr} sold {ms}, columns {row:?}"
                ),
            );
        }
        if row.total_added != initial || madded != initial {
            out.add(
                "G1.stock_added_changed",
                format!(
                    "product {p}: loaded {initial}, total_added {}, set/restock movements {madded}",
                    row.total_added
                ),
            );
        }
        let l = from_ledger.get(&p);
        let (la, lr, ls) = l.map_or((0, 0, 0), |s| (s.available, s.reserved, s.sold));
        let expected = (initial + la, lr, ls);
        if expected != (row.available, row.reserved, row.sold) {
            out.add(
                "G2.columns_differ_from_ledger",
                format!(
                    "product {p}: the ledger's orders make available {} reserved {} sold {}, columns {row:?}",
                    expected.0, expected.1, expected.2
                ),
            );
        }
    }
}

/// Per-customer limits (contract "Per-customer limits"): the final state, the samples of
/// the run, and the figures.
///
/// * Final state: per limited product and customer, the units of its `reserved` and
///   `confirmed` orders in the ledger are at most the limit; PostgreSQL's `customer_units`
///   and Redis' buyers hash (with the limit) equal those sums exactly; a held order of a
///   limited product has a customer; no held order asks more than the limit on its own;
///   `stockctl`'s limit drift check finds nothing.
/// * During the run: no sampled count above the limit, in either store.
fn check_limits(plan: &Plan, obs: &Observed, out: &mut Out, f: &mut Findings) {
    let lim = &obs.limits;
    let mut held: BTreeMap<Buyer, i64> = BTreeMap::new();
    let mut ids: Vec<&String> = obs.ledger.keys().collect();
    ids.sort();
    for id in ids {
        let l = &obs.ledger[id];
        if !matches!(l.status.as_str(), "reserved" | "confirmed") {
            continue;
        }
        for it in &l.items {
            let Some(&limit) = plan.limits.get(&it.product_id) else {
                continue;
            };
            if it.quantity > limit {
                out.add(
                    "LIM.held_order_above_limit_alone",
                    format!(
                        "{id}: {} units of product {} (limit {limit})",
                        it.quantity, it.product_id
                    ),
                );
            }
            match &l.customer_id {
                Some(c) => *held.entry((it.product_id, c.clone())).or_insert(0) += it.quantity,
                None => out.add(
                    "LIM.held_without_customer",
                    format!(
                        "{id}: {} holds product {} without a customer",
                        l.status, it.product_id
                    ),
                ),
            }
        }
    }
    for ((p, c), n) in &held {
        let limit = plan.limits.get(p).copied().unwrap_or(i64::MAX);
        if *n > limit {
            out.add(
                "LIM.ledger_above_limit",
                format!("customer {c} holds {n} units of product {p} (limit {limit})"),
            );
        }
    }
    if lim.pg_limits != plan.limits {
        out.add(
            "LIM.limit_differs",
            format!(
                "set {:?}, product_limit holds {:?}",
                plan.limits, lim.pg_limits
            ),
        );
    }
    let pg: BTreeMap<Buyer, i64> = lim
        .pg_units
        .iter()
        .filter(|(_, n)| **n != 0)
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    for (k, a, b) in differences(&held, &pg) {
        out.add(
            "LIM.pg_counts_differ_from_ledger",
            format!(
                "product {}, customer {}: the ledger holds {a}, customer_units {b}",
                k.0, k.1
            ),
        );
    }
    for (&p, &limit) in &plan.limits {
        match lim.redis.get(&p) {
            Some(Some((per_customer, units))) => {
                if *per_customer != limit {
                    out.add(
                        "LIM.redis_limit_differs",
                        format!("product {p}: limit {limit}, Redis {per_customer}"),
                    );
                }
                let want: BTreeMap<Buyer, i64> = held
                    .range((p, String::new())..)
                    .take_while(|((q, _), _)| *q == p)
                    .map(|(k, n)| (k.clone(), *n))
                    .collect();
                let got: BTreeMap<Buyer, i64> = units
                    .iter()
                    .filter(|(_, n)| **n != 0)
                    .map(|(c, n)| ((p, c.clone()), *n))
                    .collect();
                for (k, a, b) in differences(&want, &got) {
                    out.add(
                        "LIM.redis_counts_differ_from_ledger",
                        format!(
                            "product {p}, customer {}: the ledger holds {a}, Redis {b}",
                            k.1
                        ),
                    );
                }
            }
            _ => out.add(
                "LIM.redis_limit_missing",
                format!("product {p}: no buyers hash in Redis once idle"),
            ),
        }
    }
    for d in &lim.drift {
        out.add("LIM.drift", d.clone());
    }
    let s = &lim.sampled;
    for (kind, max) in [
        ("LIM.sampled_above_limit_pg", &s.pg_max),
        ("LIM.sampled_above_limit_redis", &s.redis_max),
    ] {
        for ((p, c), n) in max {
            let limit = plan.limits.get(p).copied();
            if limit.is_none_or(|l| *n > l) {
                out.add(
                    kind,
                    format!(
                        "customer {c} was seen holding {n} units of product {p} (limit {limit:?})"
                    ),
                );
            }
        }
    }
    let at_limit = |(&(p, _), n): (&Buyer, &i64)| plan.limits.get(&p) == Some(n);
    let limited = |o: &super::workload::PlannedOrder| {
        o.items
            .iter()
            .any(|i| plan.limits.contains_key(&i.product_id))
    };
    let without: Vec<_> = plan
        .orders
        .iter()
        .filter(|o| o.id.starts_with("o-") && o.customer.is_none())
        .collect();
    f.limits = LimitFigures {
        limits: plan.limits.clone(),
        limit_exceeded: f
            .outcomes
            .get(&format!("rejected/{}", Reason::LimitExceeded.as_str()))
            .copied()
            .unwrap_or(0),
        without_customer: without.len(),
        without_customer_limited: without.iter().filter(|o| limited(o)).count(),
        customers_holding: held.len(),
        customers_at_limit: held.iter().filter(|e| at_limit(*e)).count(),
        samples_pg: s.pg_samples,
        samples_redis: s.redis_samples,
        samples_failed: s.failed,
        max_sampled_pg: s.pg_max.values().copied().max().unwrap_or(0),
        max_sampled_redis: s.redis_max.values().copied().max().unwrap_or(0),
        customers_seen_at_limit: s.pg_max.iter().filter(|e| at_limit(*e)).count(),
    };
}

/// The keys where two counts differ (a missing key counts 0): (key, a's, b's).
fn differences(a: &BTreeMap<Buyer, i64>, b: &BTreeMap<Buyer, i64>) -> Vec<(Buyer, i64, i64)> {
    let keys: BTreeSet<&Buyer> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (
                a.get(k).copied().unwrap_or(0),
                b.get(k).copied().unwrap_or(0),
            );
            (x != y).then(|| (k.clone(), x, y))
        })
        .collect()
}

/// Guarantee 5: every unparseable message in the dead-letter topic, bytes unchanged, with
/// its reason and origin; nothing else in it.
fn check_dlq(plan: &Plan, obs: &Observed, out: &mut Out) {
    let h = |m: &DlqMsg, k: &str| m.headers.get(k).cloned().unwrap_or_default();
    let mut by_origin: HashMap<(String, String, String), &DlqMsg> = HashMap::new();
    for m in &obs.dlq {
        let origin = (
            h(m, "dlq.source.topic"),
            h(m, "dlq.source.partition"),
            h(m, "dlq.source.offset"),
        );
        by_origin.insert(origin, m);
    }
    let junk_bytes: HashSet<&[u8]> = plan.junk.iter().map(|j| j.bytes.as_slice()).collect();
    for (j, junk) in plan.junk.iter().enumerate() {
        let Some(Some((p, o))) = obs.junk_positions.get(j) else {
            out.add(
                "G5.not_dead_lettered",
                format!("{} ({}): never published?", junk.key, junk.what),
            );
            continue;
        };
        let origin = (obs.orders_topic.clone(), p.to_string(), o.to_string());
        match by_origin.get(&origin) {
            None => out.add(
                "G5.not_dead_lettered",
                format!("{} ({}) at partition {p} offset {o}", junk.key, junk.what),
            ),
            Some(m) => {
                if m.payload != junk.bytes || m.key != junk.key {
                    out.add(
                        "G5.dead_letter_altered",
                        format!(
                            "{} ({}): key {:?}, {} bytes",
                            junk.key,
                            junk.what,
                            m.key,
                            m.payload.len()
                        ),
                    );
                }
                if h(m, "dlq.reason").is_empty() || h(m, "dlq.worker").is_empty() {
                    out.add(
                        "G5.dead_letter_without_reason",
                        format!("{} ({}): headers {:?}", junk.key, junk.what, m.headers),
                    );
                }
            }
        }
    }
    for m in &obs.dlq {
        let topic = h(m, "dlq.source.topic");
        if topic != obs.orders_topic {
            out.add(
                "G5.internal_message_dead_lettered",
                format!(
                    "from {topic}: key {:?}, reason {:?}",
                    m.key,
                    h(m, "dlq.reason")
                ),
            );
        } else if !junk_bytes.contains(m.payload.as_slice()) {
            out.add(
                "G5.order_event_dead_lettered",
                format!(
                    "key {:?}, reason {:?}: {}",
                    m.key,
                    h(m, "dlq.reason"),
                    String::from_utf8_lossy(&m.payload)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nemesis::workload::{Junk, PlannedOrder};

    fn item(product_id: i64, quantity: i64) -> Item {
        Item {
            product_id,
            quantity,
        }
    }

    fn order(id: &str, customer: &str, items: Vec<Item>, fate: Fate, pays: u32) -> PlannedOrder {
        PlannedOrder {
            id: id.into(),
            customer: Some(customer.into()),
            items,
            expect: Expect::Valid,
            fate,
            created: 1,
            variants: 0,
            pays,
            cancels: 0,
        }
    }

    fn mov(p: i64, kind: &str, r: &str, q: i64, d: (i64, i64, i64)) -> Mov {
        Mov {
            product_id: p,
            kind: kind.into(),
            reference: r.into(),
            orders: 1,
            quantity: q,
            available: d.0,
            reserved: d.1,
            sold: d.2,
        }
    }

    fn rec(status: &str, release: Option<&str>, items: Vec<Item>, customer: &str) -> LedgerRec {
        LedgerRec {
            status: status.into(),
            reject_reason: None,
            reject_product: None,
            release_reason: release.map(Into::into),
            items,
            announced: true,
            customer_id: Some(customer.into()),
        }
    }

    fn buyers(rows: &[(&str, i64)]) -> BTreeMap<Buyer, i64> {
        rows.iter()
            .map(|(c, n)| ((HOT, (*c).to_owned()), *n))
            .collect()
    }

    fn row(p: i64, a: i64, r: i64, s: i64) -> StockRow {
        StockRow {
            product_id: p,
            available: a,
            reserved: r,
            sold: s,
            total_added: a + r + s,
        }
    }

    /// a: paid (customer c1, at the hot SKU's limit of 2); b: expired; c: refused by Redis
    /// (hot SKU sold out); e: no customer for the limited hot SKU, `invalid_order`; one
    /// junk message.
    fn consistent() -> (Plan, Observed) {
        let mut e = order("e", "-", vec![item(HOT, 1)], Fate::Abandoned, 0);
        (e.customer, e.expect) = (None, Expect::Invalid);
        let orders = vec![
            order("a", "c1", vec![item(HOT, 2)], Fate::PayQuick, 1),
            order("b", "c2", vec![item(2, 1)], Fate::Abandoned, 0),
            order("c", "c3", vec![item(HOT, 1)], Fate::Abandoned, 0),
            e,
        ];
        let plan = Plan {
            index: orders
                .iter()
                .enumerate()
                .map(|(i, o)| (o.id.clone(), i))
                .collect(),
            orders,
            junk: vec![Junk {
                key: "junk-0".into(),
                bytes: b"x".to_vec(),
                what: "not JSON",
            }],
            events: Vec::new(),
            stock: [(HOT, 2), (2, 5)].into_iter().collect(),
            limits: [(HOT, 2)].into_iter().collect(),
        };
        let res = |id: &str, s, r, p| StockResult::new(id, s, r, p);
        let outcomes: HashMap<String, Vec<StockResult>> = [
            (
                "a",
                vec![
                    StockResult::reserved("a"),
                    res("a", Status::Confirmed, None, None),
                ],
            ),
            (
                "b",
                vec![
                    StockResult::reserved("b"),
                    res("b", Status::Released, Some(Reason::Expired), None),
                ],
            ),
            (
                "c",
                vec![StockResult::rejected(
                    "c",
                    Reason::InsufficientStock,
                    Some(HOT),
                )],
            ),
            (
                "e",
                vec![StockResult::rejected("e", Reason::InvalidOrder, None)],
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let obs = Observed {
            outcomes,
            result_messages: 5,
            unparsed_results: 0,
            ledger: [
                (
                    "a".to_owned(),
                    rec("confirmed", None, vec![item(HOT, 2)], "c1"),
                ),
                (
                    "b".to_owned(),
                    rec("released", Some("expired"), vec![item(2, 1)], "c2"),
                ),
                (
                    "e".to_owned(),
                    LedgerRec {
                        reject_reason: Some("invalid_order".into()),
                        customer_id: None,
                        ..rec("rejected", None, Vec::new(), "-")
                    },
                ),
            ]
            .into_iter()
            .collect(),
            movements: vec![
                mov(HOT, "set", "r1", 2, (2, 0, 0)),
                mov(2, "set", "r2", 5, (5, 0, 0)),
                mov(HOT, "reserve", "a", 2, (-2, 2, 0)),
                mov(HOT, "confirm", "a", 2, (0, -2, 2)),
                mov(2, "reserve", "b", 1, (-1, 1, 0)),
                mov(2, "release_expired", "b", 1, (1, -1, 0)),
            ],
            stock: vec![row(HOT, 0, 0, 2), row(2, 5, 0, 0)],
            invariants: Vec::new(),
            redis_loaded: true,
            dlq: vec![DlqMsg {
                key: "junk-0".into(),
                payload: b"x".to_vec(),
                headers: [
                    ("dlq.reason", "not JSON"),
                    ("dlq.source.topic", "orders"),
                    ("dlq.source.partition", "0"),
                    ("dlq.source.offset", "5"),
                    ("dlq.worker", "producer"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            }],
            orders_topic: "orders".into(),
            junk_positions: vec![Some((0, 5))],
            limits: LimitsObserved {
                pg_limits: [(HOT, 2)].into_iter().collect(),
                pg_units: buyers(&[("c1", 2)]),
                redis: [(HOT, Some((2, [("c1".to_owned(), 2)].into_iter().collect())))]
                    .into_iter()
                    .collect(),
                drift: Vec::new(),
                sampled: Sampled {
                    pg_samples: 3,
                    redis_samples: 3,
                    failed: 0,
                    pg_max: buyers(&[("c1", 2), ("c3", 1)]),
                    redis_max: buyers(&[("c1", 2)]),
                },
            },
        };
        (plan, obs)
    }

    fn kinds(plan: &Plan, obs: &Observed) -> Vec<String> {
        let mut k: Vec<String> = check(plan, obs)
            .violations
            .into_iter()
            .map(|v| v.kind)
            .collect();
        k.sort();
        k.dedup();
        k
    }

    #[test]
    fn a_consistent_run_has_no_violation() {
        let (plan, obs) = consistent();
        assert_eq!(kinds(&plan, &obs), Vec::<String>::new());
        let f = check(&plan, &obs).limits;
        assert_eq!(
            (
                f.customers_holding,
                f.customers_at_limit,
                f.customers_seen_at_limit
            ),
            (1, 1, 1)
        );
        assert_eq!(
            (f.max_sampled_pg, f.max_sampled_redis, f.limit_exceeded),
            (2, 2, 0)
        );
    }

    #[test]
    fn each_broken_promise_is_caught() {
        let (plan, base) = consistent();
        type Mutation = Box<dyn Fn(&mut Observed)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "G4.conflicting_outcomes",
                Box::new(|o| {
                    o.outcomes
                        .get_mut("c")
                        .expect("c")
                        .push(StockResult::reserved("c"));
                }),
            ),
            (
                "G4.no_outcome",
                Box::new(|o| {
                    o.outcomes.remove("c");
                }),
            ),
            (
                "G6.wrongly_rejected",
                Box::new(|o| {
                    o.outcomes.insert(
                        "c".into(),
                        vec![StockResult::rejected(
                            "c",
                            Reason::UnknownProduct,
                            Some(HOT),
                        )],
                    );
                }),
            ),
            (
                "G2.reserved_twice",
                Box::new(|o| o.movements.push(mov(2, "reserve", "b", 1, (-1, 1, 0)))),
            ),
            (
                "G2.columns_differ_from_ledger",
                Box::new(|o| {
                    o.stock[1] = row(2, 4, 0, 1);
                }),
            ),
            (
                "L.confirmed_and_released",
                Box::new(|o| {
                    o.outcomes.get_mut("a").expect("a").push(StockResult::new(
                        "a",
                        Status::Released,
                        Some(Reason::Expired),
                        None,
                    ));
                }),
            ),
            (
                "L.never_settled",
                Box::new(|o| {
                    o.ledger
                        .insert("b".into(), rec("reserved", None, vec![item(2, 1)], "c2"));
                }),
            ),
            (
                "G5.not_dead_lettered",
                Box::new(|o| {
                    o.dlq.clear();
                }),
            ),
            (
                "G3.redis_differs_from_available",
                Box::new(|o| {
                    o.invariants.push(InvariantViolation {
                        product_id: 2,
                        what: "redis 4 != available 5".into(),
                    });
                }),
            ),
            (
                "L.pay_or_cancel_overtook_its_order",
                Box::new(|o| {
                    o.outcomes.get_mut("a").expect("a").push(StockResult::new(
                        "a",
                        Status::Ignored,
                        Some(Reason::NotReserved),
                        None,
                    ));
                }),
            ),
            // Per-customer limits.
            (
                // c1 holds 2 (order a) and 1 more: above the limit in the ledger.
                "LIM.ledger_above_limit",
                Box::new(|o| {
                    let b = rec("confirmed", None, vec![item(HOT, 1)], "c1");
                    o.ledger.insert("b".into(), b);
                }),
            ),
            (
                "LIM.pg_counts_differ_from_ledger",
                Box::new(|o| o.limits.pg_units = buyers(&[("c1", 1)])),
            ),
            (
                "LIM.pg_counts_differ_from_ledger",
                Box::new(|o| o.limits.pg_units = buyers(&[("c1", 2), ("c2", 1)])),
            ),
            (
                "LIM.redis_counts_differ_from_ledger",
                Box::new(|o| {
                    let units = [("c1".to_owned(), 1)].into_iter().collect();
                    o.limits.redis.insert(HOT, Some((2, units)));
                }),
            ),
            (
                "LIM.redis_limit_missing",
                Box::new(|o| {
                    o.limits.redis.insert(HOT, None);
                }),
            ),
            (
                "LIM.sampled_above_limit_pg",
                Box::new(|o| o.limits.sampled.pg_max = buyers(&[("c7", 3)])),
            ),
            (
                "LIM.sampled_above_limit_redis",
                Box::new(|o| o.limits.sampled.redis_max = buyers(&[("c1", 3)])),
            ),
            (
                "LIM.wrong_limit_exceeded",
                Box::new(|o| {
                    let r = StockResult::rejected("c", Reason::LimitExceeded, Some(2));
                    o.outcomes.insert("c".into(), vec![r]);
                }),
            ),
            (
                "LIM.ledger_customer_differs",
                Box::new(|o| {
                    let a = rec("confirmed", None, vec![item(HOT, 2)], "c2");
                    o.ledger.insert("a".into(), a);
                }),
            ),
            (
                // Without a customer, an order for the limited product is refused.
                "G4.wrong_outcome",
                Box::new(|o| {
                    o.outcomes
                        .insert("e".into(), vec![StockResult::reserved("e")]);
                }),
            ),
            (
                "LIM.drift",
                Box::new(|o| o.limits.drift.push("product 1: redis c1 3".into())),
            ),
        ];
        for (want, mutate) in cases {
            let mut obs = Observed {
                outcomes: base.outcomes.clone(),
                ledger: base.ledger.clone(),
                movements: base.movements.clone(),
                stock: base.stock.clone(),
                invariants: base.invariants.clone(),
                dlq: base.dlq.clone(),
                junk_positions: base.junk_positions.clone(),
                orders_topic: base.orders_topic.clone(),
                redis_loaded: true,
                limits: base.limits.clone(),
                ..Default::default()
            };
            mutate(&mut obs);
            let got = kinds(&plan, &obs);
            assert!(got.iter().any(|k| k == want), "{want}: got {got:?}");
        }
    }
}
