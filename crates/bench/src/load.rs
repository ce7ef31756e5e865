//! The order load: deterministic (same seed, same orders), orders of one or more items, a
//! share of the items on one hot SKU (product 1) and the rest spread evenly over the other
//! products; and the stock that makes a chosen share of the demand sellable. Orders may
//! name a customer drawn from a skewed population ([`Rng::skewed`]: a fifth of the
//! customers send four fifths of the orders), for per-customer limits (issue 13).

use std::collections::BTreeMap;
use stock_common::events::Item;
use stock_devkit::rng::Rng;

/// The hot SKU.
pub const HOT_PRODUCT: i64 = 1;

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub orders: usize,
    /// Products `1..=products`; product 1 is the hot SKU.
    pub products: i64,
    /// Share of items (0 to 1) for the hot SKU. An order holds a product at most once, so
    /// with several items per order an order's later items are drawn from the other
    /// products once it holds the hot SKU (fewer items than this share are hot).
    pub hot_share: f64,
    /// Items of every order (distinct products, sorted by product id); at most `products`.
    pub items_per_order: usize,
    /// Quantities are drawn evenly from `1..=max_quantity`.
    pub max_quantity: i64,
    pub seed: u64,
    /// Customers `c-0` to `c-<n-1>`, one per order (skewed); 0: orders name no customer.
    pub customers: usize,
}

/// One `order_created`.
#[derive(Debug, Clone)]
pub struct Order {
    pub id: String,
    pub items: Vec<Item>,
    /// Its `customer_id`, if any.
    pub customer: Option<String>,
}

/// The orders of `spec`, with ids `<prefix><n>`. Single-item loads are the same for a seed
/// whatever the version that added multi-item orders; the customers come from a stream of
/// their own, so the items are the same with or without them.
pub fn generate(spec: &LoadSpec, prefix: &str) -> Vec<Order> {
    let mut rng = Rng::new(spec.seed);
    let mut customers = Rng::new(spec.seed ^ 0xC057_0E45_0000_0013);
    let per_order = spec.items_per_order.clamp(
        1,
        usize::try_from(spec.products.max(1)).unwrap_or(usize::MAX),
    );
    (0..spec.orders)
        .map(|n| {
            let mut items: Vec<Item> = Vec::with_capacity(per_order);
            for _ in 0..per_order {
                let has = |items: &[Item], p: i64| items.iter().any(|it| it.product_id == p);
                let hot_held = has(&items, HOT_PRODUCT);
                // Only the hot SKU is left once the order holds every other product.
                let others_used = (items.len() - usize::from(hot_held)) as i64 >= spec.products - 1;
                let product = if !hot_held && (others_used || rng.unit() < spec.hot_share) {
                    HOT_PRODUCT
                } else {
                    // Rejection sampling: per_order <= products, so an unused one exists.
                    loop {
                        let p = rng.range(2, spec.products as u64 + 1) as i64;
                        if !has(&items, p) {
                            break p;
                        }
                    }
                };
                items.push(Item {
                    product_id: product,
                    quantity: rng.range(1, spec.max_quantity.max(1) as u64 + 1) as i64,
                });
            }
            items.sort_by_key(|it| it.product_id);
            Order {
                id: format!("{prefix}{n}"),
                items,
                customer: (spec.customers > 0)
                    .then(|| format!("c-{}", customers.skewed(spec.customers as u64))),
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
            items_per_order: 1,
            max_quantity: 3,
            seed: 7,
            customers: 0,
        }
    }

    #[test]
    fn customers_are_skewed_and_leave_the_items_alone() {
        let plain = generate(&spec(0.3), "");
        let with = generate(
            &LoadSpec {
                customers: 1000,
                ..spec(0.3)
            },
            "",
        );
        assert!(plain.iter().all(|o| o.customer.is_none()));
        assert!(plain.iter().zip(&with).all(|(a, b)| a.items == b.items));
        let heavy = with
            .iter()
            .filter_map(|o| {
                o.customer
                    .as_deref()?
                    .strip_prefix("c-")?
                    .parse::<u64>()
                    .ok()
            })
            .filter(|&c| c < 200)
            .count();
        assert!((7_700..8_300).contains(&heavy), "{heavy}");
    }

    #[test]
    fn several_items_are_distinct_sorted_and_skewed() {
        let multi = |share: f64, k: usize, products: i64| {
            generate(
                &LoadSpec {
                    items_per_order: k,
                    products,
                    ..spec(share)
                },
                "",
            )
        };
        let orders = multi(0.5, 3, 100);
        for o in &orders {
            assert_eq!(o.items.len(), 3);
            assert!(o
                .items
                .windows(2)
                .all(|w| w[0].product_id < w[1].product_id));
        }
        // Each item slot is hot with probability 0.5 until the order holds the hot SKU.
        let hot = orders
            .iter()
            .filter(|o| o.items[0].product_id == HOT_PRODUCT)
            .count();
        assert!((8_500..9_000).contains(&hot), "{hot}"); // 1 - 0.5^3 = 0.875
                                                         // All hot: one hot item per order, the others elsewhere.
        assert!(multi(1.0, 2, 100)
            .iter()
            .all(|o| o.items[0].product_id == HOT_PRODUCT && o.items[1].product_id != HOT_PRODUCT));
        // Share 0: the hot SKU gets nothing, the others share the load evenly.
        let uniform_hot = multi(0.0, 1, 100)
            .iter()
            .filter(|o| o.items[0].product_id == HOT_PRODUCT)
            .count();
        assert_eq!(uniform_hot, 0);
        // More items than products: capped, every product once.
        assert!(multi(0.3, 5, 3).iter().all(|o| o.items.len() == 3));
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
