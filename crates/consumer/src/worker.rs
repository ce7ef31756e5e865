//! The consumer loop: gather a batch of `stock.deduct`, apply it in one transaction,
//! publish its results and compensations, wait for their delivery reports, and only then
//! store the batch's offsets.

use crate::store::{self, ApplyError};
use crate::ConsumerArgs;
use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use stock_common::batch_loop::{self, Clients, Endpoints};
use stock_common::config::{BatchArgs, Topics};
use stock_common::events::{DeductCommand, INTERNAL_VERSION};
use stock_common::kafka::{self, KafkaStepError, OutMessage, StallWatch};
use stock_common::metrics::{Metrics, MetricsArgs, ReadinessCheck};
use tokio_util::sync::CancellationToken;

const WORKER: &str = "consumer";

/// What one batch did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    pub commands: usize,
    pub new_orders: usize,
    pub compensations: usize,
    pub dead_letters: usize,
}

pub struct Worker {
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    /// Watches the producer's delivery reports (`--kafka-stall-timeout`).
    stall: StallWatch,
    /// The consumer group.
    group: String,
    pool: PgPool,
    topics: Topics,
    batch: BatchArgs,
    reservation_ttl: Duration,
    expiry_interval: Duration,
    metrics: Metrics,
    metrics_args: MetricsArgs,
    /// The error of the batch being retried, while the database refuses it (for `/readyz`).
    failing: Arc<std::sync::Mutex<Option<String>>>,
}

impl Worker {
    /// Checks that PostgreSQL and Kafka accept this worker's settings (a refused
    /// certificate or password stops it here, with the cause), connects everything and,
    /// unless told not to, applies pending migrations.
    pub async fn new(args: &ConsumerArgs) -> anyhow::Result<Self> {
        use anyhow::Context;
        stock_common::db::check(&args.db, stock_common::config::STARTUP_PATIENCE).await?;
        kafka::check(&args.kafka, stock_common::config::STARTUP_PATIENCE).await?;
        let pool = stock_common::db::pool(&args.db).context("database settings")?;
        if args.migrate {
            stock_common::db::migrate(&pool)
                .await
                .with_context(|| format!("migrating {}", args.db.url))?;
        }
        let consumer = kafka::consumer(&args.kafka, &args.group, &[&args.topics.deduct])
            .context("kafka consumer")?;
        let producer = kafka::producer(&args.kafka).context("kafka producer")?;
        Ok(Worker {
            consumer: Arc::new(consumer),
            metrics: Metrics::new("consumer").context("metrics")?,
            metrics_args: args.metrics.clone(),
            producer,
            stall: StallWatch::new(&args.kafka),
            group: args.group.clone(),
            pool,
            topics: args.topics.clone(),
            batch: args.batch.clone(),
            reservation_ttl: args.reservation_ttl,
            expiry_interval: args.expiry_interval,
            failing: Arc::default(),
        })
    }

