//! The consumer's decisions, as a pure function: given a batch of deduct commands in
//! offset order, what the ledger already knows of their orders, and the stock rows, what
//! changes and what is published. No I/O here, so every rule has a unit test.
//!
//! Rules (contract "Results"):
//! * `reserve` of an order never seen: all items or none, never below zero; an unknown
//!   product or the first item short rejects the order (and its Redis stock is
//!   compensated). Of an order seen before: its recorded outcome again, nothing changed;
//!   if the command carries another pre-deduction (token) than the one the ledger applied,
//!   that second pre-deduction is given back to Redis (`duplicate`), never applied.
//! * `reserve` of an order never seen, pre-deducted in a Redis generation that a rebuild
//!   has replaced since: not applied (the rebuilt Redis does not hold that pre-deduction);
//!   the producer is asked to decide the order again (`redecide`).
//! * `refuse`: Redis refused the order; the ledger records the refusal (the order's one
//!   outcome for good) unless the order is known, whose recorded outcome comes again.
//! * `pay`: reserved → confirmed (`reserved -= q, sold += q`).
//! * `cancel`: reserved → released/cancelled (`reserved -= q, available += q`), and the
//!   stock goes back to Redis by a compensation.
//! * A pay or cancel that finds the order settled is `ignored` with the reason, unless it
//!   is the very event that settled it (a redelivery): then its own result comes again.
//!
//! Per-customer limits (docs/DESIGN.md, "Per-customer limits": the same rule as Redis'):
//! * `reserve` of an order never seen: an order without customer that has an item of a
//!   limited product is `rejected`/`invalid_order` (no product named); then item by item,
//!   the first that fails decides: unknown product, stock short (`insufficient_stock`),
//!   the customer's units (held plus this batch's changes) plus the quantity above the
//!   limit (`limit_exceeded`, naming it). A refusal gives the pre-deduction back to Redis
//!   as a stock refusal does. A reservation adds its units to the customer's count of each
//!   limited product.
//! * `cancel` of a reserved order takes its units off its customer's count of each of its
//!   products limited now; `pay` moves no count (`reserved` and `confirmed` both count).
//! * The ledger row keeps the customer of the first decision; a redelivery changes nothing.

use std::collections::{BTreeMap, HashMap};
use stock_common::events::{
    Compensation, CompensationCause, DeductCommand, Item, Reason, Status, StockResult, Token,
    INTERNAL_VERSION,
};
pub use stock_common::pg_store::{Delta, LedgerRow, Movement, OrderStatus, SlotLoads, UnitKey};
use stock_common::redis_store::slots;

/// What [`plan`] knows of per-customer limits, read under the batch's stock row locks.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// The per-customer limit of each locked product that has one.
    pub per_customer: HashMap<i64, i64>,
    /// The units held by the (product, customer) pairs the batch's reservations need
    /// (limited products only; a pair absent holds 0).
    pub units: HashMap<UnitKey, i64>,
}

