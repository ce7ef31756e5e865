//! The batch loop both workers run, and the life of a worker around it.
//!
//! * [`serve`]: a worker's whole run: its `/metrics`, `/healthz`, `/readyz` endpoints,
//!   the batch loop and any companion task (the consumer's expiry sweeper), then the final
//!   synchronous offset commit and the producer flush. Both worker binaries go through it.
//! * [`run_pipeline`]: the loop itself. A batch is read ([`next_batch`]), handed to the
//!   worker's [`BatchStep`] (the Redis scripts or the PostgreSQL transaction), what it
//!   returns is enqueued, and the batch waits in [`InFlight`] for its delivery reports
//!   while the next batch runs its step.
//! * Offsets: a batch's offsets are stored ([`store_offsets`]) only after every effect of
//!   the batch is durable (its step, and the delivery reports of everything it produced),
//!   strictly in batch order. Auto-commit then commits what was stored; at shutdown the
//!   loop drains what is in flight and [`commit_final`] commits synchronously.
//!
//! Failpoints (see [`crate::failpoint`]) mark the crash windows of `docs/DESIGN.md`:
//! `<worker>.after_step`, `<worker>.after_publish`, `<worker>.after_store`.

use crate::config::BatchArgs;
use crate::kafka::{enqueue_all, flush, Delivery, KafkaStepError, OutMessage, StallWatch};
use crate::metrics::{Metrics, MetricsArgs, ReadinessCheck};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where a worker's batch loop reads and publishes, and how it batches.
pub struct Clients<'a> {
    pub consumer: &'a Arc<StreamConsumer>,
    pub producer: &'a FutureProducer,
    pub batch: &'a BatchArgs,
    /// Watches the wait for delivery reports and the consumer's group membership
    /// (`--kafka-stall-timeout`).
    pub stall: &'a StallWatch,
    /// The consumer's group.
    pub group: &'a str,
}

/// A worker's `/metrics`, `/healthz` and `/readyz` endpoints.
pub struct Endpoints<'a> {
    pub args: &'a MetricsArgs,
    /// The address when `--metrics-addr` is not given.
    pub default_addr: &'a str,
    pub metrics: &'a Metrics,
    pub ready: ReadinessCheck,
}

/// Runs a worker until `shutdown`: starts its endpoints, runs the batch loop
/// ([`run_pipeline`]) with `worker`'s step and, alongside, `companion` (the consumer's
/// expiry sweeper; `|_| async { Ok(()) }` for none), which gets a token cancelled at
/// shutdown or when the loop ends on its own (an error). A companion that fails (a stalled
/// Kafka client) stops the loop as shutdown would. Then commits the stored offsets
/// synchronously and flushes the producer. Returns the first error of either.
pub async fn serve<C, F>(
    worker: &impl BatchStep,
    clients: Clients<'_>,
    endpoints: Endpoints<'_>,
    companion: C,
    shutdown: &CancellationToken,
) -> Result<(), KafkaStepError>
where
    C: FnOnce(CancellationToken) -> F,
    F: Future<Output = Result<(), KafkaStepError>>,
{
    let background = shutdown.child_token();
    crate::metrics::spawn(
        endpoints.args,
        endpoints.default_addr,
        endpoints.metrics,
        clients.consumer.clone(),
        endpoints.ready,
        &background,
    );
    let companion_stop = shutdown.child_token();
    let loop_stop = shutdown.child_token();
    let batches = async {
        let r = run_pipeline(&clients, &loop_stop, worker).await;
        companion_stop.cancel();
        r
    };
    let beside = async {
        let r = companion(companion_stop.clone()).await;
        if r.is_err() {
            loop_stop.cancel();
        }
        r
    };
    let membership = async {
        let r = watch_membership(&clients, &companion_stop).await;
        if r.is_err() {
            loop_stop.cancel();
        }
        r
    };
    let (result, beside, membership) = tokio::join!(batches, beside, membership);
    background.cancel();
    commit_final(clients.consumer);
    flush(clients.producer);
    tracing::info!("{} stopped", worker.name());
    result.and(beside).and(membership)
}

