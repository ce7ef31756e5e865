//! The order load: deterministic (same seed, same orders), single-item orders, a share of
//! them on one hot SKU (product 1) and the rest spread evenly over the other products; and
//! the stock that makes a chosen share of the demand sellable.

use std::collections::BTreeMap;
use stock_common::events::Item;
use stockctl::rng::Rng;

/// The hot SKU.
pub const HOT_PRODUCT: i64 = 1;

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub orders: usize,
    /// Products `1..=products`; product 1 is the hot SKU.
    pub products: i64,
    /// Share of orders (0 to 1) for the hot SKU.
    pub hot_share: f64,
    /// Quantities are drawn evenly from `1..=max_quantity`.
    pub max_quantity: i64,
    pub seed: u64,
}

/// One `order_created`.
#[derive(Debug, Clone)]
pub struct Order {
    pub id: String,
    pub items: Vec<Item>,
}

/// The orders of `spec`, with ids `<prefix><n>`.
pub fn generate(spec: &LoadSpec, prefix: &str) -> Vec<Order> {
    let mut rng = Rng::new(spec.seed);
    (0..spec.orders)
        .map(|n| {
            let product = if spec.products <= 1 || rng.unit() < spec.hot_share {
                HOT_PRODUCT
            } else {
                rng.range(2, spec.products as u64 + 1) as i64
            };
            Order {
                id: format!("{prefix}{n}"),
                items: vec![Item {
                    product_id: product,
                    quantity: rng.range(1, spec.max_quantity.max(1) as u64 + 1) as i64,
                }],
            }
        })
        .collect()
}

/// Units ordered of each product.
pub fn demand(orders: &[Order]) -> BTreeMap<i64, i64> {
    let mut d = BTreeMap::new();
    for it in orders.iter().flat_map(|o| &o.items) {
        *d.entry(it.product_id).or_default() += it.quantity;
    }
    d
}

/// Initial stock of every product `1..=products`: `fixed` units each, or else `fill` of
/// the units ordered of it (rounded down), so that about that share of orders is reserved.
pub fn stock(
    products: i64,
    demand: &BTreeMap<i64, i64>,
    fixed: Option<i64>,
    fill: f64,
) -> BTreeMap<i64, i64> {
    (1..=products)
        .map(|p| {
            let units = match fixed {
                Some(n) => n,
                None => (demand.get(&p).copied().unwrap_or(0) as f64 * fill).floor() as i64,
            };
            (p, units)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hot_share: f64) -> LoadSpec {
        LoadSpec {
            orders: 10_000,
            products: 100,
            hot_share,
            max_quantity: 3,
            seed: 7,
        }
    }

    #[test]
    fn deterministic_and_within_bounds() {
        let a = generate(&spec(0.3), "x-");
        let b = generate(&spec(0.3), "x-");
        assert_eq!(a.len(), 10_000);
        assert!(a.iter().zip(&b).all(|(x, y)| x.items == y.items));
        assert!(a.iter().all(|o| o.items.len() == 1
            && (1..=100).contains(&o.items[0].product_id)
            && (1..=3).contains(&o.items[0].quantity)));
        assert_eq!(a[17].id, "x-17");
    }

    #[test]
    fn hot_share_is_respected() {
        let hot = |s: f64| {
            generate(&spec(s), "")
                .iter()
                .filter(|o| o.items[0].product_id == HOT_PRODUCT)
                .count()
        };
        assert_eq!(hot(0.0), 0);
        assert_eq!(hot(1.0), 10_000);
        assert!((2_800..3_200).contains(&hot(0.3)));
    }

    #[test]
    fn stock_follows_demand() {
        let orders = generate(&spec(0.5), "");
        let d = demand(&orders);
        let s = stock(100, &d, None, 0.7);
        assert_eq!(s.len(), 100);
        assert_eq!(s[&1], (d[&1] as f64 * 0.7).floor() as i64);
        assert_eq!(stock(3, &d, Some(5), 0.7).values().sum::<i64>(), 15);
    }
}