impl Limits {
    /// The (limited product, customer) pairs whose counts a batch's reservations need:
    /// what to read before [`plan`]. Empty when no reservation has a limited item with a
    /// customer.
    pub fn pairs_needed(
        ops: &[DeductCommand],
        per_customer: &HashMap<i64, i64>,
    ) -> std::collections::BTreeSet<UnitKey> {
        ops.iter()
            .filter_map(|o| match o {
                DeductCommand::Reserve {
                    items,
                    customer: Some(c),
                    ..
                } => Some(
                    items
                        .iter()
                        .filter(|it| per_customer.contains_key(&it.product_id))
                        .map(move |it| (it.product_id, c.clone())),
                ),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

/// Everything a batch does.
#[derive(Debug, Default)]
pub struct Plan {
    /// History rows for every change decided now (not for redeliveries).
    pub movements: Vec<Movement>,
    /// One result per command, in command order.
    pub results: Vec<StockResult>,
    pub compensations: Vec<Compensation>,
    /// Ledger rows to insert (orders first seen in this batch), in their final state.
    pub inserts: Vec<(String, LedgerRow)>,
    /// Existing ledger rows whose state changed.
    pub updates: Vec<(String, LedgerRow)>,
    /// Per product, only where something changed.
    pub deltas: BTreeMap<i64, Delta>,
    /// Changes of `customer_units`, per (limited product, customer), only where not 0.
    pub units: BTreeMap<UnitKey, i64>,
}

struct Entry {
    row: LedgerRow,
    new: bool,
    dirty: bool,
}

/// Decides a batch. `known` holds the ledger rows of the batch's orders (read while the
/// stock rows of those orders are locked); `available` the `available` column of every
/// existing product the batch touches; `loads` the Redis generation PostgreSQL answers to
/// (`redis_generation`, read first in the same transaction) and the generation each slot
/// was loaded in; `limits` the limits of those products and the counts
/// [`Limits::pairs_needed`] names.
pub fn plan(
    ops: &[DeductCommand],
    known: HashMap<String, LedgerRow>,
    available: &HashMap<i64, i64>,
    limits: &Limits,
    loads: &SlotLoads,
) -> Plan {
    let gen = loads.gen;
    let mut p = Planner {
        ledger: known
            .into_iter()
            .map(|(id, row)| {
                let e = Entry {
                    row,
                    new: false,
                    dirty: false,
                };
                (id, e)
            })
            .collect(),
        plan: Plan::default(),
        first_insert_order: Vec::new(),
        available,
        limits,
        loads,
    };
    for op in ops {
        match op {
            DeductCommand::Reserve {
                order_id,
                items,
                token,
                customer,
                ..
            } => p.reserve(order_id, items, token.as_deref(), customer.as_deref()),
            DeductCommand::Refuse {
                order_id,
                reason,
                product_id,
                ..
            } => p.refuse(order_id, *reason, *product_id),
            DeductCommand::Pay {
                order_id, event, ..
            } => {
                let result = settle(
                    &mut p.ledger,
                    &mut p.plan,
                    order_id,
                    event,
                    Settle::Pay,
                    (gen, &limits.per_customer),
                );
                p.plan.results.push(result);
            }
            DeductCommand::Cancel {
                order_id, event, ..
            } => p.cancel(order_id, event),
        }
    }
    p.finish()
}

/// The state of [`plan`] while it walks a batch.
struct Planner<'a> {
    ledger: HashMap<String, Entry>,
    plan: Plan,
    /// Orders first seen in this batch, in the order they were seen.
    first_insert_order: Vec<String>,
    available: &'a HashMap<i64, i64>,
    limits: &'a Limits,
    loads: &'a SlotLoads,
}

/// How much of a pre-deduction Redis still holds, after the rebuilds since it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Every slot it touched (its record's and its stock's) is loaded from before it.
    All,
    /// Some of its stock slots were loaded since (a partial rebuild): what the others hold
    /// must be given back before the order is decided again.
    Part,
    None,
}

/// [`Held`] for a pre-deduction of order `order_id` named in generation `gen`: a slot
/// loaded in a later generation than `gen` was loaded from PostgreSQL, which did not hold
/// it. On one Redis every slot is the whole Redis.
fn held(loads: &SlotLoads, order_id: &str, items: &[Item], gen: i64) -> Held {
    // Without a partial rebuild every slot was loaded with the whole: no slot to compute
    // (its CRC16 per order and item were 2-3% of the consumer's CPU on one Redis).
    if loads.ranges.is_empty() {
        return if loads.whole <= gen {
            Held::All
        } else {
            Held::None
        };
    }
    let fresh = |s: u16| loads.loaded(s) <= gen;
    let mut stock = items.iter().map(|it| slots::of_stock(it.product_id));
    if fresh(slots::of_record(order_id)) && stock.clone().all(fresh) {
        Held::All
    } else if stock.any(fresh) {
        Held::Part
    } else {
        Held::None
    }
}

impl Planner<'_> {
    /// A pre-deduction of `order_id` named `token` (module docs: `reserve`).
    fn reserve(
        &mut self,
        order_id: &str,
        items: &[Item],
        token: Option<&str>,
        customer: Option<&str>,
    ) {
        let gen = self.loads.gen;
        let holds = token
            .and_then(Token::parse)
            .map_or(Held::All, |t| held(self.loads, order_id, items, t.gen));
        let give_back = |cause: CompensationCause, token: Option<&str>, gen| Compensation {
            v: INTERNAL_VERSION,
            order_id: order_id.to_owned(),
            items: items.to_vec(),
            cause,
            token: token.map(str::to_owned),
            gen,
            // Only a decision taken again needs the customer; a give-back finds it in the
            // order's Redis record.
            customer: (cause == CompensationCause::Redecide)
                .then(|| customer.map(str::to_owned))
                .flatten(),
        };
        if let Some(e) = self.ledger.get(order_id) {
            self.plan.results.push(e.row.created_outcome(order_id));
            // A command without a token predates tokens: a redelivery.
            if token.is_none() || e.row.token.as_deref() == token {
                // A redelivery: its refusal's give-back comes again (restored once).
                if e.row.status == OrderStatus::Rejected && e.row.comp_gen.is_some() {
                    let c =
                        compensation(order_id, &e.row.items, CompensationCause::Rejected, &e.row);
                    self.plan.compensations.push(c);
                }
            } else if holds != Held::None {
                // A second pre-deduction that Redis holds: give it back. (One from before
                // a rebuild of its slots is not held by the rebuilt Redis.)
                let c = give_back(CompensationCause::Duplicate, token, Some(gen));
                self.plan.compensations.push(c);
            }
            return;
        }
        if holds != Held::All {
            // Taken before a rebuild of its slots, never applied here: decide it again
            // (its token: what a partial rebuild left held of it goes back first).
            let c = give_back(CompensationCause::Redecide, token, None);
            self.plan.compensations.push(c);
            return;
        }
        let row = match self.refusal(items, customer) {
            Some(reject) => {
                let row = LedgerRow {
                    status: OrderStatus::Rejected,
                    reject: Some(reject),
                    release_reason: None,
                    settled_by: None,
                    items: items.to_vec(),
                    token: token.map(str::to_owned),
                    comp_gen: Some(gen),
                    customer: customer.map(str::to_owned),
                };
                let c = compensation(order_id, items, CompensationCause::Rejected, &row);
                self.plan.compensations.push(c);
                self.record_each(items, "compensation", order_id, |_| Delta::default());
                row
            }
            None => {
                self.record_each(items, "reserve", order_id, |it| Delta {
                    available: -it.quantity,
                    reserved: it.quantity,
                    sold: 0,
                });
                if let Some(c) = customer {
                    count_units(&mut self.plan.units, &self.limits.per_customer, items, c, 1);
                }
                LedgerRow {
                    status: OrderStatus::Reserved,
                    reject: None,
                    release_reason: None,
                    settled_by: None,
                    items: items.to_vec(),
                    token: token.map(str::to_owned),
                    comp_gen: None,
                    customer: customer.map(str::to_owned),
                }
            }
        };
        self.insert(order_id, row);
    }

    /// A refusal Redis decided (module docs: `refuse`).
    fn refuse(&mut self, order_id: &str, reason: Reason, product_id: Option<i64>) {
        if let Some(e) = self.ledger.get(order_id) {
            self.plan.results.push(e.row.created_outcome(order_id));
            return;
        }
        let row = LedgerRow {
            status: OrderStatus::Rejected,
            reject: Some((reason, product_id)),
            release_reason: None,
            settled_by: None,
            items: Vec::new(),
            token: None,
            comp_gen: None,
            customer: None,
        };
        self.insert(order_id, row);
    }

    /// Why an order first seen cannot be reserved (module docs: the one rule of a
    /// decision), against the stock and counts as this batch has changed them so far.
    fn refusal(&self, items: &[Item], customer: Option<&str>) -> Option<(Reason, Option<i64>)> {
        let limits = &self.limits.per_customer;
        if customer.is_none() && items.iter().any(|it| limits.contains_key(&it.product_id)) {
            return Some((Reason::InvalidOrder, None));
        }
        let deltas = &self.plan.deltas;
        items.iter().find_map(|it| {
            let p = it.product_id;
            let Some(base) = self.available.get(&p) else {
                return Some((Reason::UnknownProduct, Some(p)));
            };
            let now = base + deltas.get(&p).map_or(0, |d| d.available);
            if now < it.quantity {
                return Some((Reason::InsufficientStock, Some(p)));
            }
            let (Some(limit), Some(c)) = (limits.get(&p), customer) else {
                return None;
            };
            let key = (p, c.to_owned());
            let held = self.limits.units.get(&key).copied().unwrap_or(0)
                + self.plan.units.get(&key).copied().unwrap_or(0);
            (held + it.quantity > *limit).then_some((Reason::LimitExceeded, Some(p)))
        })
    }

    fn cancel(&mut self, order_id: &str, event: &str) {
        let result = settle(
            &mut self.ledger,
            &mut self.plan,
            order_id,
            event,
            Settle::Cancel,
            (self.loads.gen, &self.limits.per_customer),
        );
        if result.status == Status::Released {
            if let Some(e) = self.ledger.get(order_id) {
                let c = compensation(order_id, &e.row.items, CompensationCause::Cancelled, &e.row);
                self.plan.compensations.push(c);
            }
        }
        self.plan.results.push(result);
    }

    /// A movement of `kind` per item, each with its delta.
    fn record_each(
        &mut self,
        items: &[Item],
        kind: &'static str,
        order_id: &str,
        delta: impl Fn(&Item) -> Delta,
    ) {
        for it in items {
            record(
                &mut self.plan.deltas,
                &mut self.plan.movements,
                kind,
                order_id,
                it,
                delta(it),
            );
        }
    }

    /// A ledger row decided now: its outcome is published, the row inserted.
    fn insert(&mut self, order_id: &str, row: LedgerRow) {
        self.plan.results.push(row.created_outcome(order_id));
        self.first_insert_order.push(order_id.to_owned());
        let e = Entry {
            row,
            new: true,
            dirty: true,
        };
        self.ledger.insert(order_id.to_owned(), e);
    }

    fn finish(mut self) -> Plan {
        for id in self.first_insert_order {
            if let Some(e) = self.ledger.remove(&id) {
                self.plan.inserts.push((id, e.row));
            }
        }
        let mut updates: Vec<(String, LedgerRow)> = self
            .ledger
            .into_iter()
            .filter(|(_, e)| e.dirty && !e.new)
            .map(|(id, e)| (id, e.row))
            .collect();
        updates.sort_by(|a, b| a.0.cmp(&b.0));
        self.plan.updates = updates;
        self.plan.deltas.retain(|_, d| *d != Delta::default());
        self.plan.units.retain(|_, d| *d != 0);
        self.plan
    }
}

/// Adds `sign` × each item's quantity to `customer`'s count of each of the items' products
/// that is limited (`per_customer`): a reservation (+1), a release (−1).
pub fn count_units(
    units: &mut BTreeMap<UnitKey, i64>,
    per_customer: &HashMap<i64, i64>,
    items: &[Item],
    customer: &str,
    sign: i64,
) {
    for it in items
        .iter()
        .filter(|it| per_customer.contains_key(&it.product_id))
    {
        *units
            .entry((it.product_id, customer.to_owned()))
            .or_default() += sign * it.quantity;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Settle {
    Pay,
    Cancel,
}

fn settle(
    ledger: &mut HashMap<String, Entry>,
    plan: &mut Plan,
    order_id: &str,
    event: &str,
    how: Settle,
    (gen, limits): (i64, &HashMap<i64, i64>),
) -> StockResult {
    let ignored = |reason| StockResult::new(order_id, Status::Ignored, Some(reason), None);
    let Some(e) = ledger.get_mut(order_id) else {
        return ignored(Reason::NotReserved);
    };
    let by_this_event = e.row.settled_by.as_deref() == Some(event);
    match (e.row.status, how) {
        (OrderStatus::Rejected, _) => ignored(Reason::NotReserved),
        (OrderStatus::Reserved, Settle::Pay) => {
            for it in &e.row.items {
                let delta = Delta {
                    available: 0,
                    reserved: -it.quantity,
                    sold: it.quantity,
                };
                record(
                    &mut plan.deltas,
                    &mut plan.movements,
                    "confirm",
                    order_id,
                    it,
                    delta,
                );
            }
            e.row.status = OrderStatus::Confirmed;
            e.row.settled_by = Some(event.to_owned());
            e.dirty = true;
            StockResult::new(order_id, Status::Confirmed, None, None)
        }
        (OrderStatus::Reserved, Settle::Cancel) => {
            for it in &e.row.items {
                let delta = release_delta(it);
                record(
                    &mut plan.deltas,
                    &mut plan.movements,
                    "release_cancelled",
                    order_id,
                    it,
                    delta,
                );
            }
            if let Some(c) = &e.row.customer {
                count_units(&mut plan.units, limits, &e.row.items, c, -1);
            }
            e.row.status = OrderStatus::Released;
            e.row.release_reason = Some(Reason::Cancelled);
            e.row.settled_by = Some(event.to_owned());
            e.row.comp_gen = Some(gen);
            e.dirty = true;
            StockResult::new(order_id, Status::Released, Some(Reason::Cancelled), None)
        }
        (OrderStatus::Confirmed, Settle::Pay) if by_this_event => {
            StockResult::new(order_id, Status::Confirmed, None, None)
        }
        (OrderStatus::Released, Settle::Cancel) if by_this_event => {
            StockResult::new(order_id, Status::Released, Some(Reason::Cancelled), None)
        }
        (OrderStatus::Confirmed, _) => ignored(Reason::AlreadyConfirmed),
        (OrderStatus::Released, _) => ignored(Reason::AlreadyReleased),
    }
}

/// What releasing a reserved item does to the columns (cancel and expiry alike).
pub fn release_delta(it: &Item) -> Delta {
    Delta {
        available: it.quantity,
        reserved: -it.quantity,
        sold: 0,
    }
}

/// Adds `delta` to the product's running change and writes the history row.
pub fn record(
    deltas: &mut BTreeMap<i64, Delta>,
    movements: &mut Vec<Movement>,
    kind: &'static str,
    order_id: &str,
    it: &Item,
    delta: Delta,
) {
    *deltas.entry(it.product_id).or_default() += delta;
    movements.push(Movement {
        product_id: it.product_id,
        kind,
        reference: order_id.to_owned(),
        quantity: it.quantity,
        delta,
    });
}

/// The compensation giving back the pre-deduction `row` applied, for the PostgreSQL change
/// of generation `row.comp_gen`.
pub fn compensation(
    order_id: &str,
    items: &[Item],
    cause: CompensationCause,
    row: &LedgerRow,
) -> Compensation {
    Compensation {
        v: INTERNAL_VERSION,
        order_id: order_id.to_owned(),
        items: items.to_vec(),
        cause,
        token: row.token.clone(),
        gen: row.comp_gen,
        customer: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan in generation 0, for commands without tokens.
    fn plan(
        ops: &[DeductCommand],
        known: HashMap<String, LedgerRow>,
        available: &HashMap<i64, i64>,
    ) -> Plan {
        super::plan(
            ops,
            known,
            available,
            &Limits::default(),
            &SlotLoads::whole(0),
        )
    }

    fn reserve(id: &str, items: &[(i64, i64)]) -> DeductCommand {
        DeductCommand::Reserve {
            v: 1,
            order_id: id.into(),
            items: items
                .iter()
                .map(|&(product_id, quantity)| Item {
                    product_id,
                    quantity,
                })
                .collect(),
            token: None,
            customer: None,
        }
    }
    fn reserve_t(id: &str, items: &[(i64, i64)], token: &str) -> DeductCommand {
        match reserve(id, items) {
            DeductCommand::Reserve {
                v, order_id, items, ..
            } => DeductCommand::Reserve {
                v,
                order_id,
                items,
                token: Some(token.into()),
                customer: None,
            },
            other => other,
        }
    }

    #[test]
    fn a_second_pre_deduction_is_given_back_and_the_outcome_kept() {
        let first = super::plan(
            &[reserve_t("a", &[(1, 2)], "4.10")],
            HashMap::new(),
            &stock(&[(1, 5)]),
            &Limits::default(),
            &SlotLoads::whole(4),
        );
        let known: HashMap<_, _> = first.inserts.into_iter().collect();
        // the same pre-deduction again: a redelivery, nothing to give back
        let again = super::plan(
            &[reserve_t("a", &[(1, 2)], "4.10")],
            known.clone(),
            &stock(&[(1, 3)]),
            &Limits::default(),
            &SlotLoads::whole(4),
        );
        assert_eq!(again.results, first.results);
        assert!(again.compensations.is_empty() && again.deltas.is_empty());
        // another pre-deduction of the same order (its record was forgotten): given back
        let dup = super::plan(
            &[reserve_t("a", &[(1, 2)], "4.99")],
            known.clone(),
            &stock(&[(1, 3)]),
            &Limits::default(),
            &SlotLoads::whole(4),
        );
        assert_eq!(dup.results, first.results);
        assert!(dup.deltas.is_empty() && dup.inserts.is_empty());
        assert_eq!(dup.compensations.len(), 1);
        let c = &dup.compensations[0];
        assert_eq!(
            (c.cause, c.token.as_deref(), c.gen),
            (CompensationCause::Duplicate, Some("4.99"), Some(4))
        );
        // one taken in a generation since rebuilt is not held by Redis: nothing to give back
        let old = super::plan(
            &[reserve_t("a", &[(1, 2)], "3.7")],
            known,
            &stock(&[(1, 3)]),
            &Limits::default(),
            &SlotLoads::whole(4),
        );
        assert_eq!(old.results, first.results);
        assert!(old.compensations.is_empty());
    }

    #[test]
    fn a_pre_deduction_of_a_replaced_generation_is_decided_again() {
        let p = super::plan(
            &[reserve_t("a", &[(1, 2)], "3.7")],
            HashMap::new(),
            &stock(&[(1, 5)]),
            &Limits::default(),
            &SlotLoads::whole(4),
        );
        assert!(p.results.is_empty() && p.inserts.is_empty() && p.deltas.is_empty());
        assert_eq!(p.compensations.len(), 1);
        assert_eq!(p.compensations[0].cause, CompensationCause::Redecide);
    }

    /// A partial rebuild loaded product 2's slot in generation 6 (Redis whole in 4).
    fn partly_rebuilt() -> SlotLoads {
        let s = slots::of_stock(2);
        assert_ne!(s, slots::of_stock(1));
        SlotLoads {
            gen: 6,
            whole: 4,
            ranges: vec![(s, s, 6)],
        }
    }

    #[test]
    fn a_pre_deduction_a_partial_rebuild_cut_is_decided_again_with_its_token() {
        let loads = partly_rebuilt();
        // The order's id must not put its record in the rebuilt slot for this test.
        assert_ne!(slots::of_record("a"), slots::of_stock(2));
        let run = |ops: &[DeductCommand], known| {
            super::plan(
                ops,
                known,
                &stock(&[(1, 5), (2, 5)]),
                &Limits::default(),
                &loads,
            )
        };
        // Taken before the rebuild across a rebuilt slot and a kept one: what the kept
        // one holds must go back, so the redecide names the token.
        let p = run(&[reserve_t("a", &[(1, 1), (2, 1)], "5.9")], HashMap::new());
        assert!(p.inserts.is_empty() && p.deltas.is_empty() && p.results.is_empty());
        let c = &p.compensations[0];
        assert_eq!(
            (c.cause, c.token.as_deref()),
            (CompensationCause::Redecide, Some("5.9"))
        );
        // Only in the rebuilt slot: nothing held at all, decided again all the same.
        let p = run(&[reserve_t("a", &[(2, 1)], "5.9")], HashMap::new());
        assert_eq!(p.compensations[0].cause, CompensationCause::Redecide);
        // Only in kept slots (and its record too): Redis holds it, it is applied.
        let p = run(&[reserve_t("a", &[(1, 1)], "5.9")], HashMap::new());
        assert_eq!(p.inserts.len(), 1);
        assert!(p.compensations.is_empty());
        // Named after the rebuild: held everywhere.
        let first = run(&[reserve_t("a", &[(1, 1), (2, 1)], "6.1")], HashMap::new());
        assert_eq!(first.inserts.len(), 1);
        assert!(first.compensations.is_empty());
        // A second pre-deduction: given back where some slot still holds it, not where
        // none does.
        let known: HashMap<_, _> = first.inserts.into_iter().collect();
        let dup = run(&[reserve_t("a", &[(1, 1), (2, 1)], "5.3")], known.clone());
        assert_eq!(dup.compensations[0].cause, CompensationCause::Duplicate);
        let gone = run(&[reserve_t("a", &[(2, 1)], "5.3")], known);
        assert!(gone.compensations.is_empty());
    }

    #[test]
    fn an_order_whose_record_slot_was_rebuilt_is_decided_again() {
        // Find an order id whose record lives in a slot of its own, then rebuild that slot.
        let id = (0..1000)
            .map(|i| format!("o-{i}"))
            .find(|id| {
                let r = slots::of_record(id);
                r != slots::of_stock(1) && r != slots::of_stock(2)
            })
            .expect("an order id");
        let r = slots::of_record(&id);
        let loads = SlotLoads {
            gen: 6,
            whole: 4,
            ranges: vec![(r, r, 6)],
        };
        let p = super::plan(
            &[reserve_t(&id, &[(1, 1)], "5.2")],
            HashMap::new(),
            &stock(&[(1, 5)]),
            &Limits::default(),
            &loads,
        );
        let c = &p.compensations[0];
        assert_eq!(
            (c.cause, c.token.as_deref()),
            (CompensationCause::Redecide, Some("5.2"))
        );
        assert!(p.inserts.is_empty());
    }

    #[test]
    fn redis_refusals_are_recorded_and_keep_the_first_outcome() {
        let refuse = |id: &str| DeductCommand::Refuse {
            v: 1,
            order_id: id.into(),
            reason: Reason::InsufficientStock,
            product_id: Some(1),
        };
        let p = super::plan(
            &[refuse("r"), reserve_t("r", &[(1, 1)], "4.3")],
            HashMap::new(),
            &stock(&[(1, 5)]),
            &Limits::default(),
            &SlotLoads::whole(4),
        );
        let rejected = StockResult::rejected("r", Reason::InsufficientStock, Some(1));
        assert_eq!(p.results, vec![rejected.clone(), rejected]);
        assert_eq!(p.inserts.len(), 1);
        assert!(p.deltas.is_empty());
        // the later pre-deduction is given back; the refusal itself gives nothing back
        assert_eq!(p.compensations.len(), 1);
        assert_eq!(p.compensations[0].cause, CompensationCause::Duplicate);
    }
    fn pay(id: &str, ev: &str) -> DeductCommand {
        DeductCommand::Pay {
            v: 1,
            order_id: id.into(),
            event: ev.into(),
        }
    }
    fn cancel(id: &str, ev: &str) -> DeductCommand {
        DeductCommand::Cancel {
            v: 1,
            order_id: id.into(),
            event: ev.into(),
        }
    }
    fn stock(pairs: &[(i64, i64)]) -> HashMap<i64, i64> {
        pairs.iter().copied().collect()
    }
    fn statuses(p: &Plan) -> Vec<(Status, Option<Reason>)> {
        p.results.iter().map(|r| (r.status, r.reason)).collect()
    }

    #[test]
    fn hot_sku_serves_in_offset_order_and_never_goes_negative() {
        let ops: Vec<_> = (0..5)
            .map(|i| reserve(&format!("o{i}"), &[(1, 2)]))
            .collect();
        let p = plan(&ops, HashMap::new(), &stock(&[(1, 5)]));
        assert_eq!(
            statuses(&p),
            vec![
                (Status::Reserved, None),
                (Status::Reserved, None),
                (Status::Rejected, Some(Reason::InsufficientStock)),
                (Status::Rejected, Some(Reason::InsufficientStock)),
                (Status::Rejected, Some(Reason::InsufficientStock)),
            ]
        );
        assert_eq!(
            p.deltas[&1],
            Delta {
                available: -4,
                reserved: 4,
                sold: 0
            }
        );
        assert_eq!(p.inserts.len(), 5);
        assert_eq!(p.compensations.len(), 3);
        assert_eq!(p.results[2].product_id, Some(1));
        assert_eq!(
            p.movements
                .iter()
                .filter(|m| m.kind == "compensation")
                .count(),
            3
        );
    }

    #[test]
    fn multi_item_is_all_or_nothing() {
        let p = plan(
            &[reserve("a", &[(1, 1), (2, 3)])],
            HashMap::new(),
            &stock(&[(1, 10), (2, 2)]),
        );
        assert_eq!(
            p.results[0],
            StockResult::rejected("a", Reason::InsufficientStock, Some(2))
        );
        assert!(p.deltas.is_empty());
        assert_eq!(p.compensations[0].items.len(), 2);
    }

    #[test]
    fn unknown_product_rejects() {
        let p = plan(
            &[reserve("a", &[(1, 1), (9, 1)])],
            HashMap::new(),
            &stock(&[(1, 10)]),
        );
        assert_eq!(
            p.results[0],
            StockResult::rejected("a", Reason::UnknownProduct, Some(9))
        );
        assert!(p.deltas.is_empty());
    }

    #[test]
    fn duplicates_in_and_across_batches_keep_the_first_outcome() {
        let ops = [
            reserve("a", &[(1, 3)]),
            reserve("a", &[(1, 3)]),
            reserve("b", &[(1, 3)]),
            reserve("b", &[(1, 3)]),
        ];
        let p = plan(&ops, HashMap::new(), &stock(&[(1, 4)]));
        assert_eq!(p.results[0].status, Status::Reserved);
        assert_eq!(p.results[1].status, Status::Reserved);
        assert_eq!(p.results[2].status, Status::Rejected);
        assert_eq!(p.results[3], p.results[2]);
        assert_eq!(p.inserts.len(), 2);
        assert_eq!(p.deltas[&1].available, -3);
        // the rejected order's compensation is re-emitted with its result
        assert_eq!(p.compensations.len(), 2);

        // the same batch again, with the ledger holding what the first one wrote
        let known: HashMap<_, _> = p.inserts.into_iter().collect();
        let again = plan(&ops, known, &stock(&[(1, 1)]));
        assert_eq!(again.results, p.results);
        assert!(again.inserts.is_empty() && again.updates.is_empty() && again.deltas.is_empty());
    }

    #[test]
    fn pay_and_cancel_lifecycle() {
        let p = plan(
            &[
                reserve("a", &[(1, 2)]),
                pay("a", "p0@1"),
                pay("a", "p0@2"),
                cancel("a", "p0@3"),
            ],
            HashMap::new(),
            &stock(&[(1, 5)]),
        );
        assert_eq!(
            statuses(&p),
            vec![
                (Status::Reserved, None),
                (Status::Confirmed, None),
                (Status::Ignored, Some(Reason::AlreadyConfirmed)),
                (Status::Ignored, Some(Reason::AlreadyConfirmed)),
            ]
        );
        assert_eq!(
            p.deltas[&1],
            Delta {
                available: -2,
                reserved: 0,
                sold: 2
            }
        );
        assert_eq!(p.inserts[0].1.status, OrderStatus::Confirmed);

        let c = plan(
            &[
                reserve("b", &[(1, 2)]),
                cancel("b", "p0@5"),
                cancel("b", "p0@6"),
                pay("b", "p0@7"),
            ],
            HashMap::new(),
            &stock(&[(1, 5)]),
        );
        assert_eq!(
            statuses(&c),
            vec![
                (Status::Reserved, None),
                (Status::Released, Some(Reason::Cancelled)),
                (Status::Ignored, Some(Reason::AlreadyReleased)),
                (Status::Ignored, Some(Reason::AlreadyReleased)),
            ]
        );
        assert!(c.deltas.is_empty(), "reserve then cancel nets to zero");
        assert_eq!(c.compensations.len(), 1);
        assert_eq!(c.compensations[0].cause, CompensationCause::Cancelled);
    }

    #[test]
    fn redelivered_settling_event_repeats_its_result() {
        let row = LedgerRow {
            status: OrderStatus::Confirmed,
            reject: None,
            release_reason: None,
            settled_by: Some("p1@9".into()),
            items: vec![Item {
                product_id: 1,
                quantity: 1,
            }],
            token: None,
            comp_gen: None,
            customer: None,
        };
        let known = HashMap::from([("a".to_owned(), row)]);
        let p = plan(
            &[pay("a", "p1@9"), pay("a", "p1@10")],
            known,
            &stock(&[(1, 0)]),
        );
        assert_eq!(
            statuses(&p),
            vec![
                (Status::Confirmed, None),
                (Status::Ignored, Some(Reason::AlreadyConfirmed))
            ]
        );
        assert!(p.updates.is_empty() && p.deltas.is_empty());
    }

    #[test]
    fn settling_unknown_or_rejected_orders_is_ignored() {
        let p = plan(
            &[
                pay("x", "e1"),
                cancel("x", "e2"),
                reserve("r", &[(1, 9)]),
                pay("r", "e3"),
            ],
            HashMap::new(),
            &stock(&[(1, 1)]),
        );
        assert_eq!(
            statuses(&p),
            vec![
                (Status::Ignored, Some(Reason::NotReserved)),
                (Status::Ignored, Some(Reason::NotReserved)),
                (Status::Rejected, Some(Reason::InsufficientStock)),
                (Status::Ignored, Some(Reason::NotReserved)),
            ]
        );
    }

    #[test]
    fn cancel_of_existing_reservation_is_an_update() {
        let row = LedgerRow {
            status: OrderStatus::Reserved,
            reject: None,
            release_reason: None,
            settled_by: None,
            items: vec![Item {
                product_id: 1,
                quantity: 4,
            }],
            token: None,
            comp_gen: None,
            customer: None,
        };
        let p = plan(
            &[cancel("a", "e")],
            HashMap::from([("a".to_owned(), row)]),
            &stock(&[(1, 0)]),
        );
        assert_eq!(p.updates.len(), 1);
        assert_eq!(p.updates[0].1.status, OrderStatus::Released);
        assert_eq!(
            p.deltas[&1],
            Delta {
                available: 4,
                reserved: -4,
                sold: 0
            }
        );
    }

    // -----------------------------------------------------------------------------------
    // Per-customer limits
    // -----------------------------------------------------------------------------------

    fn reserve_c(id: &str, items: &[(i64, i64)], customer: Option<&str>) -> DeductCommand {
        match reserve(id, items) {
            DeductCommand::Reserve {
                v, order_id, items, ..
            } => DeductCommand::Reserve {
                v,
                order_id,
                items,
                token: None,
                customer: customer.map(str::to_owned),
            },
            other => other,
        }
    }

    /// Limits `(product, per customer)` and counts `(product, customer, units)`.
    fn limits(per: &[(i64, i64)], held: &[(i64, &str, i64)]) -> Limits {
        Limits {
            per_customer: per.iter().copied().collect(),
            units: held
                .iter()
                .map(|&(p, c, n)| ((p, c.to_owned()), n))
                .collect(),
        }
    }

    fn plan_l(
        ops: &[DeductCommand],
        known: HashMap<String, LedgerRow>,
        st: &[(i64, i64)],
        l: &Limits,
    ) -> Plan {
        super::plan(ops, known, &stock(st), l, &SlotLoads::whole(0))
    }

    fn units(pairs: &[(i64, &str, i64)]) -> BTreeMap<UnitKey, i64> {
        pairs
            .iter()
            .map(|&(p, c, n)| ((p, c.to_owned()), n))
            .collect()
    }

    #[test]
    fn an_order_without_customer_for_a_limited_product_is_invalid() {
        let l = limits(&[(2, 5)], &[]);
        // the limited product is the second item, the first one unknown: rule 1 comes first
        let p = plan_l(
            &[reserve_c("a", &[(9, 1), (2, 1)], None)],
            HashMap::new(),
            &[(2, 10)],
            &l,
        );
        assert_eq!(
            p.results,
            vec![StockResult::rejected("a", Reason::InvalidOrder, None)]
        );
        assert!(p.deltas.is_empty() && p.units.is_empty());
        assert_eq!(p.compensations.len(), 1);
        assert_eq!(p.compensations[0].cause, CompensationCause::Rejected);
        assert_eq!(p.inserts[0].1.reject, Some((Reason::InvalidOrder, None)));
        // without customer on unlimited products: as before
        let p = plan_l(
            &[reserve_c("b", &[(1, 1)], None)],
            HashMap::new(),
            &[(1, 1), (2, 1)],
            &l,
        );
        assert_eq!(p.results, vec![StockResult::reserved("b")]);
        assert!(p.units.is_empty());
    }

    #[test]
    fn a_customer_reserves_up_to_the_limit_within_a_batch() {
        let l = limits(&[(1, 2)], &[]);
        let ops = [
            reserve_c("a1", &[(1, 1)], Some("ann")),
            reserve_c("b1", &[(1, 2)], Some("bob")),
            reserve_c("a2", &[(1, 1)], Some("ann")),
            reserve_c("a3", &[(1, 1)], Some("ann")),
            reserve_c("b2", &[(1, 1)], Some("bob")),
            reserve_c("c1", &[(1, 3)], Some("cid")),
        ];
        let p = plan_l(&ops, HashMap::new(), &[(1, 100)], &l);
        assert_eq!(
            statuses(&p),
            vec![
                (Status::Reserved, None),
                (Status::Reserved, None),
                (Status::Reserved, None),
                (Status::Rejected, Some(Reason::LimitExceeded)),
                (Status::Rejected, Some(Reason::LimitExceeded)),
                (Status::Rejected, Some(Reason::LimitExceeded)),
            ]
        );
        assert_eq!(p.results[3].product_id, Some(1));
        assert_eq!(p.units, units(&[(1, "ann", 2), (1, "bob", 2)]));
        assert_eq!(p.deltas[&1].reserved, 4);
        // every refusal gives its pre-deduction back, as a stock refusal does
        assert_eq!(p.compensations.len(), 3);
        assert!(p
            .compensations
            .iter()
            .all(|c| c.cause == CompensationCause::Rejected && c.customer.is_none()));
        assert_eq!(p.inserts[0].1.customer.as_deref(), Some("ann"));
        assert_eq!(p.inserts[3].1.customer.as_deref(), Some("ann"));
    }

    #[test]
    fn held_units_count_and_a_lowered_limit_refuses_the_next_order() {
        // ann holds 3, the limit is now 2: refused, nothing taken back
        let l = limits(&[(1, 2)], &[(1, "ann", 3), (1, "bob", 1)]);
        let p = plan_l(
            &[
                reserve_c("a", &[(1, 1)], Some("ann")),
                reserve_c("b", &[(1, 1)], Some("bob")),
                reserve_c("b2", &[(1, 1)], Some("bob")),
            ],
            HashMap::new(),
            &[(1, 10)],
            &l,
        );
        assert_eq!(
            statuses(&p),
            vec![
                (Status::Rejected, Some(Reason::LimitExceeded)),
                (Status::Reserved, None),
                (Status::Rejected, Some(Reason::LimitExceeded)),
            ]
        );
        assert_eq!(p.units, units(&[(1, "bob", 1)]));
    }

    #[test]
    fn a_limit_of_zero_refuses_every_order() {
        let l = limits(&[(1, 0)], &[]);
        let p = plan_l(
            &[reserve_c("a", &[(1, 1)], Some("ann"))],
            HashMap::new(),
            &[(1, 10)],
            &l,
        );
        assert_eq!(
            p.results,
            vec![StockResult::rejected("a", Reason::LimitExceeded, Some(1))]
        );
        assert!(p.units.is_empty() && p.deltas.is_empty());
    }

    #[test]
    fn the_first_item_that_fails_decides_stock_before_limit() {
        let l = limits(&[(1, 1), (2, 1)], &[]);
        // item 1 over its limit comes before item 2 short
        let p = plan_l(
            &[reserve_c("a", &[(1, 2), (2, 5)], Some("ann"))],
            HashMap::new(),
            &[(1, 10), (2, 1)],
            &l,
        );
        assert_eq!(
            p.results[0],
            StockResult::rejected("a", Reason::LimitExceeded, Some(1))
        );
        // on the same item, stock short comes first
        let p = plan_l(
            &[reserve_c("a", &[(1, 2)], Some("ann"))],
            HashMap::new(),
            &[(1, 1)],
            &l,
        );
        assert_eq!(
            p.results[0],
            StockResult::rejected("a", Reason::InsufficientStock, Some(1))
        );
        // an unknown product before a later limited item
        let p = plan_l(
            &[reserve_c("a", &[(9, 1), (1, 2)], Some("ann"))],
            HashMap::new(),
            &[(1, 10)],
            &l,
        );
        assert_eq!(
            p.results[0],
            StockResult::rejected("a", Reason::UnknownProduct, Some(9))
        );
    }

    #[test]
    fn a_multi_item_order_over_a_limit_reserves_nothing() {
        let l = limits(&[(2, 1)], &[]);
        let p = plan_l(
            &[reserve_c("a", &[(1, 3), (2, 2)], Some("ann"))],
            HashMap::new(),
            &[(1, 10), (2, 10)],
            &l,
        );
        assert_eq!(
            p.results[0],
            StockResult::rejected("a", Reason::LimitExceeded, Some(2))
        );
        assert!(p.deltas.is_empty() && p.units.is_empty());
        assert_eq!(p.compensations[0].items.len(), 2);
        // within the limit: both reserved, only the limited product counted
        let p = plan_l(
            &[reserve_c("b", &[(1, 3), (2, 1)], Some("ann"))],
            HashMap::new(),
            &[(1, 10), (2, 10)],
            &l,
        );
        assert_eq!(p.results[0], StockResult::reserved("b"));
        assert_eq!(p.units, units(&[(2, "ann", 1)]));
    }

    #[test]
    fn cancel_gives_units_back_and_pay_keeps_them() {
        let row = |customer: &str| LedgerRow {
            status: OrderStatus::Reserved,
            reject: None,
            release_reason: None,
            settled_by: None,
            items: vec![
                Item {
                    product_id: 1,
                    quantity: 2,
                },
                Item {
                    product_id: 3,
                    quantity: 1,
                },
            ],
            token: None,
            comp_gen: None,
            customer: Some(customer.to_owned()),
        };
        let known = HashMap::from([("c".to_owned(), row("ann")), ("p".to_owned(), row("bob"))]);
        let l = limits(&[(1, 2)], &[(1, "ann", 2), (1, "bob", 2)]);
        let p = plan_l(
            &[
                cancel("c", "e1"),
                pay("p", "e2"),
                // ann's units are back within the batch: her next order is reserved
                reserve_c("n", &[(1, 2)], Some("ann")),
                reserve_c("m", &[(1, 1)], Some("bob")),
            ],
            known,
            &[(1, 10), (3, 10)],
            &l,
        );
        assert_eq!(
            statuses(&p),
            vec![
                (Status::Released, Some(Reason::Cancelled)),
                (Status::Confirmed, None),
                (Status::Reserved, None),
                (Status::Rejected, Some(Reason::LimitExceeded)),
            ]
        );
        // ann −2 + 2: no change to write; bob's payment moved nothing
        assert!(p.units.is_empty(), "{:?}", p.units);
        // the cancel alone
        let known = HashMap::from([("c".to_owned(), row("ann"))]);
        let p = plan_l(&[cancel("c", "e1")], known.clone(), &[(1, 10), (3, 10)], &l);
        assert_eq!(p.units, units(&[(1, "ann", -2)]));
        // a product no longer limited: nothing to give back
        let p = plan_l(
            &[cancel("c", "e1")],
            known,
            &[(1, 10), (3, 10)],
            &Limits::default(),
        );
        assert!(p.units.is_empty());
    }

    #[test]
    fn a_redelivery_keeps_the_first_customer_and_counts_nothing() {
        let l = limits(&[(1, 5)], &[]);
        let first = plan_l(
            &[reserve_c("a", &[(1, 2)], Some("ann"))],
            HashMap::new(),
            &[(1, 10)],
            &l,
        );
        let known: HashMap<_, _> = first.inserts.into_iter().collect();
        let l = limits(&[(1, 5)], &[(1, "ann", 2)]);
        let again = plan_l(
            &[reserve_c("a", &[(1, 2)], Some("bob"))],
            known.clone(),
            &[(1, 8)],
            &l,
        );
        assert_eq!(again.results, first.results);
        assert!(again.units.is_empty() && again.inserts.is_empty() && again.deltas.is_empty());
        assert_eq!(known["a"].customer.as_deref(), Some("ann"));
    }

    #[test]
    fn redecide_carries_the_customer_and_a_duplicate_does_not() {
        let cmd = |token: &str| match reserve_c("a", &[(1, 1)], Some("ann")) {
            DeductCommand::Reserve {
                v,
                order_id,
                items,
                customer,
                ..
            } => DeductCommand::Reserve {
                v,
                order_id,
                items,
                token: Some(token.into()),
                customer,
            },
            other => other,
        };
        let l = limits(&[(1, 5)], &[]);
        let p = super::plan(
            &[cmd("3.1")],
            HashMap::new(),
            &stock(&[(1, 5)]),
            &l,
            &SlotLoads::whole(4),
        );
        assert_eq!(p.compensations.len(), 1);
        assert_eq!(p.compensations[0].cause, CompensationCause::Redecide);
        assert_eq!(p.compensations[0].customer.as_deref(), Some("ann"));
        assert!(p.units.is_empty());
        let first = super::plan(
            &[cmd("4.1")],
            HashMap::new(),
            &stock(&[(1, 5)]),
            &l,
            &SlotLoads::whole(4),
        );
        assert_eq!(first.units, units(&[(1, "ann", 1)]));
        let known: HashMap<_, _> = first.inserts.into_iter().collect();
        let dup = super::plan(
            &[cmd("4.2")],
            known,
            &stock(&[(1, 4)]),
            &l,
            &SlotLoads::whole(4),
        );
        assert_eq!(dup.compensations[0].cause, CompensationCause::Duplicate);
        assert_eq!(dup.compensations[0].customer, None);
        assert!(dup.units.is_empty());
    }

    #[test]
    fn only_limited_items_with_a_customer_need_their_counts_read() {
        let per = HashMap::from([(1, 2)]);
        let ops = [
            reserve_c("a", &[(1, 1), (2, 1)], Some("ann")),
            reserve_c("b", &[(1, 1)], None),
            reserve_c("c", &[(2, 1)], Some("cid")),
            cancel("d", "e"),
        ];
        let pairs = Limits::pairs_needed(&ops, &per);
        assert_eq!(
            pairs.into_iter().collect::<Vec<_>>(),
            vec![(1, "ann".to_owned())]
        );
        assert!(Limits::pairs_needed(&ops, &HashMap::new()).is_empty());
    }
}
