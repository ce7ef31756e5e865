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

use std::collections::{BTreeMap, HashMap};
use stock_common::events::{
    Compensation, CompensationCause, DeductCommand, Item, Reason, Status, StockResult, Token,
    INTERNAL_VERSION,
};
pub use stock_common::pg_store::{Delta, LedgerRow, Movement, OrderStatus};

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
}

struct Entry {
    row: LedgerRow,
    new: bool,
    dirty: bool,
}

/// Decides a batch. `known` holds the ledger rows of the batch's orders (read while the
/// stock rows of those orders are locked); `available` the `available` column of every
/// existing product the batch touches; `gen` the Redis generation PostgreSQL answers to
/// (`redis_generation`, read first in the same transaction).
pub fn plan(
    ops: &[DeductCommand],
    known: HashMap<String, LedgerRow>,
    available: &HashMap<i64, i64>,
    gen: i64,
) -> Plan {
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
        gen,
    };
    for op in ops {
        match op {
            DeductCommand::Reserve {
                order_id,
                items,
                token,
                ..
            } => p.reserve(order_id, items, token.as_deref()),
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
                    gen,
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
    gen: i64,
}

impl Planner<'_> {
    /// A pre-deduction of `order_id` named `token` (module docs: `reserve`).
    fn reserve(&mut self, order_id: &str, items: &[Item], token: Option<&str>) {
        let gen = self.gen;
        let token_gen = token.and_then(Token::parse).map(|t| t.gen);
        let give_back = |cause, token: Option<&str>, gen| Compensation {
            v: INTERNAL_VERSION,
            order_id: order_id.to_owned(),
            items: items.to_vec(),
            cause,
            token: token.map(str::to_owned),
            gen,
            customer: None,
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
            } else if token_gen == Some(gen) {
                // A second pre-deduction in this generation: give it back. (One from an
                // older generation is not held by the rebuilt Redis.)
                let c = give_back(CompensationCause::Duplicate, token, Some(gen));
                self.plan.compensations.push(c);
            }
            return;
        }
        if token_gen.is_some_and(|g| g != gen) {
            // Taken in a generation since rebuilt, never applied here: decide it again.
            let c = give_back(CompensationCause::Redecide, None, None);
            self.plan.compensations.push(c);
            return;
        }
        let row = match shortfall(items, self.available, &self.plan.deltas) {
            Some(reject) => {
                let row = LedgerRow {
                    status: OrderStatus::Rejected,
                    reject: Some(reject),
                    release_reason: None,
                    settled_by: None,
                    items: items.to_vec(),
                    token: token.map(str::to_owned),
                    comp_gen: Some(gen),
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
                LedgerRow {
                    status: OrderStatus::Reserved,
                    reject: None,
                    release_reason: None,
                    settled_by: None,
                    items: items.to_vec(),
                    token: token.map(str::to_owned),
                    comp_gen: None,
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
        };
        self.insert(order_id, row);
    }

    fn cancel(&mut self, order_id: &str, event: &str) {
        let result = settle(
            &mut self.ledger,
            &mut self.plan,
            order_id,
            event,
            Settle::Cancel,
            self.gen,
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
        self.plan
    }
}

/// The first item that cannot be served, as the rejection it causes.
fn shortfall(
    items: &[Item],
    available: &HashMap<i64, i64>,
    deltas: &BTreeMap<i64, Delta>,
) -> Option<(Reason, Option<i64>)> {
    items
        .iter()
        .find_map(|it| match available.get(&it.product_id) {
            None => Some((Reason::UnknownProduct, Some(it.product_id))),
            Some(base) => {
                let now = base + deltas.get(&it.product_id).map_or(0, |d| d.available);
                (now < it.quantity).then_some((Reason::InsufficientStock, Some(it.product_id)))
            }
        })
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
    gen: i64,
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
        super::plan(ops, known, available, 0)
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
            4,
        );
        let known: HashMap<_, _> = first.inserts.into_iter().collect();
        // the same pre-deduction again: a redelivery, nothing to give back
        let again = super::plan(
            &[reserve_t("a", &[(1, 2)], "4.10")],
            known.clone(),
            &stock(&[(1, 3)]),
            4,
        );
        assert_eq!(again.results, first.results);
        assert!(again.compensations.is_empty() && again.deltas.is_empty());
        // another pre-deduction of the same order (its record was forgotten): given back
        let dup = super::plan(
            &[reserve_t("a", &[(1, 2)], "4.99")],
            known.clone(),
            &stock(&[(1, 3)]),
            4,
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
            4,
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
            4,
        );
        assert!(p.results.is_empty() && p.inserts.is_empty() && p.deltas.is_empty());
        assert_eq!(p.compensations.len(), 1);
        assert_eq!(p.compensations[0].cause, CompensationCause::Redecide);
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
            4,
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
}
