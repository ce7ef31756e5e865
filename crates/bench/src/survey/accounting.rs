//! The books of one run, from what the strategy answered and what its store holds at the
//! end: pure functions, so that the rules are tested without a stack.
//!
//! * **granted units** of a product: the units of the orders granted that hold it.
//! * **left** of a product: initial stock − granted units (what the store should hold).
//! * **oversold units**: per product the larger of the units granted beyond its stock
//!   (`granted − initial`) and the stock left below zero in the store (`−final`); summed.
//!   When the store is consistent the two are the same units, hence the larger, not the
//!   sum; when it is not, either alone shows an oversell.
//! * **wrongly refused orders**: refused although, at the end, `left` of every one of its
//!   products still covered its quantity. Stock only ever goes down during a run, so a
//!   strategy that refuses only for want of stock never counts one.
//! * **consistent store**: the store's final value of every product is `left`.

use crate::load::Order;
use std::collections::BTreeMap;

/// The books of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Books {
    pub granted: usize,
    pub refused: usize,
    pub granted_units: i64,
    pub oversold_units: i64,
    pub wrongly_refused: usize,
    /// Products whose final store value is not `initial − granted` (or is missing).
    pub inconsistent_products: usize,
}

impl Books {
    pub fn consistent(&self) -> bool {
        self.inconsistent_products == 0
    }
}

/// Keeps the books of `orders`, whose answers are `granted` (same order), against the
/// `initial` stock and the store's `last` values (None: the product is missing from the
/// store). Products are those of `initial`.
pub fn books(
    orders: &[Order],
    granted: &[bool],
    initial: &BTreeMap<i64, i64>,
    last: &BTreeMap<i64, Option<i64>>,
) -> Books {
    let mut units: BTreeMap<i64, i64> = initial.keys().map(|p| (*p, 0)).collect();
    for (o, _) in orders.iter().zip(granted).filter(|(_, g)| **g) {
        for it in &o.items {
            *units.entry(it.product_id).or_default() += it.quantity;
        }
    }
    let left = |p: i64| initial.get(&p).copied().unwrap_or(0) - units.get(&p).copied().unwrap_or(0);
    let mut b = Books {
        granted: granted.iter().filter(|g| **g).count(),
        refused: granted.iter().filter(|g| !**g).count(),
        granted_units: units.values().sum(),
        oversold_units: 0,
        wrongly_refused: 0,
        inconsistent_products: 0,
    };
    for (&p, &added) in initial {
        let stored = last.get(&p).copied().flatten();
        let beyond = units.get(&p).copied().unwrap_or(0) - added;
        let negative = stored.map_or(0, |v| -v);
        b.oversold_units += beyond.max(negative).max(0);
        if stored != Some(left(p)) {
            b.inconsistent_products += 1;
        }
    }
    b.wrongly_refused = orders
        .iter()
        .zip(granted)
        .filter(|(o, g)| !**g && o.items.iter().all(|it| left(it.product_id) >= it.quantity))
        .count();
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use stock_common::events::Item;

    fn order(items: &[(i64, i64)]) -> Order {
        Order {
            id: String::new(),
            customer: None,
            items: items
                .iter()
                .map(|&(product_id, quantity)| Item {
                    product_id,
                    quantity,
                })
                .collect(),
        }
    }

    fn map<V: Copy>(xs: &[(i64, V)]) -> BTreeMap<i64, V> {
        xs.iter().copied().collect()
    }

    #[test]
    fn a_correct_run() {
        // Product 1: 5 units; orders of 3, 2 and 1: the last is refused, nothing left.
        let orders = [order(&[(1, 3)]), order(&[(1, 2)]), order(&[(1, 1)])];
        let b = books(
            &orders,
            &[true, true, false],
            &map(&[(1, 5)]),
            &map(&[(1, Some(0))]),
        );
        assert_eq!(
            b,
            Books {
                granted: 2,
                refused: 1,
                granted_units: 5,
                oversold_units: 0,
                wrongly_refused: 0,
                inconsistent_products: 0,
            }
        );
        assert!(b.consistent());
    }

    #[test]
    fn oversold_is_counted_once_whichever_way_it_shows() {
        let orders = [order(&[(1, 3)]), order(&[(1, 3)])];
        let initial = map(&[(1, 4)]);
        // Consistent store gone negative: 2 units, not 4.
        let b = books(&orders, &[true, true], &initial, &map(&[(1, Some(-2))]));
        assert_eq!((b.oversold_units, b.consistent()), (2, true));
        // Lost update: granted 6 of 4 but the store says 1.
        let b = books(&orders, &[true, true], &initial, &map(&[(1, Some(1))]));
        assert_eq!((b.oversold_units, b.inconsistent_products), (2, 1));
        // Taken but not granted (a rollback that did not happen): store -1, 3 granted.
        let b = books(&orders, &[true, false], &initial, &map(&[(1, Some(-1))]));
        assert_eq!((b.oversold_units, b.consistent()), (1, false));
    }

    #[test]
    fn wrongly_refused_needs_every_item_covered_at_the_end() {
        let orders = [
            order(&[(1, 2)]),         // refused, 3 of product 1 left: wrong
            order(&[(1, 1), (2, 2)]), // refused, product 2 has 1 left: right
            order(&[(2, 1)]),         // granted
            order(&[(1, 4)]),         // refused, 3 left: right
            order(&[(1, 3), (2, 1)]), // refused, both covered: wrong
        ];
        let b = books(
            &orders,
            &[false, false, true, false, false],
            &map(&[(1, 3), (2, 2)]),
            &map(&[(1, Some(3)), (2, Some(1))]),
        );
        assert_eq!((b.granted, b.refused, b.wrongly_refused), (1, 4, 2));
        assert!(b.consistent());
    }

    #[test]
    fn a_missing_or_wrong_store_value_is_inconsistent() {
        let orders = [order(&[(1, 1)])];
        let initial = map(&[(1, 2), (2, 5)]);
        let b = books(&orders, &[true], &initial, &map(&[(1, Some(1))]));
        assert_eq!(b.inconsistent_products, 1); // product 2 missing
        let b = books(
            &orders,
            &[true],
            &initial,
            &map(&[(1, Some(2)), (2, Some(5))]),
        );
        assert_eq!((b.inconsistent_products, b.oversold_units), (1, 0));
    }
}
