//! The producer loop: gather a batch from `orders` and `stock.compensate`, run the Redis
//! scripts for it in one pipeline, publish deduct commands, results and dead letters, wait
//! for every delivery report, and only then store the batch's offsets.
//!
//! While Redis is not loaded (it came back empty), the batch is neither sold nor rejected:
//! the step is retried with backoff and no offset moves until a rebuild sets the marker.

use crate::classify::{classify, Input};
use crate::memory::{MemoryGuard, Pressure};
use crate::parking::Parking;
use crate::ProducerArgs;
use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rdkafka::consumer::Consumer;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use stock_common::batch_loop::{self, Clients, Endpoints};
use stock_common::config::{BatchArgs, Topics};
use stock_common::events::{Compensation, DeductCommand, StockResult, INTERNAL_VERSION};
use stock_common::kafka::{self, KafkaStepError, OutMessage, StallWatch};
use stock_common::metrics::{Metrics, MetricsArgs, ReadinessCheck};
use stock_common::redis_store::{
    Guards, OrderRecord, RedisStore, ReserveOutcome, RestoreOutcome, SoldOutMarker, StoreError,
};
use tokio_util::sync::CancellationToken;

const WORKER: &str = "producer";

/// Why a batch could not be finished yet, and what the loop does.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Redis lost its data and was not rebuilt: wait and retry, selling and rejecting
    /// nothing, storing no offset.
    #[error("redis is not loaded; waiting for `stockctl rebuild`")]
    Unloaded,
    /// Redis is at its memory budget: wait and retry, deciding nothing, storing no offset
    /// ([`crate::memory`]).
    #[error("{0}: deciding no order until records expire")]
    MemoryFull(crate::memory::Fullest),
    /// Redis unreachable or failing: retry with backoff.
    #[error(transparent)]
    Redis(#[from] StoreError),
    /// From publishing: shutdown (stop without storing) or fatal (stop the worker).
    #[error(transparent)]
    Kafka(#[from] KafkaStepError),
}

/// What one batch did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    pub deducts: usize,
    pub results: usize,
    pub restored: usize,
    pub dead_letters: usize,
}

pub struct Worker {
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    /// Watches the producer's delivery reports (`--kafka-stall-timeout`).
    stall: StallWatch,
    /// The consumer group.
    group: String,
    redis: RedisStore,
    topics: Topics,
    batch: BatchArgs,
    metrics: Metrics,
    metrics_args: MetricsArgs,
    /// Products seen at 0 stock (None: `--sold-out-marker false`).
    sold_out: Option<std::sync::Mutex<SoldOutMarker>>,
    /// Stock keys found holding something other than an integer; `/readyz` reports them
    /// until they read as integers again.
    corrupt_keys: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// On a Redis Cluster: what waits for a slot to be rebuilt ([`Parking`]).
    parking: Parking,
    /// Redis memory against its budget ([`MemoryGuard`]).
    memory: Arc<MemoryGuard>,
}

/// What one run of the scripts over a batch gives.
pub struct Decided {
    pub summary: BatchSummary,
    /// What to publish, in message order.
    pub out: Vec<OutMessage>,
    /// The messages that wait (their index in the batch, and the order each is about):
    /// an order or compensation touching a Redis Cluster slot that lost its data, and the
    /// later pays and cancels of such orders. Always empty on one Redis, where an
    /// unloaded Redis stops the whole batch ([`StepError::Unloaded`]).
    pub waiting: Vec<(usize, Option<String>)>,
}

impl Worker {
    /// Checks that Kafka and Redis accept this worker's settings (a refused certificate or
    /// password stops it here, with the cause) and connects everything.
    pub async fn new(args: &ProducerArgs) -> anyhow::Result<Self> {
        use anyhow::Context;
        kafka::check(&args.kafka, stock_common::config::STARTUP_PATIENCE).await?;
        let redis = RedisStore::connect_producer(&args.redis)
            .await
            .with_context(|| format!("redis: cannot connect to {}", args.redis.url))?;
        let consumer = kafka::consumer(
            &args.kafka,
            &args.group,
            &[&args.topics.orders, &args.topics.compensate],
        )
        .context("kafka consumer")?;
        let producer = kafka::producer(&args.kafka).context("kafka producer")?;
        let metrics = Metrics::new("producer").context("metrics")?;
        let memory = MemoryGuard::new(args.memory.clone(), redis.clone(), metrics.clone());
        memory.check_settings().await?;
        Ok(Worker {
            consumer: Arc::new(consumer),
            producer,
            stall: StallWatch::new(&args.kafka),
            group: args.group.clone(),
            redis,
            topics: args.topics.clone(),
            batch: args.batch.clone(),
            metrics,
            metrics_args: args.metrics.clone(),
            sold_out: args
                .sold_out_marker
                .then(|| std::sync::Mutex::new(SoldOutMarker::default())),
            corrupt_keys: Arc::default(),
            parking: Parking::default(),
            memory: Arc::new(memory),
        })
    }

