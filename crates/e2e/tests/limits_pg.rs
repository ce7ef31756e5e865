//! Per-customer limits (issue 13), PostgreSQL side: the consumer's batch transaction
//! (`store::apply_batch`), the expiry sweep and `pg_store::set_limit`, driven directly
//! against a real PostgreSQL (one fresh database per test), without Kafka. Redis is only
//! loaded for the set-up (`TestEnv::load_stock`); the commands stand for what the producer
//! would send.

use std::collections::BTreeMap;
use std::time::Duration;
use stock_common::events::{
    CompensationCause, DeductCommand, Item, Reason, Status, StockResult, INTERNAL_VERSION,
};
use stock_common::pg_store::{self, LimitChange, PgStoreError, ProductLimit};
use stock_consumer::store::apply_batch;
use stock_e2e::TestEnv;

const TTL: Duration = Duration::from_secs(900);

fn item(product_id: i64, quantity: i64) -> Item {
    Item {
        product_id,
        quantity,
    }
}

fn reserve(id: &str, items: &[(i64, i64)], customer: Option<&str>) -> DeductCommand {
    DeductCommand::Reserve {
        v: INTERNAL_VERSION,
        order_id: id.to_owned(),
        items: items.iter().map(|&(p, q)| item(p, q)).collect(),
        token: None,
        customer: customer.map(str::to_owned),
    }
}

fn cancel(id: &str, event: &str) -> DeductCommand {
    DeductCommand::Cancel {
        v: INTERNAL_VERSION,
        order_id: id.to_owned(),
        event: event.to_owned(),
    }
}

fn pay(id: &str, event: &str) -> DeductCommand {
    DeductCommand::Pay {
        v: INTERNAL_VERSION,
        order_id: id.to_owned(),
        event: event.to_owned(),
    }
}

/// Every row of `customer_units` for `product`, by customer.
async fn units(env: &TestEnv, product: i64) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT customer_id, units FROM customer_units WHERE product_id = $1",
    )
    .bind(product)
    .fetch_all(&env.pool)
    .await
    .expect("customer_units")
    .into_iter()
    .collect()
}

async fn set_limit(env: &TestEnv, request: &str, product: i64, n: Option<i64>) -> LimitChange {
    pg_store::set_limit(&env.pool, request, product, n)
        .await
        .expect("set_limit")
}

