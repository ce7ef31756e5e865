//! `pipeline`: this project's pipeline end to end, as the order service meets it, in a
//! fresh [`PipelineEnv`] per measurement: producer and consumer workers of this process
//! (one of each, the binaries' batch settings), warmed up as in [`crate::e2e`]; then
//! `concurrency` closed-loop clients, each publishing one `order_created` and waiting for
//! that order's result on `stock.results` before it sends the next. They share one Kafka
//! producer (an order service has one). Latency: publish to result. `reserved` is granted,
//! `rejected`/`insufficient_stock` refused; any other outcome stops the run.
//!
//! At the end the pipeline is left to become idle (every group committed everything,
//! [`crate::e2e`]'s rule), then `stock:{p}` in Redis is compared with `available` in
//! PostgreSQL for every product; PostgreSQL's `available` is the store of the books.

use super::{CellRun, PgRedis};
use crate::collector::Collector;
use crate::driver::{self, Client};
use crate::e2e;
use crate::env::{PipelineEnv, Stack};
use crate::load::Order;
use crate::workers::{self, Workers};
use anyhow::{anyhow, bail, ensure, Context, Result};
use indicatif::ProgressBar;
use rdkafka::producer::FutureProducer;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use stock_common::events::{Reason, Status};
use stock_devkit::harness;
use stockctl::admin;

/// Longest wait for one order's result.
const RESULT_TIMEOUT: Duration = Duration::from_secs(60);

/// One closed-loop client of the order service.
struct OrderService {
    producer: FutureProducer,
    topic: String,
    collector: Arc<Collector>,
}

impl Client for OrderService {
    type Order = Order;

    async fn place(&mut self, order: &Order) -> Result<bool> {
        let result = self.collector.watch(&order.id);
        let msg = (order.id.clone(), harness::created(&order.id, &order.items));
        harness::publish(&self.producer, &self.topic, vec![msg])
            .await
            .context("publishing an order")?;
        let r = tokio::time::timeout(RESULT_TIMEOUT, result)
            .await
            .map_err(|_| anyhow!("no result for {} within {RESULT_TIMEOUT:?}", order.id))?
            .context("the result collector stopped")?;
        match (r.status, r.reason) {
            (Status::Reserved, _) => Ok(true),
            (Status::Rejected, Some(Reason::InsufficientStock)) => Ok(false),
            (status, reason) => bail!("order {}: unexpected {status:?} {reason:?}", order.id),
        }
    }
}

/// One measurement in an environment of its own, removed afterwards.
pub async fn measure(
    stack: &Stack,
    partitions: i32,
    orders: &Arc<Vec<Order>>,
    stock: &BTreeMap<i64, i64>,
    concurrency: usize,
    progress: &ProgressBar,
) -> Result<CellRun> {
    let env = PipelineEnv::create(stack, partitions, None).await?;
    let measured = measure_in(&env, orders, stock, concurrency, progress).await;
    env.cleanup().await;
    measured
}

async fn measure_in(
    env: &PipelineEnv,
    orders: &Arc<Vec<Order>>,
    stock: &BTreeMap<i64, i64>,
    concurrency: usize,
    progress: &ProgressBar,
) -> Result<CellRun> {
    let warm_product = stock.keys().max().copied().unwrap_or(0) + 1;
    let warmup = e2e::warmup_orders(warm_product, env.partitions());
    let mut all_stock = stock.clone();
    all_stock.insert(warm_product, warmup.len() as i64);
    e2e::load_stock(env, &all_stock).await?;

    let expected: HashSet<String> = orders.iter().chain(&warmup).map(|o| o.id.clone()).collect();
    ensure!(
        expected.len() == orders.len() + warmup.len(),
        "order ids are not unique"
    );
    let collector = Arc::new(Collector::start(
        &env.kafka,
        &env.topics().results,
        expected,
    )?);
    let mut workers = Workers::default();
    let driven = drive(
        env,
        &collector,
        &mut workers,
        orders,
        &warmup,
        concurrency,
        progress,
    )
    .await;
    let idle = match &driven {
        Ok(_) => e2e::wait_idle(env).await,
        Err(_) => Ok(false),
    };
    let stopped = workers.stop().await;
    let collector =
        Arc::try_unwrap(collector).map_err(|_| anyhow!("the result collector is still shared"))?;
    collector.finish(Duration::from_millis(200)).await;
    let driven = driven?;
    stopped?;
    if !idle? {
        tracing::warn!("the pipeline did not become idle within 60 s");
    }

    let products: Vec<i64> = all_stock.keys().copied().collect();
    let rows = admin::stock_rows(&env.db.pool, &products)
        .await
        .context("reading PostgreSQL stock")?;
    let redis = env
        .redis
        .store
        .stock_levels(&products)
        .await
        .context("reading Redis stock")?;
    let available: BTreeMap<i64, i64> = rows.iter().map(|r| (r.product_id, r.available)).collect();
    let differing = products
        .iter()
        .zip(&redis)
        .filter(|(p, level)| available.get(p).copied() != **level)
        .count();
    let last = stock
        .keys()
        .map(|p| (*p, available.get(p).copied()))
        .collect();
    Ok(CellRun {
        driven,
        last,
        pg_redis: PgRedis::Compared { differing },
    })
}

async fn drive(
    env: &PipelineEnv,
    collector: &Arc<Collector>,
    workers: &mut Workers,
    orders: &Arc<Vec<Order>>,
    warmup: &[Order],
    concurrency: usize,
    progress: &ProgressBar,
) -> Result<driver::Driven> {
    let batch = workers::default_batch();
    workers.start_producers(env, &batch, 1).await?;
    workers.start_consumers(env, &batch, 1).await?;
    let producer = stock_common::kafka::producer(&env.kafka).context("kafka producer")?;
    let topic = env.topics().orders.clone();
    harness::publish(&producer, &topic, e2e::messages(warmup))
        .await
        .context("publishing the warm-up orders")?;
    let warm_ids: Vec<String> = warmup.iter().map(|o| o.id.clone()).collect();
    if !collector.wait_for(&warm_ids, Duration::from_secs(60)).await {
        bail!("the warm-up orders got no outcome within 60 s");
    }
    let clients = (0..concurrency)
        .map(|_| OrderService {
            producer: producer.clone(),
            topic: topic.clone(),
            collector: collector.clone(),
        })
        .collect();
    driver::run(clients, orders.clone(), progress).await
}