    /// Runs until `shutdown`, then commits the stored offsets and flushes the producer
    /// ([`batch_loop::serve`], with the readiness check of this worker).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(orders = %self.topics.orders, compensate = %self.topics.compensate, "producer started");
        let redis = self.redis.clone();
        let corrupt = self.corrupt_keys.clone();
        let memory = self.memory.clone();
        let ready: ReadinessCheck = Arc::new(move || {
            let (redis, corrupt) = (redis.clone(), corrupt.clone());
            let memory_full = memory.not_ready();
            Box::pin(async move {
                if let Some(why) = memory_full {
                    return Err(why);
                }
                match redis.unloaded_shards().await {
                    Ok(lost) if lost.is_empty() => {}
                    Ok(lost) if redis.is_cluster() => {
                        return Err(format!(
                            "redis: {} of {} slots are not loaded: selling their products \
                             stopped until `stockctl rebuild`",
                            lost.len(),
                            stock_common::redis_store::slots::SLOTS
                        ))
                    }
                    Ok(_) => {
                        return Err(
                            "redis is not loaded: selling stopped until `stockctl rebuild`"
                                .to_owned(),
                        )
                    }
                    Err(e) => return Err(format!("redis unreachable: {e}")),
                }
                let keys: Vec<String> = corrupt
                    .lock()
                    .map(|k| k.iter().cloned().collect())
                    .unwrap_or_default();
                let still = redis
                    .corrupt_among(&keys)
                    .await
                    .map_err(|e| format!("redis unreachable: {e}"))?;
                if let Ok(mut k) = corrupt.lock() {
                    k.retain(|key| still.contains(key));
                }
                if still.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "stock keys not holding an integer: {}; their orders are dead-lettered \
                         until `stockctl check --repair`",
                        still.join(", ")
                    ))
                }
            })
        });
        let clients = Clients {
            consumer: &self.consumer,
            producer: &self.producer,
            batch: &self.batch,
            stall: &self.stall,
            group: &self.group,
        };
        let endpoints = Endpoints {
            args: &self.metrics_args,
            default_addr: "127.0.0.1:9464",
            metrics: &self.metrics,
            ready,
        };
        batch_loop::serve(&self, clients, endpoints, |_| async { Ok(()) }, &shutdown).await?;
        Ok(())
    }

    /// One step, for tests and tools: [`Worker::prepare`] with its retries, then publish
    /// and wait for every delivery report. Does not store offsets, and nothing waits: an
    /// unloaded slot stops the whole batch.
    pub async fn process(
        &self,
        msgs: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> Result<BatchSummary, KafkaStepError> {
        let d = self
            .decide_retrying(msgs, &HashSet::new(), false, shutdown)
            .await?;
        kafka::publish_all(&self.producer, &d.out, &self.stall, shutdown).await?;
        Ok(d.summary)
    }

    /// [`Worker::decide`] with retries: Redis errors, an unloaded Redis (and, with `park`,
    /// more waiting messages than [`crate::parking::MAX_WAITING`]) are retried with capped
    /// exponential backoff (100 ms doubling to 5 s, until shutdown), each retry logged
    /// with its cause.
    pub async fn decide_retrying(
        &self,
        msgs: &[OwnedMessage],
        waiting_ids: &HashSet<String>,
        park: bool,
        shutdown: &CancellationToken,
    ) -> Result<Decided, KafkaStepError> {
        let mut backoff = ExponentialBackoff {
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(5),
            max_elapsed_time: None,
            ..Default::default()
        };
        loop {
            let err = if let Pressure::Shedding(f) = self.memory.check().await {
                StepError::MemoryFull(f)
            } else {
                match self.decide(msgs, waiting_ids, park).await {
                    Ok(d) if !park || self.parking.has_room(d.waiting.len()) => return Ok(d),
                    Ok(_) => StepError::Unloaded,
                    Err(StepError::Kafka(e)) => return Err(e),
                    Err(e) => e,
                }
            };
            let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(5));
            let cause = match err {
                StepError::Unloaded => "redis_unloaded",
                StepError::MemoryFull(_) => "redis_memory",
                _ => "redis",
            };
            self.metrics.retries.with_label_values(&[cause]).inc();
            match err {
                StepError::Unloaded | StepError::MemoryFull(_) => {
                    tracing::error!(error = %err, retry_in = ?wait, "not selling")
                }
                _ => {
                    tracing::warn!(error = %err, retry_in = ?wait, "redis step failed; retrying batch")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(KafkaStepError::Interrupted),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs the batch's Redis scripts and returns what to publish, in message order (so
    /// that an order's events keep their order); nothing waits. Safe to repeat: every
    /// script is idempotent by order id.
    pub async fn prepare(
        &self,
        msgs: &[OwnedMessage],
    ) -> Result<(BatchSummary, Vec<OutMessage>), StepError> {
        let d = self.decide(msgs, &HashSet::new(), false).await?;
        Ok((d.summary, d.out))
    }

    /// Runs the batch's Redis scripts and returns what to publish, in message order. In
    /// three steps: [`classify`] each message, run the scripts ([`Worker::run_scripts`]),
    /// turn their answers into messages ([`Worker::assemble`]). With `park`, what touches
    /// a slot that is not loaded waits ([`Decided::waiting`]) instead of stopping the
    /// batch, and so do the pays and cancels of `waiting_ids` and of orders that wait.
    pub async fn decide(
        &self,
        msgs: &[OwnedMessage],
        waiting_ids: &HashSet<String>,
        park: bool,
    ) -> Result<Decided, StepError> {
        stock_common::failpoint!("producer.before_step");
        let inputs: Vec<Input> = msgs
            .iter()
            .map(|m| {
                classify(
                    &self.topics,
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    m.payload(),
                )
            })
            .collect();
        // A later event of an order that waits (a duplicate, the same id with other
        // items, a pay or cancel) waits behind it, without running a script: the first
        // event's items decide an order.
        let inputs: Vec<Input> = inputs
            .into_iter()
            .map(|i| match &i {
                Input::Reserve(r) if waiting_ids.contains(&r.order_id) => {
                    Input::Waiting(r.order_id.clone())
                }
                Input::Forward(c) if waiting_ids.contains(c.order_id()) => {
                    Input::Waiting(c.order_id().to_owned())
                }
                _ => i,
            })
            .collect();
        let (restored, reserved) = self.run_scripts(&inputs, park).await?;
        let (d, results) = self.assemble(msgs, inputs, restored, reserved)?;
        self.metrics.batch_published(
            &results,
            d.summary.dead_letters,
            "restored",
            d.summary.restored,
        );
        Ok(d)
    }

    /// One Redis round for the batch: the restore script for every compensation, then the
    /// reserve script for every order (guarded by the sold-out marker, which learns from
    /// the answer). [`StepError::Unloaded`] if Redis answered that it is not loaded,
    /// unless `park` (then those outcomes are returned, to wait).
    async fn run_scripts(
        &self,
        inputs: &[Input],
        park: bool,
    ) -> Result<(Vec<RestoreOutcome>, Vec<ReserveOutcome>), StepError> {
        // Stock coming back first, so that this batch's orders can use it.
        let restores: Vec<Compensation> = inputs
            .iter()
            .filter_map(|i| match i {
                Input::Restore(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        let timer = self.metrics.redis_seconds.start_timer();
        let restored = self.redis.restore_many(&restores).await?;
        if !park && restored.contains(&RestoreOutcome::Unloaded) {
            return Err(StepError::Unloaded);
        }
        let reserves: Vec<_> = inputs
            .iter()
            .filter_map(|i| match i {
                Input::Reserve(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        let guards = match &self.sold_out {
            Some(m) => m.lock().map(|m| m.guards(&reserves)).unwrap_or_default(),
            None => Guards::default(),
        };
        let reply = self.redis.reserve_many(&reserves, &guards).await?;
        timer.observe_duration();
        if let Some(m) = &self.sold_out {
            if let Ok(mut m) = m.lock() {
                m.learn(&reply);
            }
        }
        let reserved = reply.outcomes;
        if !park && reserved.contains(&ReserveOutcome::Unloaded) {
            return Err(StepError::Unloaded);
        }
        // Published decisions must survive a failover (replication is asynchronous).
        if !self.redis.wait_replicated().await? {
            self.metrics.unreplicated.inc();
            tracing::warn!("a redis master's replica did not confirm this batch's writes in time");
        }
        Ok((restored, reserved))
    }

    /// What to publish for each message, in message order, from the scripts' answers
    /// (`restored` and `reserved` in the order of the batch's compensations and orders);
    /// also the results published here, for the metrics.
    fn assemble(
        &self,
        msgs: &[OwnedMessage],
        inputs: Vec<Input>,
        restored: Vec<RestoreOutcome>,
        reserved: Vec<ReserveOutcome>,
    ) -> Result<(Decided, Vec<StockResult>), StepError> {
        let mut summary = BatchSummary::default();
        let mut out = Vec::with_capacity(msgs.len());
        let mut results: Vec<StockResult> = Vec::new();
        let mut waiting: Vec<(usize, Option<String>)> = Vec::new();
        let mut waits: HashSet<String> = HashSet::new();
        let (mut reserved, mut restored) = (reserved.into_iter(), restored.into_iter());
        for (n, (m, input)) in msgs.iter().zip(inputs).enumerate() {
            match input {
                // Every decision goes to the consumer: PostgreSQL's ledger publishes the
                // order's one outcome, and gives back a second pre-deduction of an order
                // it decided before.
                Input::Reserve(req) => match reserved.next() {
                    Some(ReserveOutcome::Unloaded) => {
                        waits.insert(req.order_id.clone());
                        waiting.push((n, Some(req.order_id)));
                    }
                    Some(ReserveOutcome::Decided { record, .. }) => {
                        let cmd = deduct_command(&req.order_id, record)?;
                        out.push(OutMessage::json(&self.topics.deduct, &req.order_id, &cmd));
                        summary.deducts += 1;
                    }
                    Some(ReserveOutcome::Corrupt(key)) => {
                        out.push(self.corrupt_stock(m, &req.order_id, key));
                        summary.dead_letters += 1;
                    }
                    _ => {
                        return Err(StoreError::Protocol(
                            "reserve pipeline answered too few orders".into(),
                        )
                        .into())
                    }
                },
                Input::Forward(cmd) if waits.contains(cmd.order_id()) => {
                    // After its order, which waits.
                    waiting.push((n, Some(cmd.order_id().to_owned())));
                }
                Input::Waiting(order_id) => waiting.push((n, Some(order_id))),
                Input::Forward(cmd) => {
                    out.push(OutMessage::json(&self.topics.deduct, cmd.order_id(), &cmd));
                    summary.deducts += 1;
                }
                Input::Reply(r) => {
                    out.push(OutMessage::json(&self.topics.results, &r.order_id, &r));
                    results.push(r);
                }
                Input::Restore(c) => match restored.next() {
                    Some(RestoreOutcome::Restored) => summary.restored += 1,
                    Some(RestoreOutcome::Unloaded) => waiting.push((n, None)),
                    Some(o) if o.is_settled() => {}
                    other => {
                        let reason = format!("compensation not applied: {other:?}");
                        tracing::warn!(order_id = %c.order_id, %reason, "dead-lettering a compensation");
                        out.push(OutMessage::dead_letter(
                            &self.topics.dlq,
                            m,
                            &reason,
                            WORKER,
                        ));
                        summary.dead_letters += 1;
                    }
                },
                Input::Dead(reason) => {
                    tracing::warn!(%reason, topic = m.topic(), partition = m.partition(), offset = m.offset(), "dead-lettering a message");
                    out.push(OutMessage::dead_letter(
                        &self.topics.dlq,
                        m,
                        &reason,
                        WORKER,
                    ));
                    summary.dead_letters += 1;
                }
            }
        }
        summary.results = results.len();
        Ok((
            Decided {
                summary,
                out,
                waiting,
            },
            results,
        ))
    }

    /// The dead letter of an order whose stock key `key` does not hold an integer. Only
    /// this order waits for the repair: its products stop selling, every other product
    /// goes on. The dead letter can be replayed once `stockctl check --repair` fixed the
    /// key; `/readyz` names the key until then.
    fn corrupt_stock(&self, m: &OwnedMessage, order_id: &str, key: String) -> OutMessage {
        let reason = format!(
            "stock key {key} does not hold an integer: order not decided; \
             repair with `stockctl check --repair`, then replay this message"
        );
        tracing::error!(%order_id, %key, "dead-lettering an order: corrupt stock key");
        self.metrics.corrupt_stock.with_label_values(&[&key]).inc();
        if let Ok(mut keys) = self.corrupt_keys.lock() {
            keys.insert(key);
        }
        OutMessage::dead_letter(&self.topics.dlq, m, &reason, WORKER)
    }
}

/// The deduct command that carries an order's recorded decision to the consumer: a
/// pre-deduction (with its token), or a refusal.
fn deduct_command(order_id: &str, record: OrderRecord) -> Result<DeductCommand, StoreError> {
    Ok(match record {
        OrderRecord::Held {
            token,
            items,
            customer,
        }
        | OrderRecord::Returned {
            token,
            items,
            customer,
        } => DeductCommand::Reserve {
            v: INTERNAL_VERSION,
            order_id: order_id.to_owned(),
            items,
            token: Some(token),
            customer,
        },
        OrderRecord::Refused {
            reason, product_id, ..
        } => DeductCommand::Refuse {
            v: INTERNAL_VERSION,
            order_id: order_id.to_owned(),
            reason,
            product_id,
        },
        OrderRecord::Pending(_) => {
            return Err(StoreError::Protocol(format!(
                "order {order_id}: an undecided claim reached publishing"
            )))
        }
    })
}

impl batch_loop::BatchStep for Worker {
    fn name(&self) -> &'static str {
        WORKER
    }

    fn has_waiting(&self) -> bool {
        !self.parking.is_empty()
    }

    fn step<'a>(
        &'a self,
        msgs: &'a [OwnedMessage],
        shutdown: &'a CancellationToken,
    ) -> futures::future::BoxFuture<'a, Result<batch_loop::Stepped, KafkaStepError>> {
        Box::pin(async move {
            if !msgs.is_empty() {
                self.metrics.batch_size.observe(msgs.len() as f64);
            }
            if !self.redis.is_cluster() {
                let d = self
                    .decide_retrying(msgs, &HashSet::new(), false, shutdown)
                    .await?;
                tracing::debug!(summary = ?d.summary, "batch decided");
                return Ok(d.out.into());
            }
            // On a cluster, what touches a slot that lost its data waits; the rest goes on.
            let assignment = self.consumer.assignment().ok();
            let assigned = |topic: &str, partition: i32| {
                assignment
                    .as_ref()
                    .is_none_or(|a| a.find_partition(topic, partition).is_some())
            };
            let c = self.parking.candidates(msgs, assigned);
            if c.msgs.is_empty() {
                return Ok(batch_loop::Stepped {
                    out: Vec::new(),
                    offsets: Some(self.parking.offsets(&[])),
                });
            }
            let d = self
                .decide_retrying(&c.msgs, &c.waiting_ids, true, shutdown)
                .await?;
            let waits: Vec<(OwnedMessage, Option<String>)> = d
                .waiting
                .into_iter()
                .filter_map(|(n, id)| c.msgs.get(n).map(|m| (m.clone(), id)))
                .collect();
            self.parking.park(waits);
            let waiting = self.parking.len();
            // Logged when the number changes, not at every retry.
            if self.metrics.waiting.get() != waiting as i64 {
                if waiting > 0 {
                    tracing::warn!(
                        waiting,
                        "messages wait for redis slots that are not loaded (`stockctl \
                         rebuild`); the others go on"
                    );
                } else {
                    tracing::info!("no message waits for a redis slot any more");
                }
            }
            self.metrics.waiting.set(waiting as i64);
            tracing::debug!(summary = ?d.summary, "batch decided");
            Ok(batch_loop::Stepped {
                out: d.out,
                offsets: Some(self.parking.offsets(&c.msgs)),
            })
        })
    }
}