/// Until `stop`: once the consumer has had no partition for the stall timeout (at least
/// [`MEMBERSHIP_PATIENCE`]: a rebalance that waits for a departed member's session to
/// expire takes some seconds), asks whether it is outside its group
/// ([`StallWatch::outside_group`]); if so the worker ends with [`KafkaStepError::Stalled`]
/// (its supervisor starts it afresh, and it joins anew).
async fn watch_membership(
    clients: &Clients<'_>,
    stop: &CancellationToken,
) -> Result<(), KafkaStepError> {
    let patience = clients
        .stall
        .after()
        .clamp(MEMBERSHIP_PATIENCE, Duration::from_secs(3600));
    let mut empty_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let assigned = clients
            .consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false);
        if assigned {
            empty_since = None;
            continue;
        }
        let since = *empty_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < patience {
            continue;
        }
        if clients.stall.outside_group(clients.group).await? {
            return Err(KafkaStepError::Stalled(format!(
                "the consumer has had no partition for {:.0?} and is outside group {} \
                 while the brokers answer a new client; exiting so that a restart joins \
                 afresh",
                since.elapsed(),
                clients.group
            )));
        }
        empty_since = Some(tokio::time::Instant::now());
    }
}

/// The shortest wait without partitions before a consumer's membership is checked.
pub const MEMBERSHIP_PATIENCE: Duration = Duration::from_secs(30);

/// A worker's work on one batch: its effects, and what to publish.
pub trait BatchStep: Sync {
    /// The worker's name (`producer`, `consumer`): the prefix of its failpoints in
    /// [`run_pipeline`] (`<name>.after_step`, `<name>.after_publish`, `<name>.after_store`).
    fn name(&self) -> &'static str;

    fn step<'a>(
        &'a self,
        msgs: &'a [OwnedMessage],
        shutdown: &'a CancellationToken,
    ) -> futures::future::BoxFuture<'a, Result<Stepped, KafkaStepError>>;

    /// Whether the worker holds messages back that a step should try again even when no
    /// new message came (then the loop steps with an empty batch at every idle tick).
    fn has_waiting(&self) -> bool {
        false
    }
}

/// What a step produced.
pub struct Stepped {
    /// What to publish, in order.
    pub out: Vec<OutMessage>,
    /// The offsets to store once `out` is delivered: `None` for those after the batch's
    /// messages; a worker that holds messages back (the producer's orders waiting for a
    /// Redis Cluster slot) gives its own, never past a message it holds.
    pub offsets: Option<Offsets>,
}

/// Offsets to store: (topic, partition, the next offset to read).
pub type Offsets = Vec<(String, i32, i64)>;

impl From<Vec<OutMessage>> for Stepped {
    fn from(out: Vec<OutMessage>) -> Self {
        Stepped { out, offsets: None }
    }
}

