//! PostgreSQL's background work on the two tables that grow with every batch, the history
//! and the ledger (issue 12, sessions 25 and 26): at half the maximum rate it ran once a
//! minute on a box already 80% busy, and the soak's p99 jumped with every round.
//!
//! - What ANALYZE keeps. `stock_movement`'s autoanalyze grew to 2 s of CPU (element
//!   statistics over every element of six arrays of 30,000 sampled rows), `order_ledger`'s
//!   was 0.4 s (every column of 30,000 rows, the items' jsonb included). Migrations 0009 and
//!   0010 keep statistics only of the columns a statement filters on, from a sample of 3,000
//!   rows. Each test grows its table, analyzes it and reads what ANALYZE left.
//! - When the ledger is vacuumed. An insert vacuum waited for inserts of 20% of the table,
//!   so its rounds grew with the ledger and logged most of their pages again in the WAL
//!   (checksums: the first change of a page after a checkpoint logs all of it). Migration
//!   0010 vacuums it every 100,000 inserted orders, whatever its size.

use std::collections::BTreeMap;

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
    let columns = analyze(&env, "stock_movement").await;
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

/// The ledger's columns no statement filters on (0010).
const LEDGER_UNFILTERED: &[&str] = &[
    "comp_gen",
    "created_at",
    "items",
    "reject_product",
    "reject_reason",
    "release_reason",
    "settled_at",
    "settled_by",
    "token",
];

/// The columns the ledger's statements filter on: the batch's key, the expiry sweep's
/// status and deadline, the sweep's outbox flag, the limits' recount by customer.
const LEDGER_FILTERED: &[&str] = &[
    "announced",
    "customer_id",
    "order_id",
    "reserved_until",
    "status",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_of_the_ledger_keeps_only_the_filtered_columns() {
    let env = TestEnv::new().await;
    // 20,000 decided orders: reserved (some with a customer), refused, paid.
    sqlx::query(
        "INSERT INTO order_ledger
             (order_id, status, reject_reason, reject_product, settled_by, items, reserved_until,
              settled_at, token, customer_id)
         SELECT 'o-' || n, s, CASE WHEN s = 'rejected' THEN 'insufficient_stock' END,
                CASE WHEN s = 'rejected' THEN n % 1000 END,
                CASE WHEN s = 'confirmed' THEN 'p0@' || n END,
                jsonb_build_array(jsonb_build_object('product_id', n % 1000 + 1, 'quantity', n % 3 + 1)),
                CASE WHEN s = 'reserved' THEN now() + make_interval(secs => 900 + n % 60) END,
                CASE WHEN s = 'confirmed' THEN now() END,
                '1.' || n, CASE WHEN n % 4 = 0 THEN 'c-' || n % 500 END
         FROM generate_series(1, 20000) n,
              LATERAL (SELECT (ARRAY['reserved', 'reserved', 'rejected', 'confirmed'])[n % 4 + 1] AS s) k",
    )
    .execute(&env.pool)
    .await
    .expect("grow the ledger");
    let columns = analyze(&env, "order_ledger").await;
    for column in LEDGER_UNFILTERED {
        assert!(
            !columns.contains_key(*column),
            "ANALYZE computed statistics of order_ledger.{column}: {columns:?}"
        );
    }
    for column in LEDGER_FILTERED {
        assert!(
            columns.contains_key(*column),
            "ANALYZE left order_ledger.{column} without statistics: {columns:?}"
        );
    }
    // A statistics target of 10: at most 11 histogram bounds of the unique key (100: 101).
    let (key_bounds, _) = columns.get("order_id").copied().unwrap_or_default();
    assert!(
        key_bounds.is_some_and(|b| (2..=11).contains(&b)),
        "order_id's histogram: {key_bounds:?}"
    );
    env.cleanup().await;
}

/// ANALYZEs `table` and reads what it left in `pg_stats`: per column, the number of histogram
/// bounds and whether it has element statistics (arrays).
async fn analyze(env: &TestEnv, table: &str) -> BTreeMap<String, (Option<i32>, bool)> {
    sqlx::query(&format!("ANALYZE {table}"))
        .execute(&env.pool)
        .await
        .expect("analyze");
    let rows = sqlx::query(
        "SELECT attname::text, cardinality(histogram_bounds::text::text[]) AS bounds,
                most_common_elems IS NOT NULL AS elems
         FROM pg_stats WHERE schemaname = current_schema() AND tablename = $1",
    )
    .bind(table)
    .fetch_all(&env.pool)
    .await
    .expect("pg_stats");
    rows.iter()
        .map(|r| (r.get("attname"), (r.get("bounds"), r.get("elems"))))
        .collect()
}

/// Autovacuum's insert threshold of the ledger (migration 0010).
const LEDGER_INSERT_THRESHOLD: i64 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_ledger_is_vacuumed_after_a_fixed_number_of_inserts() {
    let env = TestEnv::new().await;
    let grow = |from: i64, to: i64| {
        sqlx::query(
            "INSERT INTO order_ledger (order_id, status, items, reserved_until, token)
             SELECT 'o-' || n, 'reserved',
                    jsonb_build_array(jsonb_build_object('product_id', n % 1000 + 1, 'quantity', 1)),
                    now() + interval '15 minutes', '1.' || n
             FROM generate_series($1::bigint, $2::bigint) n",
        )
        .bind(from)
        .bind(to)
        .execute(&env.pool)
    };
    // A ledger of 600,000 orders, vacuumed: PostgreSQL's default would wait for another
    // 121,000 inserts (1,000 + 20% of the table) before the next insert vacuum.
    let table = 6 * LEDGER_INSERT_THRESHOLD;
    grow(1, table).await.expect("grow the ledger");
    sqlx::query("VACUUM order_ledger")
        .execute(&env.pool)
        .await
        .expect("vacuum");
    let before = autovacuums(&env).await;
    let inserted = LEDGER_INSERT_THRESHOLD + LEDGER_INSERT_THRESHOLD / 10;
    grow(table + 1, table + inserted)
        .await
        .expect("insert past the threshold");
    // Autovacuum looks at each database once per autovacuum_naptime (10 s in deploy/).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(150);
    loop {
        let now = autovacuums(&env).await;
        if now > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no autovacuum of the ledger within 150 s of {inserted} inserts into {table} rows \
             (autovacuum_count {now})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    env.cleanup().await;
}

/// How many times autovacuum has vacuumed the ledger.
async fn autovacuums(env: &TestEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT autovacuum_count FROM pg_stat_user_tables
         WHERE schemaname = current_schema() AND relname = 'order_ledger'",
    )
    .fetch_one(&env.pool)
    .await
    .expect("pg_stat_user_tables")
}