/// A limit of 2 on product 81: many customers, several orders each, in one batch; an order
/// without customer; a multi-item order over the limit on its second item; a redelivery;
/// cancel and expiry giving units back; a lowered limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_holds_each_customer_to_the_limit() {
    let env = TestEnv::new().await;
    env.load_stock(&[(81, 1000), (82, 1000)]).await;
    let pool = &env.pool;
    let change = set_limit(&env, "limit-81", 81, Some(2)).await;
    assert!(change.fresh);
    assert_eq!((change.previous, change.per_customer), (None, Some(2)));

    // 10 customers, 4 orders of 1 each (interleaved): 2 reserved, 2 refused per customer.
    let mut batch = Vec::new();
    for round in 0..4 {
        for c in 0..10 {
            let id = format!("o-{c}-{round}");
            batch.push(reserve(&id, &[(81, 1)], Some(&format!("cust-{c}"))));
        }
    }
    let plan = apply_batch(pool, &batch, TTL).await.expect("batch");
    for (cmd, result) in batch.iter().zip(&plan.results) {
        let id = cmd.order_id();
        let round: usize = id
            .rsplit('-')
            .next()
            .and_then(|r| r.parse().ok())
            .expect("round");
        if round < 2 {
            assert_eq!(*result, StockResult::reserved(id));
        } else {
            assert_eq!(
                *result,
                StockResult::rejected(id, Reason::LimitExceeded, Some(81))
            );
        }
    }
    let refused: Vec<_> = plan
        .compensations
        .iter()
        .filter(|c| c.cause == CompensationCause::Rejected)
        .collect();
    assert_eq!(refused.len(), 20, "one give-back per refusal");
    assert_eq!(plan.compensations.len(), 20);
    let held = units(&env, 81).await;
    assert_eq!(held.len(), 10);
    assert!(held.values().all(|n| *n == 2), "{held:?}");
    let row = env.stock_row(81).await;
    assert_eq!((row.available, row.reserved), (980, 20));

    // The same batch again: the recorded outcomes, no count moves.
    let again = apply_batch(pool, &batch, TTL).await.expect("redelivery");
    assert_eq!(again.results, plan.results);
    assert!(again.inserts.is_empty() && again.units.is_empty());
    assert_eq!(units(&env, 81).await, held);
    assert_eq!(env.stock_row(81).await, row);

    // No customer on a limited product: invalid_order, nothing named, nothing taken.
    // A multi-item order whose second item is over its limit: nothing reserved.
    let plan = apply_batch(
        pool,
        &[
            reserve("anon", &[(81, 1)], None),
            reserve("multi", &[(82, 5), (81, 1)], Some("cust-0")),
            reserve("other", &[(82, 5)], None),
        ],
        TTL,
    )
    .await
    .expect("batch");
    assert_eq!(
        plan.results,
        vec![
            StockResult::rejected("anon", Reason::InvalidOrder, None),
            StockResult::rejected("multi", Reason::LimitExceeded, Some(81)),
            StockResult::reserved("other"),
        ]
    );
    assert_eq!(
        env.stock_row(82).await.reserved,
        5,
        "only the order without limit"
    );
    assert_eq!(env.stock_row(81).await, row);
    assert_eq!(units(&env, 81).await, held);

    // A cancel gives cust-0's units back; a payment keeps cust-1's; the next orders show it.
    let plan = apply_batch(pool, &[cancel("o-0-0", "p0@1"), pay("o-1-0", "p0@2")], TTL)
        .await
        .expect("settle");
    assert_eq!(plan.results[0].status, Status::Released);
    assert_eq!(plan.results[1].status, Status::Confirmed);
    assert_eq!(units(&env, 81).await["cust-0"], 1);
    assert_eq!(units(&env, 81).await["cust-1"], 2);
    let plan = apply_batch(
        pool,
        &[
            reserve("next-0", &[(81, 1)], Some("cust-0")),
            reserve("next-1", &[(81, 1)], Some("cust-1")),
        ],
        TTL,
    )
    .await
    .expect("next");
    assert_eq!(
        plan.results,
        vec![
            StockResult::reserved("next-0"),
            StockResult::rejected("next-1", Reason::LimitExceeded, Some(81)),
        ]
    );
    assert_eq!(units(&env, 81).await["cust-0"], 2);

    // Expiry gives units back: a new customer's reservation due at once, swept.
    let plan = apply_batch(
        pool,
        &[reserve("short", &[(81, 2)], Some("cust-x"))],
        Duration::ZERO,
    )
    .await
    .expect("short");
    assert_eq!(plan.results, vec![StockResult::reserved("short")]);
    assert_eq!(units(&env, 81).await.get("cust-x"), Some(&2));
    let released = stock_consumer::expiry::expire_due(pool)
        .await
        .expect("sweep");
    assert_eq!(released, 1);
    assert_eq!(
        units(&env, 81).await.get("cust-x"),
        None,
        "a count at 0 is deleted"
    );
    let plan = apply_batch(
        pool,
        &[reserve("after-expiry", &[(81, 2)], Some("cust-x"))],
        TTL,
    )
    .await
    .expect("after expiry");
    assert_eq!(plan.results, vec![StockResult::reserved("after-expiry")]);

    // Lowering the limit below what cust-2 holds: nothing taken back, the next order refused.
    let before = (env.stock_row(81).await, units(&env, 81).await);
    let change = set_limit(&env, "limit-81-lower", 81, Some(1)).await;
    assert_eq!((change.previous, change.per_customer), (Some(2), Some(1)));
    assert_eq!((env.stock_row(81).await, units(&env, 81).await), before);
    let plan = apply_batch(pool, &[reserve("lowered", &[(81, 1)], Some("cust-2"))], TTL)
        .await
        .expect("lowered");
    assert_eq!(
        plan.results,
        vec![StockResult::rejected(
            "lowered",
            Reason::LimitExceeded,
            Some(81)
        )]
    );
    assert_eq!(units(&env, 81).await, before.1);

    // The counts agree with the ledger.
    let from_ledger: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT customer_id, sum((i ->> 'quantity')::bigint)::bigint
         FROM order_ledger, jsonb_array_elements(items) i
         WHERE status IN ('reserved', 'confirmed') AND customer_id IS NOT NULL
           AND (i ->> 'product_id')::bigint = 81
         GROUP BY customer_id",
    )
    .fetch_all(pool)
    .await
    .expect("ledger")
    .into_iter()
    .collect();
    assert_eq!(units(&env, 81).await, from_ledger);
    env.assert_history_matches_ledger().await;
    env.cleanup().await;
}