/// For every partition in `msgs`, the offset after its last message.
pub fn offsets_after<'a>(msgs: impl IntoIterator<Item = &'a OwnedMessage>) -> Offsets {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in msgs {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    next.into_iter()
        .map(|((t, p), o)| (t.to_owned(), p, o))
        .collect()
}

/// The loop both workers run. Batches flow through two stages: `step` (the Redis scripts
/// or the PostgreSQL transaction: one batch at a time, in order) and the wait for delivery
/// reports ([`InFlight`], overlapping the next batch's step). `step` returns what to
/// publish; it is enqueued in batch order, and offsets are stored in batch order once
/// delivered. Returns on shutdown, after the enqueued batches got their reports (30 s at
/// most), or with the first fatal error (a stalled client among them: [`StallWatch`]).
///
/// Failpoints (see [`crate::failpoint`]) at the crash windows of `docs/DESIGN.md`, named
/// after [`BatchStep::name`]: `<name>.after_step` (effects durable, nothing published),
/// `<name>.after_publish` (a batch's delivery reports all in, offsets not stored) and
/// `<name>.after_store` (offsets stored, not committed).
pub async fn run_pipeline(
    clients: &Clients<'_>,
    shutdown: &CancellationToken,
    worker: &impl BatchStep,
) -> Result<(), KafkaStepError> {
    let (consumer, producer, batch) = (clients.consumer, clients.producer, clients.batch);
    let mut inflight = InFlight::new(batch.pipeline_depth, worker.name(), clients.stall.clone());
    let idle = Some(Duration::from_millis(100));
    loop {
        // Kafka down: the wait for reports ends at shutdown too (settle is cancel-safe).
        tokio::select! {
            r = inflight.settle(consumer) => r?,
            _ = shutdown.cancelled() => break,
        }
        let Some(msgs) = next_batch(consumer, batch, idle, shutdown).await else {
            break;
        };
        if msgs.is_empty() && !worker.has_waiting() {
            continue;
        }
        let stepped = match worker.step(&msgs, shutdown).await {
            Ok(s) => s,
            Err(KafkaStepError::Interrupted) => break,
            Err(e) => return Err(e),
        };
        crate::failpoint!(format!("{}.after_step", worker.name()));
        let offsets = stepped.offsets.unwrap_or_else(|| offsets_after(&msgs));
        match enqueue_all(producer, &stepped.out, shutdown).await {
            Ok(deliveries) => inflight.push(offsets, deliveries),
            Err(KafkaStepError::Interrupted) => break,
            Err(e) => return Err(e),
        }
    }
    // Shutdown: what is enqueued gets its delivery reports and its offsets stored.
    match tokio::time::timeout(Duration::from_secs(30), inflight.drain(consumer)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                "deliveries still pending at shutdown; those batches will be redelivered"
            );
            Ok(())
        }
    }
}

/// Waits for every delivery report of one batch.
type DeliveryWaiter = tokio::task::JoinHandle<Result<(), KafkaStepError>>;

/// A batch whose output is enqueued: the offsets to store after it, the wait for its
/// delivery reports, and when it was enqueued.
struct Pending {
    offsets: Offsets,
    waiter: DeliveryWaiter,
    since: tokio::time::Instant,
}

/// Batches whose messages are enqueued but not all acknowledged yet, oldest first. The
/// worker goes on with the next batch meanwhile (its Redis or PostgreSQL step overlaps
/// the wait); offsets are stored strictly in batch order, each batch's only once all its
/// delivery reports are in. A failed delivery (permanent with `message.timeout.ms=0`) is
/// fatal: nothing of that batch or later ones is stored, and a restart redelivers them.
/// So is a stalled client ([`StallWatch`]).
pub struct InFlight {
    depth: usize,
    queue: std::collections::VecDeque<Pending>,
    /// The worker's name, for its failpoints.
    worker: &'static str,
    stall: StallWatch,
    /// When the brokers were last asked about a stall (at most once per stall timeout).
    asked: Option<tokio::time::Instant>,
}

impl InFlight {
    /// At most `depth` batches waiting for delivery reports (1 = no overlap), of `worker`.
    pub fn new(depth: usize, worker: &'static str, stall: StallWatch) -> Self {
        InFlight {
            depth: depth.max(1),
            queue: Default::default(),
            worker,
            stall,
            asked: None,
        }
    }

