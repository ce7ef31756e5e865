//! The demo: both workers (in this process) fed by a demo load of order events on topics
//! of their own, ending with a readable summary and the invariants checked.
//!
//! [`run`] reads top to bottom: [`prepare`] the topics and stock, start the workers
//! ([`start_workers`], settings from [`crate::worker_args`]), publish the load
//! ([`orders`]), wait for every outcome, then [`summarize`].

use crate::harness::{self, Outcomes, ResultCollector};
use crate::stack::Stack;
use crate::worker_args::{Wiring, Worker, WorkerFlags};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use stock_common::config::{KafkaArgs, Topics};
use stock_common::events::{Item, Status};
use stock_common::redis_store::RedisStore;
use stockctl::admin;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Orders to send.
    #[arg(long, default_value_t = 20_000)]
    pub orders: usize,
    /// Products on sale (ids 900001 and up); the first is a hot SKU that half the orders want.
    #[arg(long, default_value_t = 20)]
    pub products: i64,
    /// Initial stock of each product.
    #[arg(long, default_value_t = 300)]
    pub stock: i64,
    /// Partitions of each demo topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// How long to wait for all outcomes.
    #[arg(long, default_value = "120s", value_parser = stock_common::config::parse_duration)]
    pub timeout: Duration,
}

/// Runs the demo; `Ok(false)` when a check failed.
/// Runs the demo on `stack`: the run's topics, migrations, grants and stock are made with
/// the administrator's settings, the workers run with theirs.
pub async fn run(stack: &Stack, args: &DemoArgs) -> anyhow::Result<bool> {
    let (kafka, db, redis) = (&stack.kafka, &stack.db, &stack.redis);
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let topics = Topics::prefixed(&format!("demo-{run}."));
    println!(
        "demo run {run}: {} orders over {} products of {} units",
        args.orders, args.products, args.stock
    );
    let products: Vec<i64> = (0..args.products).map(|i| 900_001 + i).collect();
    let (pool, store) = prepare(stack, &topics, &products, args).await?;

    let shutdown = CancellationToken::new();
    let wiring = Wiring {
        kafka,
        topics: &topics,
        redis,
        db,
    };
    let workers = start_workers(wiring, &run, &shutdown).await?;
    // Reservations of earlier runs that expired meanwhile are released by this run's
    // sweeper; their give-backs reach Redis through this run's producer, so they are
    // waited for before the load, and again before the workers stop.
    let idle = Idle {
        kafka,
        topics: &topics,
        run: &run,
        pool: &pool,
    };
    idle.wait(args.timeout).await?;
    let collector = ResultCollector::start(kafka, &topics.results)?;
    let (msgs, ids) = orders(&run, &products, args.orders);

    let producer = stock_common::kafka::producer(kafka)?;
    let started = Instant::now();
    harness::publish(&producer, &topics.orders, msgs).await?;
    let published = started.elapsed();
    let complete = collector.wait_for(&ids, 1, args.timeout).await;
    let elapsed = started.elapsed();
    idle.wait(args.timeout).await?;
    shutdown.cancel();
    for w in workers {
        let _ = w.await;
    }
    let outcomes = collector.snapshot();
    collector.stop().await;

    println!();
    println!(
        "orders: {} published in {:.2?}, all outcomes in {:.2?} ({:.0} orders/s end to end)",
        ids.len(),
        published,
        elapsed,
        ids.len() as f64 / elapsed.as_secs_f64()
    );
    summarize(&pool, &store, &products, &ids, &outcomes, complete).await
}

/// Creates the run's topics, migrates, sets every product's stock and, if Redis is not
/// loaded, rebuilds it.
async fn prepare(
    stack: &Stack,
    topics: &Topics,
    products: &[i64],
    args: &DemoArgs,
) -> anyhow::Result<(PgPool, RedisStore)> {
    use anyhow::Context;
    stock_common::kafka::create_topics(&stack.kafka_admin, &topics.all(), args.partitions)
        .await
        .context("creating demo topics (is Kafka up? deploy/stack-up.sh)")?;
    let pool = stock_common::db::pool(&stack.db_admin)?;
    stock_common::db::migrate(&pool)
        .await
        .context("migrating (is PostgreSQL up?)")?;
    if let (true, Some(role)) = (stack.has_worker_roles(), stack.worker_db_role()) {
        stock_common::db::grant(&pool, &role)
            .await
            .with_context(|| format!("granting {role} the workers' privileges"))?;
    }
    let store = RedisStore::connect(&stack.redis_admin)
        .await
        .context("connecting to Redis")?;
    for p in products {
        admin::set_stock(&pool, &store, *p, args.stock, true).await?;
    }
    if !store.is_loaded().await? {
        let r = stockctl::rebuild::rebuild(&pool, &store).await?;
        println!(
            "redis was not loaded: rebuilt {} products and {} held reservations from PostgreSQL",
            r.products, r.held
        );
    }
    Ok((pool, store))
}

/// What "the run's pipeline is idle" is read from.
struct Idle<'a> {
    kafka: &'a KafkaArgs,
    topics: &'a Topics,
    run: &'a str,
    pool: &'a PgPool,
}

