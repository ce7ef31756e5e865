//! Issue 12, session 25: autoanalyze of `stock_movement` grew to 2 s of CPU once a minute
//! at half the maximum rate, because ANALYZE computed element statistics over every element
//! of the six arrays of 30,000 sampled rows. Migration 0009 keeps no statistics for the
//! sums and samples 3,000 rows for the rest. This test analyzes a grown history and reads
//! what ANALYZE left: nothing for the sums, `products`' elements from the small sample, and
//! `stockctl history`'s read still through the GIN index.

use sqlx::Row;
use stock_e2e::TestEnv;

const SUMS: &[&str] = &[
    "available_deltas",
    "orders",
    "quantities",
    "reserved_deltas",
    "sold_deltas",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_of_the_history_skips_its_sums_and_samples_few_rows() {
    let env = TestEnv::new().await;
    // 5,000 batches' rows of 50 products each, products 1 to 1,000.
    sqlx::query(
        "INSERT INTO stock_movement
             (kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders)
         SELECT 'reserve', 's-' || r, p, q, q, q, q, o
         FROM generate_series(1, 5000) r,
         LATERAL (SELECT array_agg(g ORDER BY g) p, array_agg(-((g + r) % 3 + 1)) q,
                         array_agg(((g + r) % 3 + 1)::int) o
                  FROM generate_series(1 + r % 20, 1000, 20) g) a",
    )
    .execute(&env.pool)
    .await
    .expect("grow the history");
    sqlx::query("ANALYZE stock_movement")
        .execute(&env.pool)
        .await
        .expect("analyze");

    let rows = sqlx::query(
        "SELECT attname::text, cardinality(histogram_bounds::text::text[]) AS bounds,
                most_common_elems IS NOT NULL AS elems
         FROM pg_stats WHERE schemaname = current_schema() AND tablename = 'stock_movement'",
    )
    .fetch_all(&env.pool)
    .await
    .expect("pg_stats");
    let mut columns = std::collections::BTreeMap::new();
    for r in &rows {
        let name: String = r.get("attname");
        let bounds: Option<i32> = r.get("bounds");
        let elems: bool = r.get("elems");
        columns.insert(name, (bounds, elems));
    }
    for sum in SUMS {
        assert!(
            !columns.contains_key(*sum),
            "ANALYZE computed statistics of {sum}: {columns:?}"
        );
    }
    // A statistics target of 10: at most 11 histogram bounds (100 would give 101).
    let (id_bounds, _) = columns.get("id").copied().expect("id has statistics");
    assert!(
        id_bounds.is_some_and(|b| (2..=11).contains(&b)),
        "id's histogram: {id_bounds:?}"
    );
    let (_, products_elems) = columns
        .get("products")
        .copied()
        .expect("products has statistics");
    assert!(products_elems, "products keeps its element statistics");

    // `stockctl history`'s read of one product still goes through the GIN index.
    let plan: String = sqlx::query(
        "EXPLAIN (FORMAT TEXT) SELECT id FROM stock_movement WHERE products @> ARRAY[7::bigint]",
    )
    .fetch_all(&env.pool)
    .await
    .expect("explain")
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect::<Vec<_>>()
    .join("\n");
    assert!(
        plan.contains("stock_movement_products"),
        "the history of one product scans the table:\n{plan}"
    );
    env.cleanup().await;
}
