//! Issue 12: no statement run per batch, per sweep or per operator request may scan a table
//! that grows. Found in a long run: the consumer's ledger re-read (`order_id = ANY($1)`)
//! ran as a sequential scan of the whole ledger once per batch, because the plan cached on
//! its connection had been made while the table was small and before any ANALYZE.
//!
//! Each statement of `pg_store::sql::ALL` is prepared on a workers' connection (the
//! session settings they run with) and its *generic* plan — the one PostgreSQL caches after
//! a few executions — is read with `EXPLAIN EXECUTE`, on a fresh database with no
//! statistics and again once the tables have grown (still without statistics: autovacuum
//! is off for them here). A sequential scan of any table but the one-row
//! `redis_generation`, or a read of a whole index that grows, fails the test, naming the
//! statement and its plan.
//!
//! `sql::COMPUTE_UNITS` (the counts of a product that first gets a per-customer limit) is
//! not in `sql::ALL` on purpose: it reads the whole ledger, once per operator's change,
//! never per batch; the test checks it stays out.

use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::{Postgres, Row};
use stock_common::pg_store::sql;
use stock_e2e::TestEnv;

/// Tables whose size is fixed by construction (a scan of them costs the same forever; it
/// is still refused below when the session had to choose a disabled scan).
const ONE_ROW_TABLES: &[&str] = &["redis_generation"];

const GROWING_TABLES: &[&str] = &[
    "stock",
    "stock_movement",
    "order_ledger",
    "stock_request",
    "product_limit",
    "customer_units",
    "limit_request",
];

/// The highest `$n` of `statement`.
fn parameters(statement: &str) -> usize {
    let bytes = statement.as_bytes();
    let mut max = 0;
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'$' {
            let digits: String = statement[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.parse::<usize>() {
                max = max.max(n);
            }
        }
    }
    max
}

/// Partial indexes whose size is bounded by what is pending, not by history: the live
/// reservations (`order_ledger_expiry`) and the releases not yet announced (the outbox).
const BOUNDED_INDEXES: &[&str] = &["order_ledger_expiry", "order_ledger_unannounced"];

/// Every node of `plan` whose cost grows with a table: a sequential scan, or an index read
/// from end to end (no `Index Cond`) of an index that is not bounded.
fn table_scans(plan: &Value, out: &mut Vec<String>) {
    let field = |k: &str| plan.get(k).and_then(Value::as_str);
    match field("Node Type") {
        Some(kind @ ("Seq Scan" | "Tid Scan")) => {
            let relation = field("Relation Name").unwrap_or("?");
            if !ONE_ROW_TABLES.contains(&relation) {
                out.push(format!("{kind} on {relation}"));
            }
        }
        Some(kind @ ("Index Scan" | "Index Only Scan" | "Bitmap Index Scan")) => {
            let index = field("Index Name").unwrap_or("?");
            if field("Index Cond").is_none() && !BOUNDED_INDEXES.contains(&index) {
                out.push(format!("{kind} of all of {index}"));
            }
        }
        _ => {}
    }
    if let Some(children) = plan.get("Plans").and_then(Value::as_array) {
        for child in children {
            table_scans(child, out);
        }
    }
}