impl Idle<'_> {
    /// Waits (up to `timeout`) until no reservation is due, every release is announced,
    /// and each group has consumed its input topics to their end: then Redis holds every
    /// give-back, and guarantee 3 (Redis equals `available`) can be checked.
    async fn wait(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.is_idle().await? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the demo pipeline did not become idle within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    async fn is_idle(&self) -> anyhow::Result<bool> {
        let (due, unannounced): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'reserved' AND reserved_until <= now()),
                    count(*) FILTER (WHERE NOT announced)
             FROM order_ledger",
        )
        .fetch_one(self.pool)
        .await?;
        if due > 0 || unannounced > 0 {
            return Ok(false);
        }
        let producer = format!("demo-{}-producer", self.run);
        let consumer = format!("demo-{}-consumer", self.run);
        for (group, topic) in [
            (&producer, &self.topics.orders),
            (&producer, &self.topics.compensate),
            (&consumer, &self.topics.deduct),
        ] {
            let ends = crate::topics::end_offsets(self.kafka, topic)?;
            let done = crate::topics::committed_offsets(self.kafka, group, topic)?;
            if done.iter().zip(&ends).any(|(c, e)| c < e) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Both workers as tasks of this process, with the binaries' defaults on the run's topics.
async fn start_workers(
    wiring: Wiring<'_>,
    run: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<[JoinHandle<anyhow::Result<()>>; 2]> {
    let pargs =
        WorkerFlags::new(Worker::Producer, wiring, &format!("demo-{run}-producer")).producer()?;
    let cargs =
        WorkerFlags::new(Worker::Consumer, wiring, &format!("demo-{run}-consumer")).consumer()?;
    let producer = stock_producer::worker::Worker::new(&pargs).await?;
    let consumer = stock_consumer::worker::Worker::new(&cargs).await?;
    Ok([
        tokio::spawn(producer.run(shutdown.clone())),
        tokio::spawn(consumer.run(shutdown.clone())),
    ])
}

/// The demo load: `n` orders (half of them for the hot SKU, one in ten with a second
/// item), one invalid order and one message that is no event at all; with the ids that
/// must get an outcome.
fn orders(run: &str, products: &[i64], n: usize) -> (Vec<(String, Vec<u8>)>, HashSet<String>) {
    let mut rng = crate::rng::Rng::new(42);
    let mut msgs = Vec::with_capacity(n);
    let mut ids = HashSet::new();
    for i in 0..n {
        let id = format!("demo-{run}-{i}");
        let pick = |r: u64| {
            if r.is_multiple_of(2) {
                products[0]
            } else {
                products[(r / 2) as usize % products.len()]
            }
        };
        let first = pick(rng.next_u64());
        let mut items = vec![Item {
            product_id: first,
            quantity: 1 + (rng.next_u64() % 3) as i64,
        }];
        if rng.next_u64().is_multiple_of(10) {
            let second = pick(rng.next_u64() | 1);
            if second != first {
                items.push(Item {
                    product_id: second,
                    quantity: 1,
                });
            }
        }
        msgs.push((id.clone(), harness::created(&id, &items)));
        ids.insert(id);
    }
    // A little bad input: the workers answer it and carry on.
    let bad_id = format!("demo-{run}-bad qty");
    msgs.push((
        bad_id.clone(),
        harness::created(
            &bad_id,
            &[Item {
                product_id: products[0],
                quantity: 0,
            }],
        ),
    ));
    ids.insert(bad_id);
    msgs.push(("garbage".into(), b"this is not an order".to_vec()));
    (msgs, ids)
}

/// Prints outcomes by kind, the stock of every product in PostgreSQL and Redis, and the
/// three checks; returns whether they all passed.
async fn summarize(
    pool: &PgPool,
    store: &RedisStore,
    products: &[i64],
    ids: &HashSet<String>,
    outcomes: &Outcomes,
    complete: bool,
) -> anyhow::Result<bool> {
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    for id in ids {
        let key = match outcomes.get(id).and_then(|rs| rs.first()) {
            Some(r) if r.status == Status::Reserved => "reserved".to_owned(),
            Some(r) => format!(
                "{:?}/{}",
                r.status,
                r.reason.map(|x| x.as_str()).unwrap_or("-")
            )
            .to_lowercase(),
            None => "no outcome".to_owned(),
        };
        *by_outcome.entry(key).or_default() += 1;
    }
    let conflicts = harness::conflicting(outcomes);
    for (k, n) in &by_outcome {
        println!("  {k:<32} {n:>8}");
    }
    println!();
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "product", "available", "reserved", "sold", "added", "redis"
    );
    let rows = admin::stock_rows(pool, products).await?;
    let levels = store.stock_levels(products).await?;
    for (r, l) in rows.iter().zip(levels) {
        println!(
            "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            r.product_id,
            r.available,
            r.reserved,
            r.sold,
            r.total_added,
            l.map(|v| v.to_string()).unwrap_or("-".into())
        );
    }
    let violations = admin::check_invariants(pool, store, products).await?;
    println!();
    println!(
        "all outcomes arrived:            {}",
        if complete { "yes" } else { "NO" }
    );
    println!(
        "one outcome per order:           {}",
        if conflicts.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO ({} orders)", conflicts.len())
        }
    );
    println!(
        "no oversell, redis = postgres:   {}",
        if violations.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO {violations:?}")
        }
    );
    Ok(complete && conflicts.is_empty() && violations.is_empty())
}