    /// Adds a batch whose output is enqueued.
    pub fn push(&mut self, offsets: Offsets, deliveries: Vec<Delivery>) {
        let worker = self.worker;
        let waiter = tokio::spawn(async move {
            // Armed with `return`: the reports never come, as from a stalled client.
            crate::failpoint_hang!(format!("{worker}.delivery_hang"));
            for d in deliveries {
                match d.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, m))) => {
                        return Err(KafkaStepError::Fatal(format!(
                            "delivery to {} failed: {e}",
                            m.topic()
                        )));
                    }
                    Err(_) => {
                        return Err(KafkaStepError::Fatal("producer dropped a delivery".into()))
                    }
                }
            }
            Ok(())
        });
        self.queue.push_back(Pending {
            offsets,
            waiter,
            since: tokio::time::Instant::now(),
        });
    }

    /// Stores the offsets of every finished batch at the front; waits for the oldest ones
    /// while more than `depth - 1` are pending, so that there is room for the next. An
    /// oldest batch that is not needed yet but has waited past the stall timeout has the
    /// brokers asked about it ([`StallWatch::check`]) once per timeout.
    pub async fn settle(&mut self, consumer: &StreamConsumer) -> Result<(), KafkaStepError> {
        while let Some(front) = self.queue.front() {
            if !front.waiter.is_finished() && self.queue.len() < self.depth {
                let since = front.since;
                let due = self
                    .asked
                    .is_none_or(|at| at.elapsed() >= self.stall.after());
                if due && since.elapsed() >= self.stall.after() {
                    self.asked = Some(tokio::time::Instant::now());
                    self.stall.check("a batch's output", since).await?;
                }
                break;
            }
            self.complete_front(consumer).await?;
        }
        Ok(())
    }

    /// Waits for every pending batch and stores their offsets (shutdown).
    pub async fn drain(&mut self, consumer: &StreamConsumer) -> Result<(), KafkaStepError> {
        while !self.queue.is_empty() {
            self.complete_front(consumer).await?;
        }
        Ok(())
    }

    /// Waits for the oldest batch's reports and stores its offsets. Cancel-safe: the batch
    /// leaves the queue only once its reports are in, so a later batch's offsets are never
    /// stored before it.
    async fn complete_front(&mut self, consumer: &StreamConsumer) -> Result<(), KafkaStepError> {
        if let Some(front) = self.queue.front_mut() {
            let (since, waiter) = (front.since, &mut front.waiter);
            let reports = self.stall.watch("a batch's output", since, waiter).await?;
            let Some(Pending { offsets, .. }) = self.queue.pop_front() else {
                return Ok(());
            };
            reports.map_err(|e| KafkaStepError::Fatal(format!("delivery waiter: {e}")))??;
            crate::failpoint!(format!("{}.after_publish", self.worker));
            store_offsets(consumer, &offsets);
            crate::failpoint!(format!("{}.after_store", self.worker));
        }
        Ok(())
    }
}

/// Waits for the first message (or shutdown), then gathers more until `batch_size`
/// messages or `linger` has passed. `None` means shutdown was requested. With `idle`, an
/// empty batch comes back when no message arrived for that long.
pub async fn next_batch(
    consumer: &StreamConsumer,
    batch: &BatchArgs,
    idle: Option<Duration>,
    shutdown: &CancellationToken,
) -> Option<Vec<OwnedMessage>> {
    let idle_deadline = idle.map(|d| tokio::time::Instant::now() + d);
    let first = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            _ = sleep_until_opt(idle_deadline) => return Some(Vec::new()),
            m = consumer.recv() => match m {
                Ok(m) => break m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    };
    let mut msgs = Vec::with_capacity(batch.batch_size.min(4096));
    msgs.push(first);
    let deadline = tokio::time::Instant::now() + batch.linger;
    while msgs.len() < batch.batch_size {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => msgs.push(m.detach()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kafka consumer error while filling a batch");
                break;
            }
            Err(_) => break,
        }
    }
    Some(msgs)
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Stores `offsets`. A partition revoked meanwhile refuses the store: that batch is simply
/// redelivered to its new owner, which the idempotent handlers make harmless.
pub fn store_offsets(consumer: &StreamConsumer, offsets: &Offsets) {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (topic, partition, offset) in offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::warn!(%topic, partition, error = %e, "cannot add offset to the list");
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::info!(error = %e, "offsets not stored (partition revoked?); the batch will be redelivered");
    }
}

/// Synchronous commit of the stored offsets, for shutdown.
pub fn commit_final(consumer: &StreamConsumer) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("final offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => {
            tracing::warn!(error = %e, "final offset commit failed; the last batch may be redelivered")
        }
    }
}
