//! Migrations that reshape a table keep its rows: a database migrated up to the version
//! before, holding rows of the old shape, reads the same after the rest of the migrations.
//!
//! 0008 turns the history (`stock_movement`) from one row per product and kind into one row
//! per kind with arrays (issue 12). The rows written before it are copied as one-element
//! rows: the same ids, kinds, references, sums and times, read through the view
//! `stock_movement_item` and `stockctl history`, and the ids go on growing after them.

use std::borrow::Cow;

use sqlx::migrate::Migrator;
use sqlx::PgPool;
use stock_common::db::MIGRATOR;
use stock_e2e::{create_database, drop_database, Stack};

/// The version before the history became arrays.
const BEFORE_ARRAYS: i64 = 7;

/// `MIGRATOR`'s migrations up to `version` included.
fn migrator_up_to(version: i64) -> Migrator {
    Migrator {
        migrations: Cow::Owned(
            MIGRATOR
                .iter()
                .filter(|m| m.version <= version)
                .cloned()
                .collect(),
        ),
        ..Migrator::DEFAULT
    }
}

/// A movement as the per-product view (and the old table) shows it.
type Item = (i64, i64, String, String, i64, i64, i64, i64, i32, String);

async fn items(pool: &PgPool, from: &str) -> Vec<Item> {
    sqlx::query_as(&format!(
        "SELECT id, product_id, kind, ref, quantity, available_delta, reserved_delta, sold_delta,
                orders, at::text
         FROM {from} ORDER BY id, product_id"
    ))
    .fetch_all(pool)
    .await
    .expect("read the history")
}

#[tokio::test]
async fn the_history_keeps_its_rows_when_it_becomes_arrays() {
    let stack = Stack::from_env().expect("stack settings from the environment");
    let name = format!("m_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pool = create_database(&stack, &name).await;

    let before = migrator_up_to(BEFORE_ARRAYS);
    assert_eq!(before.iter().count() as i64, BEFORE_ARRAYS);
    before.run(&pool).await.expect("migrate up to 0007");
    // The old shape: one row per product and kind, of orders and of an operator's set.
    sqlx::query(
        "INSERT INTO stock_movement
             (product_id, kind, ref, quantity, available_delta, reserved_delta, sold_delta, orders, at)
         VALUES (7, 'set', 'req-1', 10, 10, 0, 0, 1, '2026-11-01 10:00:00+00'),
                (7, 'reserve', 'o-1', 3, -3, 3, 0, 2, '2026-11-01 10:00:01+00'),
                (8, 'reserve', 'o-1', 1, -1, 1, 0, 1, '2026-11-01 10:00:01+00'),
                (7, 'confirm', 'o-1', 2, 0, -2, 2, 1, '2026-11-01 10:00:02+00')",
    )
    .execute(&pool)
    .await
    .expect("rows of the old shape");
    let old = items(&pool, "stock_movement").await;
    assert_eq!(old.len(), 4);

    MIGRATOR.run(&pool).await.expect("the remaining migrations");
    assert_eq!(
        items(&pool, "stock_movement_item").await,
        old,
        "every old row, unchanged, through the per-product view"
    );
    let h = stockctl::admin::history(&pool, 7, 10)
        .await
        .expect("history");
    assert_eq!(
        h.iter()
            .map(|m| (
                m.kind.as_str(),
                m.reference.as_str(),
                m.orders,
                m.sold_delta
            ))
            .collect::<Vec<_>>(),
        [
            ("confirm", "o-1", 1, 2),
            ("reserve", "o-1", 2, 0),
            ("set", "req-1", 1, 0)
        ]
    );
    // New rows take ids after the copied ones.
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO stock_movement
             (kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders)
         VALUES ('restock', 'req-2', '{8}', '{5}', '{5}', '{0}', '{0}', '{1}') RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .expect("a row of the new shape");
    assert!(id > old.iter().map(|m| m.0).max().unwrap_or(0), "id {id}");
    // A batch's arrays are compressed with LZ4 where the server has it.
    let lz4 = sqlx::query("CREATE TEMP TABLE lz4_probe (a text COMPRESSION lz4)")
        .execute(&pool)
        .await
        .is_ok();
    if lz4 {
        sqlx::query(
            "INSERT INTO stock_movement
                 (kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders)
             SELECT 'reserve', 'o-big', array_agg(g), array_agg(1::bigint), array_agg(-1::bigint),
                    array_agg(1::bigint), array_agg(0::bigint), array_agg(1)
             FROM generate_series(1, 2000) g",
        )
        .execute(&pool)
        .await
        .expect("a row of 2,000 products");
        let compression: Option<String> = sqlx::query_scalar(
            "SELECT pg_column_compression(products) FROM stock_movement WHERE ref = 'o-big'",
        )
        .fetch_one(&pool)
        .await
        .expect("its compression");
        assert_eq!(compression.as_deref(), Some("lz4"));
    }
    // The new shape refuses rows whose arrays disagree.
    let bad = sqlx::query(
        "INSERT INTO stock_movement
             (kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders)
         VALUES ('restock', 'req-3', '{8,9}', '{5}', '{5}', '{0}', '{0}', '{1}')",
    )
    .execute(&pool)
    .await;
    assert!(bad.is_err(), "arrays of different lengths were stored");

    pool.close().await;
    drop_database(&stack, &name)
        .await
        .expect("drop the database");
}