    /// Runs until `shutdown`, with the expiry sweeper alongside the batch loop, then commits
    /// the stored offsets and flushes the producer ([`batch_loop::serve`]).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(topic = %self.topics.deduct, "consumer started");
        let pool = self.pool.clone();
        let failing = self.failing.clone();
        let ready: ReadinessCheck = Arc::new(move || {
            let (pool, failing) = (pool.clone(), failing.clone());
            Box::pin(async move {
                if let Some(e) = failing.lock().ok().and_then(|f| f.clone()) {
                    return Err(format!(
                        "the database refuses a batch (retrying, nothing dropped): {e}"
                    ));
                }
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("postgresql unreachable: {e}"))
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
            default_addr: "127.0.0.1:9465",
            metrics: &self.metrics,
            ready,
        };
        // The sweeper stops with the shutdown, or when the batch loop ends on its own (an error).
        let this = &self;
        let sweeper = |stop: CancellationToken| async move { this.sweep_loop(&stop).await };
        batch_loop::serve(this, clients, endpoints, sweeper, &shutdown).await?;
        Ok(())
    }

    /// Runs the expiry sweeper every `--expiry-interval` until shutdown. A failed sweep is
    /// logged and simply tried again at the next tick; a stalled Kafka client stops the
    /// worker (see [`kafka::StallWatch`]).
    async fn sweep_loop(&self, shutdown: &CancellationToken) -> Result<(), KafkaStepError> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.expiry_interval) => {}
            }
            let publish = (&self.producer, &self.stall);
            match crate::expiry::sweep(&self.pool, publish, &self.topics, shutdown).await {
                Ok(0) => {}
                Ok(n) => {
                    self.metrics.expired.inc_by(n as u64);
                    self.metrics
                        .outcomes
                        .with_label_values(&["released", "expired"])
                        .inc_by(n as u64);
                    tracing::info!(released = n, "reservations expired")
                }
                Err(crate::expiry::SweepError::Kafka(e @ KafkaStepError::Stalled(_))) => {
                    return Err(e)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "expiry sweep failed; retrying at the next tick")
                }
            }
        }
    }

    /// One step: apply `msgs` and publish everything they produce. Does not store offsets.
    pub async fn process(
        &self,
        msgs: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> Result<BatchSummary, KafkaStepError> {
        let (summary, out) = self.prepare(msgs, shutdown).await?;
        kafka::publish_all(&self.producer, &out, &self.stall, shutdown).await?;
        Ok(summary)
    }

    /// Applies `msgs` in PostgreSQL (with retries) and returns what to publish: results
    /// and compensations in command order, and dead letters.
    pub async fn prepare(
        &self,
        msgs: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> Result<(BatchSummary, Vec<OutMessage>), KafkaStepError> {
        let mut out = Vec::new();
        let mut ops: Vec<(usize, DeductCommand)> = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            match parse(m) {
                Ok(cmd) => ops.push((i, cmd)),
                Err(reason) => {
                    tracing::warn!(%reason, partition = m.partition(), offset = m.offset(), "dead-lettering a deduct message");
                    out.push(OutMessage::dead_letter(
                        &self.topics.dlq,
                        m,
                        &reason,
                        WORKER,
                    ));
                }
            }
        }
        let mut summary = BatchSummary {
            commands: ops.len(),
            ..Default::default()
        };
        // A command that parses stands for a decision already taken (a pre-deduction in
        // Redis, a payment): it is never dead-lettered. If PostgreSQL keeps refusing, the
        // batch is retried until it works, and `/readyz` and the log say why.
        let cmds: Vec<DeductCommand> = ops.into_iter().map(|(_, c)| c).collect();
        let plan = self.apply_retrying(&cmds, shutdown).await?;
        summary.new_orders = plan.inserts.len();
        summary.compensations = plan.compensations.len();
        for r in &plan.results {
            out.push(OutMessage::json(&self.topics.results, &r.order_id, r));
        }
        for c in &plan.compensations {
            out.push(OutMessage::json(&self.topics.compensate, &c.order_id, c));
        }
        summary.dead_letters = out.iter().filter(|m| m.topic == self.topics.dlq).count();
        self.metrics.batch_published(
            &plan.results,
            summary.dead_letters,
            "issued",
            summary.compensations,
        );
        Ok((summary, out))
    }

    /// Applies with capped exponential backoff (50 ms doubling to 5 s) until it works or
    /// shutdown. Transient errors (connection, deadlock, a conflict with another instance)
    /// are expected and logged as such; any other error (a statement timeout, a read-only
    /// database after a failover, a row this code cannot read, a bug) is logged as an
    /// error with its cause, counted, and shown by `/readyz` until a retry succeeds:
    /// dropping the batch would lose decided orders.
    async fn apply_retrying(
        &self,
        cmds: &[DeductCommand],
        shutdown: &CancellationToken,
    ) -> Result<crate::decide::Plan, KafkaStepError> {
        let mut backoff = ExponentialBackoff {
            initial_interval: Duration::from_millis(50),
            max_interval: Duration::from_secs(5),
            max_elapsed_time: None,
            ..Default::default()
        };
        loop {
            let timer = self.metrics.apply_seconds.start_timer();
            let applied = store::apply_batch(&self.pool, cmds, self.reservation_ttl).await;
            timer.observe_duration();
            let e = match applied {
                Ok(plan) => {
                    if let Ok(mut f) = self.failing.lock() {
                        *f = None;
                    }
                    return Ok(plan);
                }
                Err(e) => e,
            };
            let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(5));
            let cause = if matches!(e, ApplyError::Conflict(_)) {
                "conflict"
            } else {
                "database"
            };
            self.metrics.retries.with_label_values(&[cause]).inc();
            if matches!(e, ApplyError::Conflict(_)) {
                tracing::info!(error = %e, "retrying batch");
            } else if e.is_transient() {
                self.metrics.stalled.with_label_values(&["transient"]).inc();
                tracing::warn!(error = %e, retry_in = ?wait, "database unavailable; retrying batch");
            } else {
                self.metrics.stalled.with_label_values(&["permanent"]).inc();
                tracing::error!(error = %e, retry_in = ?wait, commands = cmds.len(), "the database refuses this batch; retrying it, nothing is dropped");
                if let Ok(mut f) = self.failing.lock() {
                    *f = Some(e.to_string());
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(KafkaStepError::Interrupted),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Reads one `stock.deduct` message; the error is the dead-letter reason.
pub fn parse(m: &OwnedMessage) -> Result<DeductCommand, String> {
    let bytes = m.payload().ok_or("empty message")?;
    let cmd: DeductCommand =
        serde_json::from_slice(bytes).map_err(|e| format!("not a deduct command: {e}"))?;
    if cmd.version() != INTERNAL_VERSION {
        return Err(format!("unknown deduct command version {}", cmd.version()));
    }
    Ok(cmd)
}

impl batch_loop::BatchStep for Worker {
    fn name(&self) -> &'static str {
        WORKER
    }

    fn step<'a>(
        &'a self,
        msgs: &'a [OwnedMessage],
        shutdown: &'a CancellationToken,
    ) -> futures::future::BoxFuture<'a, Result<batch_loop::Stepped, KafkaStepError>> {
        Box::pin(async move {
            self.metrics.batch_size.observe(msgs.len() as f64);
            let (summary, out) = self.prepare(msgs, shutdown).await?;
            tracing::debug!(?summary, "batch applied");
            Ok(out.into())
        })
    }
}
