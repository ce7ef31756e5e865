//! The consumer's decisions, as a pure function: given a batch of deduct commands in
//! offset order, what the ledger already knows of their orders, and the stock rows, what
//! changes and what is published. No I/O here, so every rule has a unit test.
//!
//! Rules (contract "Results"):
//! * `reserve` of an order never seen: all items or none, never below zero; an unknown
//!   product or the first item short rejects the order (and its Redis stock is
//!   compensated). Of an order seen before: its recorded outcome again, nothing changed.
//! * `pay`: reserved → confirmed (`reserved -= q, sold += q`).
//! * `cancel`: reserved → released/cancelled (`reserved -= q, available += q`), and the
//!   stock goes back to Redis by a compensation.
//! * A pay or cancel that finds the order settled is `ignored` with the reason, unless it
//!   is the very event that settled it (a redelivery): then its own result comes again.

use std::collections::{BTreeMap, HashMap};
use stock_common::events::{
    Compensation, CompensationCause, DeductCommand, Item, Reason, Status, StockResult,
    INTERNAL_VERSION,
};

/// State of an order in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Reserved,
    Rejected,
    Confirmed,
    Released,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "reserved",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Released => "released",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserved" => OrderStatus::Reserved,
            "rejected" => OrderStatus::Rejected,
            "confirmed" => OrderStatus::Confirmed,
            "released" => OrderStatus::Released,
            _ => return None,
        })
    }
}

/// One row of `order_ledger`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub status: OrderStatus,
    /// Why `order_created` was rejected here, and the first product short.
    pub reject: Option<(Reason, Option<i64>)>,
    pub release_reason: Option<Reason>,
    pub settled_by: Option<String>,
    pub items: Vec<Item>,
}

impl LedgerRow {
    /// The result of the order's `order_created`, whatever happened to it since.
    pub fn created_outcome(&self, order_id: &str) -> StockResult {
        match self.reject {
            Some((reason, product)) => StockResult::rejected(order_id, reason, product),
            None => StockResult::reserved(order_id),
        }
    }
}

/// Change of one product's columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

/// One row of the stock movement history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Movement {
    pub product_id: i64,
    /// `reserve`, `confirm`, `release_cancelled`, `release_expired` or `compensation`.
    pub kind: &'static str,
    pub order_id: String,
    pub quantity: i64,
    pub delta: Delta,
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
}

struct Entry {
    row: LedgerRow,
    new: bool,
    dirty: bool,
}

/// Decides a batch. `known` holds the ledger rows of the batch's orders (read while the
/// stock rows of those orders are locked); `available` the `available` column of every
/// existing product the batch touches.
pub fn plan(
    ops: &[DeductCommand],
    known: HashMap<String, LedgerRow>,
    available: &HashMap<i64, i64>,
) -> Plan {
    let mut ledger: HashMap<String, Entry> = known
        .into_iter()
        .map(|(id, row)| {
            (
                id,
                Entry {
                    row,
                    new: false,
                    dirty: false,
                },
            )
        })
        .collect();
    let mut plan = Plan::default();
    let mut first_insert_order: Vec<String> = Vec::new();

    for op in ops {
        match op {
            DeductCommand::Reserve {
                order_id, items, ..
            } => {
                if let Some(e) = ledger.get(order_id) {
                    plan.results.push(e.row.created_outcome(order_id));
                    if e.row.status == OrderStatus::Rejected {
                        plan.compensations.push(compensation(
                            order_id,
                            &e.row.items,
                            CompensationCause::Rejected,
                        ));
                    }
                    continue;
                }
                let row = match shortfall(items, available, &plan.deltas) {
                    Some(reject) => LedgerRow {
                        status: OrderStatus::Rejected,
                        reject: Some(reject),
                        release_reason: None,
                        settled_by: None,
                        items: items.clone(),
                    },
                    None => {
                        for it in items {
                            let delta = Delta {
                                available: -it.quantity,
                                reserved: it.quantity,
                                sold: 0,
                            };
                            record(
                                &mut plan.deltas,
                                &mut plan.movements,
                                "reserve",
                                order_id,
                                it,
                                delta,
                            );
                        }
                        LedgerRow {
                            status: OrderStatus::Reserved,
                            reject: None,
                            release_reason: None,
                            settled_by: None,
                            items: items.clone(),
                        }
                    }
                };
                plan.results.push(row.created_outcome(order_id));
                if row.status == OrderStatus::Rejected {
                    plan.compensations.push(compensation(
                        order_id,
                        items,
                        CompensationCause::Rejected,
                    ));
                    for it in items {
                        let none = Delta::default();
                        record(
                            &mut plan.deltas,
                            &mut plan.movements,
                            "compensation",
                            order_id,
                            it,
                            none,
                        );
                    }
                }
                first_insert_order.push(order_id.clone());
                ledger.insert(
                    order_id.clone(),
                    Entry {
                        row,
                        new: true,
                        dirty: true,
                    },
                );
            }
            DeductCommand::Pay {
                order_id, event, ..
            } => {
                let result = settle(&mut ledger, &mut plan, order_id, event, Settle::Pay);
                plan.results.push(result);
            }
            DeductCommand::Cancel {
                order_id, event, ..
            } => {
                let result = settle(&mut ledger, &mut plan, order_id, event, Settle::Cancel);
                if result.status == Status::Released {
                    if let Some(e) = ledger.get(order_id) {
                        plan.compensations.push(compensation(
                            order_id,
                            &e.row.items,
                            CompensationCause::Cancelled,
                        ));
                    }
                }
                plan.results.push(result);
            }
        }
    }

    for id in first_insert_order {
        if let Some(e) = ledger.remove(&id) {
            plan.inserts.push((id, e.row));
        }
    }
    let mut updates: Vec<(String, LedgerRow)> = ledger
        .into_iter()
        .filter(|(_, e)| e.dirty && !e.new)
        .map(|(id, e)| (id, e.row))
        .collect();
    updates.sort_by(|a, b| a.0.cmp(&b.0));
    plan.updates = updates;
    plan.deltas.retain(|_, d| *d != Delta::default());
    plan
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
    let d = deltas.entry(it.product_id).or_default();
    d.available += delta.available;
    d.reserved += delta.reserved;
    d.sold += delta.sold;
    movements.push(Movement {
        product_id: it.product_id,
        kind,
        order_id: order_id.to_owned(),
        quantity: it.quantity,
        delta,
    });
}

/// The compensation giving an order's stock back to Redis.
pub fn compensation(order_id: &str, items: &[Item], cause: CompensationCause) -> Compensation {
    Compensation {
        v: INTERNAL_VERSION,
        order_id: order_id.to_owned(),
        items: items.to_vec(),
        cause,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
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