/// The generic plan of each statement, as the workers' sessions would cache it; returns the
/// statements whose plan scans a table, with the plan.
async fn scanning_statements(conn: &mut PoolConnection<Postgres>) -> Vec<String> {
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(&mut **conn)
        .await
        .expect("SHOW jit");
    assert_eq!(jit, "off", "the workers' sessions run without JIT");
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut **conn)
        .await
        .expect("set plan_cache_mode");
    let mut bad = Vec::new();
    for (name, statement) in sql::ALL {
        sqlx::query(&format!("PREPARE plan_check AS {statement}"))
            .execute(&mut **conn)
            .await
            .unwrap_or_else(|e| panic!("prepare {name}: {e}"));
        let nulls = vec!["NULL"; parameters(statement)].join(", ");
        let args = if nulls.is_empty() {
            String::new()
        } else {
            format!("({nulls})")
        };
        let row = sqlx::query(&format!("EXPLAIN (FORMAT JSON) EXECUTE plan_check{args}"))
            .fetch_one(&mut **conn)
            .await
            .unwrap_or_else(|e| panic!("explain {name}: {e}"));
        sqlx::query("DEALLOCATE plan_check")
            .execute(&mut **conn)
            .await
            .expect("deallocate");
        let plan: Value = row.try_get(0).expect("plan json");
        let mut scans = Vec::new();
        table_scans(&plan[0]["Plan"], &mut scans);
        // A node the session disabled still chosen (no other way) shows as a cost of 1e10:
        // such a plan also passes `jit_above_cost` and was compiled at every run.
        let cost = plan[0]["Plan"]["Total Cost"].as_f64().unwrap_or(f64::MAX);
        if cost >= 1e9 {
            scans.push(format!("a disabled node (total cost {cost:e})"));
        }
        if !scans.is_empty() {
            bad.push(format!(
                "{name}: {}\n{}",
                scans.join(", "),
                serde_json::to_string_pretty(&plan[0]["Plan"]).unwrap_or_default()
            ));
        }
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_batch_statement_scans_a_growing_table() {
    assert!(
        !sql::ALL.iter().any(|(_, s)| *s == sql::COMPUTE_UNITS),
        "the ledger scan of set_limit is not a batch statement"
    );
    let env = TestEnv::new().await;
    for table in GROWING_TABLES {
        sqlx::query(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = false)"
        ))
        .execute(&env.pool)
        .await
        .expect("autovacuum off");
    }
    let workers = stock_common::db::pool(&env.db).expect("workers' pool");

    // A fresh deployment: empty tables, never analyzed.
    let mut conn = workers.acquire().await.expect("connection");
    let bad = scanning_statements(&mut conn).await;
    assert!(
        bad.is_empty(),
        "on a fresh database, these statements' cached plans scan a table:\n{}",
        bad.join("\n\n")
    );
    drop(conn);

    // The same tables grown, still without statistics.
    for statement in [
        "INSERT INTO stock (product_id, available, total_added)
         SELECT g, 10, 10 FROM generate_series(1, 2000) g",
        "INSERT INTO order_ledger (order_id, status, items, reserved_until)
         SELECT 'o-' || g, 'reserved', '[{\"product_id\":1,\"quantity\":1}]', now() + interval '1 hour'
         FROM generate_series(1, 50000) g",
        "INSERT INTO stock_movement
             (kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders)
         SELECT 'reserve', 'o-' || g, ARRAY[1 + g % 2000, 1 + (g + 1) % 2000], '{1,1}', '{-1,-1}',
                '{1,1}', '{0,0}', '{1,1}'
         FROM generate_series(1, 20000) g",
        "INSERT INTO stock_request (request_id, product_id, kind, available_delta)
         SELECT 'r-' || g, 1 + g % 2000, 'restock', 1 FROM generate_series(1, 5000) g",
        "INSERT INTO product_limit (product_id, per_customer, version)
         SELECT g, 5, g FROM generate_series(1, 1000) g",
        "INSERT INTO customer_units (product_id, customer_id, units)
         SELECT 1 + g % 1000, 'c-' || g, 1 FROM generate_series(1, 50000) g",
        "INSERT INTO limit_request (request_id, product_id, per_customer, version, gen)
         SELECT 'l-' || g, 1 + g % 1000, 5, g, 0 FROM generate_series(1, 5000) g",
    ] {
        sqlx::query(statement)
            .execute(&env.pool)
            .await
            .expect("grow the tables");
    }
    let analyzed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_user_tables
         WHERE relname = ANY($1) AND (last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL)",
    )
    .bind(GROWING_TABLES)
    .fetch_one(&env.pool)
    .await
    .expect("pg_stat_user_tables");
    assert_eq!(analyzed, 0, "the tables must have no statistics here");
    let mut conn = workers.acquire().await.expect("connection");
    let bad = scanning_statements(&mut conn).await;
    assert!(
        bad.is_empty(),
        "on grown tables without statistics, these statements' cached plans scan a table:\n{}",
        bad.join("\n\n")
    );
    drop(conn);
    workers.close().await;
    env.cleanup().await;
}