/// `set_limit`: none → N computes the counts from the ledger (reserved and confirmed
/// orders with a customer only), a request id applies once, N → M keeps the counts, the
/// rebuild's snapshot carries the limits, the counts and the held orders' customers, and
/// N → none drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_limit_computes_changes_and_drops_the_counts() {
    let env = TestEnv::new().await;
    env.load_stock(&[(91, 100), (92, 100)]).await;
    let pool = &env.pool;
    apply_batch(
        pool,
        &[
            reserve("ann-1", &[(91, 2), (92, 1)], Some("ann")),
            reserve("ann-2", &[(91, 1)], Some("ann")),
            reserve("bob-1", &[(92, 4), (91, 3)], Some("bob")),
            reserve("cid-1", &[(91, 1000)], Some("cid")),
            reserve("dan-1", &[(91, 4)], None),
            reserve("eve-1", &[(92, 1)], Some("eve")),
        ],
        TTL,
    )
    .await
    .expect("orders");
    apply_batch(pool, &[cancel("ann-2", "p0@1"), pay("bob-1", "p0@2")], TTL)
        .await
        .expect("settle");
    apply_batch(
        pool,
        &[reserve("fay-1", &[(91, 5)], Some("fay"))],
        Duration::ZERO,
    )
    .await
    .expect("due");
    assert_eq!(
        stock_consumer::expiry::expire_due(pool)
            .await
            .expect("sweep"),
        1
    );
    assert!(units(&env, 91).await.is_empty(), "no limit, no counts");

    let gen = pg_store::generation(pool).await.expect("gen").gen;
    let first = set_limit(&env, "lim-1", 91, Some(2)).await;
    assert_eq!(
        (first.gen, first.previous, first.per_customer, first.fresh),
        (gen, None, Some(2), true)
    );
    // ann-2 cancelled, cid-1 rejected, fay-1 expired, dan-1 without customer: not counted;
    // bob holds more than the limit: kept.
    let expected = BTreeMap::from([("ann".to_owned(), 2), ("bob".to_owned(), 3)]);
    assert_eq!(units(&env, 91).await, expected);
    assert!(units(&env, 92).await.is_empty());
    assert_eq!(
        pg_store::product_limit(pool, 91).await.expect("limit"),
        Some((2, first.version))
    );
    assert_eq!(
        pg_store::product_limit(pool, 92).await.expect("limit"),
        None
    );
    assert_eq!(
        pg_store::top_customers(pool, 91, 10).await.expect("top"),
        vec![("bob".to_owned(), 3), ("ann".to_owned(), 2)]
    );
    assert_eq!(
        pg_store::top_customers(pool, 91, 1).await.expect("top"),
        vec![("bob".to_owned(), 3)]
    );

    // The same request again: its recorded change, nothing done.
    let again = set_limit(&env, "lim-1", 91, Some(2)).await;
    assert_eq!(
        again,
        LimitChange {
            fresh: false,
            ..first.clone()
        }
    );
    assert_eq!(units(&env, 91).await, expected);
    // The same id for another change, an unknown product: refused, nothing done.
    for (product, n) in [(91, Some(3)), (92, Some(2)), (91, None)] {
        let e = pg_store::set_limit(pool, "lim-1", product, n).await;
        assert!(
            matches!(e, Err(PgStoreError::LimitRequestReused { .. })),
            "{e:?}"
        );
    }
    let e = pg_store::set_limit(pool, "lim-x", 999, Some(1)).await;
    assert!(matches!(e, Err(PgStoreError::UnknownProduct(999))), "{e:?}");
    assert_eq!(
        pg_store::product_limit(pool, 91).await.expect("limit"),
        Some((2, first.version))
    );

    // N → M: the counts stay; the version grows.
    let second = set_limit(&env, "lim-2", 91, Some(5)).await;
    assert_eq!((second.previous, second.per_customer), (Some(2), Some(5)));
    assert!(second.version > first.version);
    assert_eq!(units(&env, 91).await, expected);
    assert_eq!(
        pg_store::all_limits(pool).await.expect("all"),
        vec![ProductLimit {
            product_id: 91,
            per_customer: 5,
            version: second.version,
            units: vec![("ann".to_owned(), 2), ("bob".to_owned(), 3)],
        }]
    );

    // The rebuild's snapshot: the limits and counts, and the held orders' customers.
    let snap = pg_store::fence_and_snapshot(pool, None)
        .await
        .expect("snapshot");
    assert_eq!(snap.gen, gen + 1);
    assert_eq!(snap.limits, pg_store::all_limits(pool).await.expect("all"));
    let mut held: Vec<(String, Option<String>)> = snap
        .held
        .iter()
        .map(|h| (h.order_id.clone(), h.customer.clone()))
        .collect();
    held.sort();
    assert_eq!(
        held,
        vec![
            ("ann-1".to_owned(), Some("ann".to_owned())),
            ("dan-1".to_owned(), None),
            ("eve-1".to_owned(), Some("eve".to_owned())),
        ]
    );
    pg_store::finish_loading(pool, snap.gen)
        .await
        .expect("finish");

    // N → none: the limit and its counts are gone; orders are no longer counted.
    let third = set_limit(&env, "lim-3", 91, None).await;
    assert_eq!(
        (third.gen, third.previous, third.per_customer),
        (gen + 1, Some(5), None)
    );
    assert!(third.version > second.version);
    assert!(units(&env, 91).await.is_empty());
    assert_eq!(
        pg_store::product_limit(pool, 91).await.expect("limit"),
        None
    );
    assert!(pg_store::all_limits(pool).await.expect("all").is_empty());
    let plan = apply_batch(pool, &[reserve("anon-2", &[(91, 1)], None)], TTL)
        .await
        .expect("unlimited again");
    assert_eq!(plan.results, vec![StockResult::reserved("anon-2")]);
    assert!(units(&env, 91).await.is_empty());
    env.cleanup().await;
}

