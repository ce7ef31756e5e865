//! The operators' stock commands (`stockctl restock`, `set`, `show`, `history`, `check`)
//! against the real PostgreSQL and Redis: each change applies once per request id in both
//! stores, in the order that keeps Redis from offering stock PostgreSQL cannot give.

use redis::AsyncCommands;
use stock_common::redis_store::stock_key;
use stock_e2e::TestEnv;
use stockctl::admin::{self, AdminError, Step};

async fn history_len(env: &TestEnv, product: i64) -> usize {
    admin::history(&env.pool, product, 1000)
        .await
        .expect("history")
        .len()
}

async fn requests(env: &TestEnv, request_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM stock_request WHERE request_id = $1")
        .bind(request_id)
        .fetch_one(&env.pool)
        .await
        .expect("count requests")
}

async fn redis_marker(env: &TestEnv, request_id: &str) -> Option<String> {
    env.store
        .request_marker(request_id, 0) // one Redis: the product is not part of the key
        .await
        .expect("get marker")
}

/// (available, reserved, sold, total_added) in PostgreSQL, and `stock:{p}`.
async fn both(env: &TestEnv, product: i64) -> ((i64, i64, i64, i64), Option<i64>) {
    let r = env.stock_row(product).await;
    (
        (r.available, r.reserved, r.sold, r.total_added),
        env.redis_stock(product).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restock_adds_once_per_request_id() {
    let env = TestEnv::new().await;
    env.load_stock(&[(42, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);
    let before = history_len(&env, 42).await;

    let c = admin::restock(pool, store, 42, 5, "r-1")
        .await
        .expect("restock");
    assert_eq!(
        (c.postgres, c.redis, c.available_delta),
        (Step::Applied, Step::Applied, 5)
    );
    assert_eq!(both(&env, 42).await, ((15, 0, 0, 15), Some(15)));
    let h = admin::history(pool, 42, 1).await.expect("history");
    assert_eq!(
        (
            h[0].kind.as_str(),
            h[0].reference.as_str(),
            h[0].quantity,
            h[0].available_delta
        ),
        ("restock", "r-1", 5, 5)
    );
    assert_eq!(history_len(&env, 42).await, before + 1);

    // The same request again: nothing in either store.
    let c = admin::restock(pool, store, 42, 5, "r-1")
        .await
        .expect("retry");
    assert_eq!((c.postgres, c.redis), (Step::Already, Step::Already));
    assert_eq!(both(&env, 42).await, ((15, 0, 0, 15), Some(15)));
    assert_eq!(history_len(&env, 42).await, before + 1);

    // The same id for another change is refused, whatever the change.
    for res in [
        admin::restock(pool, store, 42, 6, "r-1").await,
        admin::restock(pool, store, 43, 5, "r-1").await,
    ] {
        assert!(
            matches!(res, Err(AdminError::RequestReused { .. })),
            "{res:?}"
        );
    }
    let res = admin::set_stock_with_request(pool, store, 42, 20, false, "r-1").await;
    assert!(
        matches!(res, Err(AdminError::RequestReused { .. })),
        "{res:?}"
    );

    // Bad input and unknown products change nothing.
    assert!(matches!(
        admin::restock(pool, store, 42, 0, "r-2").await,
        Err(AdminError::Invalid(_))
    ));
    assert!(matches!(
        admin::restock(pool, store, 42, 1, "bad id").await,
        Err(AdminError::Invalid(_))
    ));
    let res = admin::restock(pool, store, 999, 5, "r-3").await;
    assert!(
        matches!(res, Err(AdminError::UnknownProduct(999))),
        "{res:?}"
    );
    assert!(res.unwrap_err().to_string().contains("stockctl set"));
    assert_eq!(requests(&env, "r-3").await, 0);
    assert_eq!(both(&env, 42).await, ((15, 0, 0, 15), Some(15)));

    env.assert_invariants(&[42]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restock_interrupted_after_postgres_finishes_redis_once() {
    let env = TestEnv::new().await;
    env.load_stock(&[(7, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);

    // The first attempt committed in PostgreSQL and died before Redis.
    assert_eq!(
        admin::restock_postgres(pool, 7, 4, "crash-1")
            .await
            .expect("pg half"),
        Step::Applied
    );
    assert_eq!(both(&env, 7).await, ((14, 0, 0, 14), Some(10)));

    let c = admin::restock(pool, store, 7, 4, "crash-1")
        .await
        .expect("retry");
    assert_eq!((c.postgres, c.redis), (Step::Already, Step::Applied));
    assert_eq!(both(&env, 7).await, ((14, 0, 0, 14), Some(14)));
    let c = admin::restock(pool, store, 7, 4, "crash-1")
        .await
        .expect("again");
    assert_eq!((c.postgres, c.redis), (Step::Already, Step::Already));
    assert_eq!(both(&env, 7).await, ((14, 0, 0, 14), Some(14)));
    assert_eq!(requests(&env, "crash-1").await, 1);

    env.assert_invariants(&[7]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restock_while_redis_unloaded_reaches_redis_through_the_rebuild_once() {
    let env = TestEnv::new().await;
    env.load_stock(&[(7, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);
    store.stop_selling().await.expect("del marker");

    let c = admin::restock(pool, store, 7, 3, "u-1")
        .await
        .expect("restock");
    assert_eq!((c.postgres, c.redis), (Step::Applied, Step::Unloaded));
    assert_eq!(both(&env, 7).await, ((13, 0, 0, 13), Some(10)));
    // A retry while still unloaded repeats nothing.
    let c = admin::restock(pool, store, 7, 3, "u-1")
        .await
        .expect("retry");
    assert_eq!(c.postgres, Step::Already);
    assert_eq!(both(&env, 7).await, ((13, 0, 0, 13), Some(10)));

    // The rebuild loads `available`, which includes the restock ...
    stockctl::rebuild::rebuild(pool, store)
        .await
        .expect("rebuild");
    assert_eq!(both(&env, 7).await, ((13, 0, 0, 13), Some(13)));
    // ... so a retry afterwards must not add it to Redis a second time.
    let c = admin::restock(pool, store, 7, 3, "u-1")
        .await
        .expect("retry");
    assert_eq!((c.postgres, c.redis), (Step::Already, Step::Loaded));
    assert_eq!(both(&env, 7).await, ((13, 0, 0, 13), Some(13)));

    // The same through the operators' full rebuild (which drops and reloads request
    // markers), with Redis lost entirely; and a set that took from Redis and died before
    // PostgreSQL is forgotten by it, so its retry starts afresh.
    store.adjust(7, -5, "half-2", None).await.expect("take");
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut store.connection())
        .await
        .expect("flushdb");
    let c = admin::restock(pool, store, 7, 2, "u-2")
        .await
        .expect("restock");
    assert_eq!((c.postgres, c.redis), (Step::Applied, Step::Unloaded));
    stockctl::rebuild::rebuild(pool, store)
        .await
        .expect("full rebuild");
    assert_eq!(both(&env, 7).await, ((15, 0, 0, 15), Some(15)));
    let c = admin::restock(pool, store, 7, 2, "u-2")
        .await
        .expect("retry");
    assert_eq!((c.postgres, c.redis), (Step::Already, Step::Loaded));
    let c = admin::set_stock_with_request(pool, store, 7, 10, false, "half-2")
        .await
        .expect("set after rebuild");
    assert_eq!(
        (c.available_delta, c.postgres, c.redis),
        (-5, Step::Applied, Step::Applied)
    );
    assert_eq!(both(&env, 7).await, ((10, 0, 0, 10), Some(10)));

    env.assert_invariants(&[7]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_moves_available_up_and_down_in_the_right_order() {
    let env = TestEnv::new().await;
    env.load_stock(&[(5, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);

    let c = admin::set_stock_with_request(pool, store, 5, 25, false, "s-up")
        .await
        .expect("set up");
    assert_eq!(
        (c.available_delta, c.postgres, c.redis),
        (15, Step::Applied, Step::Applied)
    );
    assert_eq!(both(&env, 5).await, ((25, 0, 0, 25), Some(25)));

    let c = admin::set_stock_with_request(pool, store, 5, 8, false, "s-down")
        .await
        .expect("set down");
    assert_eq!(
        (c.available_delta, c.postgres, c.redis),
        (-17, Step::Applied, Step::Applied)
    );
    assert_eq!(both(&env, 5).await, ((8, 0, 0, 8), Some(8)));

    // Retries change nothing, even though 8 is not 25 any more.
    for id in ["s-up", "s-down"] {
        let c = admin::set_stock_with_request(pool, store, 5, 25, false, id)
            .await
            .expect("retry");
        assert_eq!(c.postgres, Step::Already, "{id}");
    }
    assert_eq!(both(&env, 5).await, ((8, 0, 0, 8), Some(8)));

    // A set to the current value does nothing.
    let before = history_len(&env, 5).await;
    let c = admin::set_stock_with_request(pool, store, 5, 8, false, "s-same")
        .await
        .expect("set same");
    assert_eq!(
        (c.available_delta, c.postgres, c.redis),
        (0, Step::Unchanged, Step::Unchanged)
    );
    assert_eq!(history_len(&env, 5).await, before);

    let h = admin::history(pool, 5, 3).await.expect("history");
    let got: Vec<_> = h
        .iter()
        .map(|m| (m.kind.as_str(), m.reference.as_str(), m.available_delta))
        .collect();
    assert_eq!(got[..2], [("set", "s-down", -17), ("set", "s-up", 15)]);
    assert_eq!(h[2].available_delta, 10, "the initial load is a set too");

    // New products through the old entry point; Redis loaded, so it follows at once.
    let row = admin::set_stock(pool, store, 6, 12, false)
        .await
        .expect("new");
    assert_eq!((row.available, row.total_added), (12, 12));
    assert_eq!(env.redis_stock(6).await, Some(12));
    admin::set_stock(pool, store, 9, 0, false)
        .await
        .expect("new, empty");
    assert_eq!(both(&env, 9).await, ((0, 0, 0, 0), Some(0)));

    env.assert_invariants(&[5, 6, 9]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_keeps_reservations_and_refuses_them_without_force() {
    let env = TestEnv::new().await;
    env.load_stock(&[(3, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);
    // 3 reserved, 2 sold (conservation kept), Redis following `available`.
    sqlx::query(
        "UPDATE stock SET available = available - 5, reserved = 3, sold = 2 WHERE product_id = 3",
    )
    .execute(pool)
    .await
    .expect("reserve");
    env.set_redis_stock(3, 5).await;

    let res = admin::set_stock_with_request(pool, store, 3, 20, false, "f-1").await;
    assert!(
        matches!(
            res,
            Err(AdminError::HasReservations {
                product_id: 3,
                reserved: 3,
                sold: 2
            })
        ),
        "{res:?}"
    );
    assert_eq!(both(&env, 3).await, ((5, 3, 2, 10), Some(5)));
    assert_eq!(requests(&env, "f-1").await, 0);

    let c = admin::set_stock_with_request(pool, store, 3, 20, true, "f-1")
        .await
        .expect("forced up");
    assert_eq!(c.available_delta, 15);
    assert_eq!(both(&env, 3).await, ((20, 3, 2, 25), Some(20)));
    let c = admin::set_stock_with_request(pool, store, 3, 1, true, "f-2")
        .await
        .expect("forced down");
    assert_eq!(c.available_delta, -19);
    assert_eq!(both(&env, 3).await, ((1, 3, 2, 6), Some(1)));

    env.assert_invariants(&[3]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_down_is_refused_when_redis_holds_less_and_changes_nothing() {
    let env = TestEnv::new().await;
    env.load_stock(&[(4, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);
    // 7 units pre-deducted by orders still in flight: Redis 3, PostgreSQL 10.
    env.set_redis_stock(4, 3).await;
    let before = history_len(&env, 4).await;

    let res = admin::set_stock_with_request(pool, store, 4, 5, false, "short-1").await;
    assert!(
        matches!(
            res,
            Err(AdminError::RedisShort {
                product_id: 4,
                have: 3,
                take: 5
            })
        ),
        "{res:?}"
    );
    assert_eq!(both(&env, 4).await, ((10, 0, 0, 10), Some(3)));
    assert_eq!(requests(&env, "short-1").await, 0);
    assert_eq!(redis_marker(&env, "short-1").await, None);
    assert_eq!(history_len(&env, 4).await, before);

    // Redis not loaded: a decrease refuses too, nothing changed.
    env.set_redis_stock(4, 10).await;
    store.stop_selling().await.expect("del marker");
    let res = admin::set_stock_with_request(pool, store, 4, 5, false, "short-2").await;
    assert!(matches!(res, Err(AdminError::RedisUnloaded)), "{res:?}");
    assert_eq!(both(&env, 4).await, ((10, 0, 0, 10), Some(10)));
    assert_eq!(requests(&env, "short-2").await, 0);

    stockctl::rebuild::rebuild(pool, store)
        .await
        .expect("rebuild");
    env.assert_invariants(&[4]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_down_refused_by_postgres_gives_redis_its_stock_back() {
    let env = TestEnv::new().await;
    env.load_stock(&[(8, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);
    // Stands for orders reserved between the read and the UPDATE: PostgreSQL will refuse.
    sqlx::query(
        "ALTER TABLE stock ADD CONSTRAINT test_floor CHECK (available >= 5 OR total_added = 0)",
    )
    .execute(pool)
    .await
    .expect("add check");

    let res = admin::set_stock_with_request(pool, store, 8, 2, false, "undo-1").await;
    assert!(
        matches!(
            res,
            Err(AdminError::PgRefused {
                product_id: 8,
                take: 8,
                ..
            })
        ),
        "{res:?}"
    );
    assert_eq!(both(&env, 8).await, ((10, 0, 0, 10), Some(10)));
    assert_eq!(requests(&env, "undo-1").await, 0);
    assert_eq!(redis_marker(&env, "undo-1").await, None);
    assert_eq!(redis_marker(&env, "undo-1:undo").await, None);

    // Once PostgreSQL agrees, the same id works from scratch, once.
    sqlx::query("ALTER TABLE stock DROP CONSTRAINT test_floor")
        .execute(pool)
        .await
        .expect("drop check");
    let c = admin::set_stock_with_request(pool, store, 8, 2, false, "undo-1")
        .await
        .expect("retry");
    assert_eq!(
        (c.available_delta, c.postgres, c.redis),
        (-8, Step::Applied, Step::Applied)
    );
    assert_eq!(both(&env, 8).await, ((2, 0, 0, 2), Some(2)));

    env.assert_invariants(&[8]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_down_interrupted_after_redis_finishes_postgres_once() {
    let env = TestEnv::new().await;
    env.load_stock(&[(11, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);

    // The first attempt (10 -> 6) took from Redis and died before PostgreSQL.
    store.adjust(11, -4, "half-1", None).await.expect("adjust");
    assert_eq!(both(&env, 11).await, ((10, 0, 0, 10), Some(6)));
    // A restock must not reuse that id.
    let res = admin::restock(pool, store, 11, 4, "half-1").await;
    assert!(
        matches!(res, Err(AdminError::RequestReused { .. })),
        "{res:?}"
    );

    // The retry finishes with the amount Redis gave, without taking again.
    let c = admin::set_stock_with_request(pool, store, 11, 6, false, "half-1")
        .await
        .expect("retry");
    assert_eq!(
        (c.available_delta, c.postgres, c.redis),
        (-4, Step::Applied, Step::Already)
    );
    assert_eq!(both(&env, 11).await, ((6, 0, 0, 6), Some(6)));
    let c = admin::set_stock_with_request(pool, store, 11, 6, false, "half-1")
        .await
        .expect("again");
    assert_eq!(c.postgres, Step::Already);
    assert_eq!(both(&env, 11).await, ((6, 0, 0, 6), Some(6)));

    env.assert_invariants(&[11]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_lists_open_reservations() {
    let env = TestEnv::new().await;
    env.load_stock(&[(21, 10), (22, 10)]).await;
    let (pool, store) = (&env.pool, &env.store);
    // Three orders went through the consumer: o-1 and o-3 are still reserved, o-2 was paid.
    for (order, status, qty) in [
        ("o-1", "reserved", 2i64),
        ("o-2", "confirmed", 1),
        ("o-3", "reserved", 3),
    ] {
        sqlx::query(
            "INSERT INTO order_ledger (order_id, status, items, reserved_until)
             VALUES ($1, $2, jsonb_build_array(jsonb_build_object('product_id', 21, 'quantity', $3::bigint)),
                     now() + interval '15 minutes')",
        )
        .bind(order)
        .bind(status)
        .bind(qty)
        .execute(pool)
        .await
        .expect("ledger");
        sqlx::query(
            "INSERT INTO stock_movement
                 (kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders)
             VALUES ('reserve', $1, '{21}', ARRAY[$2::bigint], ARRAY[-$2::bigint], ARRAY[$2::bigint], '{0}', '{1}')",
        )
        .bind(order)
        .bind(qty)
        .execute(pool)
        .await
        .expect("movement");
    }
    sqlx::query(
        "INSERT INTO stock_movement
             (kind, ref, products, quantities, available_deltas, reserved_deltas, sold_deltas, orders)
         VALUES ('confirm', 'o-2', '{21}', '{1}', '{0}', '{-1}', '{1}', '{1}')",
    )
    .execute(pool)
    .await
    .expect("movement");
    sqlx::query("UPDATE stock SET available = 4, reserved = 5, sold = 1 WHERE product_id = 21")
        .execute(pool)
        .await
        .expect("stock");
    env.set_redis_stock(21, 4).await;

    let r = admin::show(pool, store, 21, 1).await.expect("show");
    let row = r.postgres.expect("row");
    assert_eq!(
        (row.available, row.reserved, row.sold, row.total_added),
        (4, 5, 1, 10)
    );
    assert_eq!((r.redis, r.redis_loaded), (Some(4), true));
    assert_eq!(
        (r.open_reservations.orders, r.open_reservations.quantity),
        (2, 5)
    );
    assert_eq!(r.open_reservations.first.len(), 1);
    assert_eq!(r.open_reservations.first[0].order_id, "o-1");
    assert!(r.open_reservations.first[0].reserved_until.is_some());

    let other = admin::show(pool, store, 22, 20).await.expect("show");
    assert_eq!(other.open_reservations.orders, 0);
    let none = admin::show(pool, store, 23, 20).await.expect("show");
    assert_eq!((none.postgres, none.redis), (None, None));

    let h = admin::history(pool, 21, 2).await.expect("history");
    let got: Vec<_> = h
        .iter()
        .map(|m| (m.kind.as_str(), m.reference.as_str()))
        .collect();
    assert_eq!(got, [("confirm", "o-2"), ("reserve", "o-3")]);

    env.assert_invariants(&[21, 22]).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_drift_and_repair_fixes_it() {
    let env = TestEnv::new().await;
    env.load_stock(&[(31, 10), (32, 20), (33, 30)]).await;
    let (pool, store) = (&env.pool, &env.store);

    let r = admin::check_drift(pool, store, false).await.expect("check");
    assert!(r.clean() && r.drift.is_empty(), "{r:?}");
    assert_eq!(r.products, 3);

    env.set_redis_stock(32, 27).await;
    let r = admin::check_drift(pool, store, false).await.expect("check");
    assert_eq!(
        r.drift,
        [admin::Drift {
            product_id: 32,
            redis: Some(27),
            postgres: 20
        }]
    );
    assert!(r.repaired.is_empty() && !r.clean());
    assert_eq!(
        env.redis_stock(32).await,
        Some(27),
        "a check alone changes nothing"
    );

    let r = admin::check_drift(pool, store, true).await.expect("repair");
    assert_eq!(r.repaired, r.drift);
    assert!(r.clean());
    assert_eq!(env.redis_stock(32).await, Some(20));

    // A missing key counts too; only Redis is touched.
    let _: i64 = store.connection().del(stock_key(33)).await.expect("del");
    let r = admin::check_drift(pool, store, true).await.expect("repair");
    assert_eq!(
        r.repaired,
        [admin::Drift {
            product_id: 33,
            redis: None,
            postgres: 30
        }]
    );
    assert_eq!(env.redis_stock(33).await, Some(30));

    // Unloaded: the check alone reports it; the repair is a rebuild, which loads Redis.
    env.set_redis_stock(31, 1).await;
    store.stop_selling().await.expect("del marker");
    let r = admin::check_drift(pool, store, false).await.expect("check");
    assert!(!r.redis_loaded && r.repaired.is_empty() && !r.clean());
    let r = admin::check_drift(pool, store, true).await.expect("repair");
    assert!(r.redis_loaded && r.clean(), "{r:?}");

    let r = admin::check_drift(pool, store, false).await.expect("check");
    assert!(r.clean() && r.drift.is_empty(), "{r:?}");
    assert_eq!(both(&env, 31).await, ((10, 0, 0, 10), Some(10)));
    env.assert_invariants(&[31, 32, 33]).await;
    env.cleanup().await;
}

/// The history holds one row per kind per batch, its products' sums as arrays (issue 12: a
/// row per order and item cost as much as the ledger row, and a row per product and kind
/// still ~220 a batch); `stockctl history` reads one product's elements of them. Each
/// order's own story comes from the ledger (`stockctl history --order`), and `show` counts
/// open reservations there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_sums_each_batch_and_the_ledger_tells_each_order() {
    use std::time::Duration;
    use stock_common::events::{DeductCommand, Item, INTERNAL_VERSION};
    use stock_consumer::store::apply_batch;
    let env = TestEnv::new().await;
    env.load_stock(&[(61, 100), (62, 10)]).await;
    let pool = &env.pool;
    let reserve = |id: String, product_id, quantity| DeductCommand::Reserve {
        v: INTERNAL_VERSION,
        order_id: id,
        items: vec![Item {
            product_id,
            quantity,
        }],
        token: None,
        customer: None,
    };
    let mut first: Vec<DeductCommand> = (0..5).map(|i| reserve(format!("q-{i}"), 62, 2)).collect();
    first.extend((0..50).map(|i| reserve(format!("o-{i}"), 61, 1)));
    first.push(reserve("o-big".into(), 61, 1000)); // refused by PostgreSQL: a compensation
    apply_batch(pool, &first, Duration::from_secs(900))
        .await
        .expect("first batch");
    let mut second = Vec::new();
    for i in 0..10 {
        second.push(DeductCommand::Pay {
            v: INTERNAL_VERSION,
            order_id: format!("o-{i}"),
            event: format!("p0@{i}"),
        });
    }
    for i in 10..15 {
        second.push(DeductCommand::Cancel {
            v: INTERNAL_VERSION,
            order_id: format!("o-{i}"),
            event: format!("p0@{i}"),
        });
    }
    apply_batch(pool, &second, Duration::from_secs(900))
        .await
        .expect("second batch");

    let h = admin::history(pool, 61, 10).await.expect("history");
    type Row<'a> = (&'a str, i64, i64, (i64, i64, i64));
    let rows: Vec<Row> = h
        .iter()
        .map(|m| {
            (
                m.kind.as_str(),
                m.orders,
                m.quantity,
                (m.available_delta, m.reserved_delta, m.sold_delta),
            )
        })
        .collect();
    assert_eq!(
        &rows[..4],
        [
            ("release_cancelled", 5, 5, (5, -5, 0)),
            ("confirm", 10, 10, (0, -10, 10)),
            ("reserve", 50, 50, (-50, 50, 0)),
            ("compensation", 1, 1000, (0, 0, 0)),
        ],
        "newest first: {h:?}"
    );
    assert_eq!(h[2].reference, "q-0", "a batch's row names its first order");
    let h62 = admin::history(pool, 62, 10).await.expect("history");
    assert_eq!(
        h62.iter()
            .map(|m| (m.kind.as_str(), m.orders, m.quantity, m.available_delta))
            .collect::<Vec<_>>(),
        [("reserve", 5, 10, -10), ("set", 1, 10, 10)],
        "only product 62's elements of the rows: {h62:?}"
    );
    assert_eq!(h62[0].id, h[2].id, "one reserve row for both products");
    type Stored = (String, Vec<i64>, Vec<i64>, Vec<i32>);
    let stored: Vec<Stored> = sqlx::query_as(
        "SELECT kind, products, quantities, orders FROM stock_movement
             WHERE kind <> 'set' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .expect("stock_movement");
    let v = |s: &[i64]| s.to_vec();
    assert_eq!(
        stored,
        [
            ("compensation".into(), v(&[61]), v(&[1000]), vec![1]),
            ("reserve".into(), v(&[61, 62]), v(&[50, 10]), vec![50, 5]),
            ("confirm".into(), v(&[61]), v(&[10]), vec![10]),
            ("release_cancelled".into(), v(&[61]), v(&[5]), vec![5]),
        ],
        "one row per kind per batch (after load_stock's two sets)"
    );
    let row = env.stock_row(61).await;
    assert_eq!((row.available, row.reserved, row.sold), (55, 35, 10));
    env.assert_history_matches_ledger().await;

    let paid = admin::order_story(pool, "o-3")
        .await
        .expect("story")
        .expect("o-3 is in the ledger");
    assert_eq!(
        (paid.status.as_str(), paid.settled_by.as_deref()),
        ("confirmed", Some("p0@3"))
    );
    assert_eq!(
        paid.items,
        serde_json::json!([{"product_id": 61, "quantity": 1}])
    );
    assert!(paid.settled_at.is_some());
    let refused = admin::order_story(pool, "o-big")
        .await
        .expect("story")
        .expect("o-big is in the ledger");
    assert_eq!(
        (
            refused.status.as_str(),
            refused.reject_reason.as_deref(),
            refused.reject_product
        ),
        ("rejected", Some("insufficient_stock"), Some(61))
    );
    assert_eq!(
        admin::order_story(pool, "never").await.expect("story"),
        None
    );

    let shown = admin::show(pool, &env.store, 61, 2).await.expect("show");
    assert_eq!(
        (
            shown.open_reservations.orders,
            shown.open_reservations.quantity
        ),
        (35, 35)
    );
    assert_eq!(shown.open_reservations.first.len(), 2);
    env.cleanup().await;
}