/// A limit set while a batch waits for the product's stock row: the batch must decide
/// against the new limit (the statement that waited saw the limit of its snapshot, so the
/// stock row's `limit_version` tells it to start again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_waited_for_a_limit_change_sees_it() {
    let env = TestEnv::new().await;
    env.load_stock(&[(95, 100)]).await;
    let pool = env.pool.clone();
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .expect("db");

    // What set_limit does, held open: the stock row locked and the limit written.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM stock WHERE product_id = 95 FOR UPDATE")
        .execute(&mut *tx)
        .await
        .expect("lock");
    let version: i64 = sqlx::query_scalar("SELECT nextval('limit_version')")
        .fetch_one(&mut *tx)
        .await
        .expect("version");
    sqlx::query("INSERT INTO product_limit (product_id, per_customer, version) VALUES (95, 1, $1)")
        .bind(version)
        .execute(&mut *tx)
        .await
        .expect("limit");
    sqlx::query("UPDATE stock SET limit_version = $1 WHERE product_id = 95")
        .bind(version)
        .execute(&mut *tx)
        .await
        .expect("mark");

    let batch: Vec<_> = (0..3)
        .map(|i| reserve(&format!("w-{i}"), &[(95, 1)], Some("ann")))
        .collect();
    let waiting = {
        let pool = pool.clone();
        let batch = batch.clone();
        tokio::spawn(async move { apply_batch(&pool, &batch, TTL).await })
    };
    // Until the batch waits for the row lock.
    let waits = stock_e2e::wait_until(|| async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&db)
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
        n > 0
    })
    .await;
    assert!(waits, "the batch waits for the stock row");
    tx.commit().await.expect("commit");

    let plan = waiting.await.expect("join").expect("batch");
    assert_eq!(
        plan.results,
        vec![
            StockResult::reserved("w-0"),
            StockResult::rejected("w-1", Reason::LimitExceeded, Some(95)),
            StockResult::rejected("w-2", Reason::LimitExceeded, Some(95)),
        ]
    );
    assert_eq!(
        units(&env, 95).await,
        BTreeMap::from([("ann".to_owned(), 1)])
    );
    assert_eq!(env.stock_row(95).await.reserved, 1);
    env.cleanup().await;
}
