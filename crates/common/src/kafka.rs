//! Kafka plumbing shared by both workers: client settings, gathering a batch, publishing a
//! batch and waiting for every delivery report, dead-letter records, storing offsets.
//!
//! Offsets follow the at-least-once recipe: `enable.auto.offset.store=false`, and a batch's
//! offsets are stored only after every effect of the batch is durable (database commit,
//! Redis script, delivery reports of everything it produced). Auto-commit then commits
//! what was stored; [`commit_final`] commits synchronously at shutdown.

use crate::config::{BatchArgs, KafkaArgs};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Errors of the Kafka layer, and what the worker loop does with each.
#[derive(Debug, thiserror::Error)]
pub enum KafkaStepError {
    /// Shutdown was requested while deliveries were still being retried: stop without
    /// storing offsets for the batch (it is redelivered after the restart).
    #[error("interrupted by shutdown before every message was delivered")]
    Interrupted,
    /// The producer hit a fatal error (e.g. idempotence state lost): stop the worker;
    /// nothing of the batch was acknowledged, so a restart redelivers it.
    #[error("fatal producer error: {0}")]
    Fatal(String),
    /// A client could not be created from the settings: stop.
    #[error("kafka client setup: {0}")]
    Setup(#[from] KafkaError),
}

/// Settings common to every client: the brokers and the user's `--kafka-option`s.
pub fn client_config(args: &KafkaArgs) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    apply_user_settings(&mut cfg, args);
    cfg
}

/// Sets the brokers and the user's `--kafka-option`s on `cfg`; called last so they win
/// over the defaults of this module.
fn apply_user_settings(cfg: &mut ClientConfig, args: &KafkaArgs) {
    cfg.set("bootstrap.servers", &args.brokers);
    // librdkafka 2.10+ "re-bootstraps" when every broker looks down. After a restart of the
    // broker, clients were seen stuck for good in that sequence ("1/1 brokers are down"
    // while the broker answered; librdkafka #5088, #5600): the nemesis test caught a
    // consumer and a producer that never recovered. `none` keeps the pre-2.10 behaviour,
    // reconnecting to the brokers already known, which is what a broker restart needs.
    // A `--kafka-option metadata.recovery.strategy=rebootstrap` restores the default.
    cfg.set("metadata.recovery.strategy", "none");
    for opt in &args.options {
        match opt.split_once('=') {
            Some((k, v)) => {
                cfg.set(k.trim(), v.trim());
            }
            None => tracing::warn!(option = %opt, "ignoring a kafka option that is not key=value"),
        }
    }
}

/// A consumer in `group` subscribed to `topics`, with manual offset storing.
pub fn consumer(
    args: &KafkaArgs,
    group: &str,
    topics: &[&str],
) -> Result<StreamConsumer, KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000")
        .set("max.poll.interval.ms", "300000")
        .set("fetch.wait.max.ms", "20")
        .set("queued.min.messages", "20000");
    apply_user_settings(&mut cfg, args);
    let consumer: StreamConsumer = cfg.create()?;
    consumer.subscribe(topics)?;
    Ok(consumer)
}

/// An idempotent producer (`acks=all`, no duplicates or reordering from its own retries).
pub fn producer(args: &KafkaArgs) -> Result<FutureProducer, KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        // Never give up on a message: a delivery that failed after a timeout may still have
        // been written, and re-sending it later could reorder an order's events. With
        // idempotence, librdkafka retries in order until the broker has it; what fails
        // still is permanent (and stops the worker).
        .set("message.timeout.ms", "0");
    apply_user_settings(&mut cfg, args);
    cfg.create()
}

/// Creates `topics` with `partitions` partitions each (replication 1), ignoring those that
/// exist already.
pub async fn create_topics(
    args: &KafkaArgs,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(args).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin.create_topics(&new, &AdminOptions::new()).await?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code))
                    .inspect_err(|_| tracing::error!(%topic, ?code, "cannot create topic"))
            }
        }
    }
    Ok(())
}

/// Deletes `topics` (those already gone are fine). For tests and benchmarks, which
/// create topics of their own: left behind, thousands of them make a broker restart take
/// minutes.
pub async fn delete_topics(args: &KafkaArgs, topics: &[&str]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(args).create()?;
    for r in admin.delete_topics(topics, &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
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

/// Stores, for every partition in `msgs`, the offset after its last message. A partition
/// revoked meanwhile refuses the store: that batch is simply redelivered to its new owner,
/// which the idempotent handlers make harmless.
pub fn store_offsets<'a>(
    consumer: &StreamConsumer,
    msgs: impl IntoIterator<Item = &'a OwnedMessage>,
) {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in msgs {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::with_capacity(next.len());
    for ((topic, partition), offset) in next {
        if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
            tracing::warn!(%topic, partition, error = %e, "cannot add offset to the list");
        }
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

/// A message to publish, owned so that it can be re-sent after a failed delivery.
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl OutMessage {
    /// Ready-made bytes keyed by `key`, without headers.
    pub fn keyed(topic: &str, key: String, payload: Vec<u8>) -> Self {
        OutMessage {
            topic: topic.to_owned(),
            key: key.into_bytes(),
            payload,
            headers: Vec::new(),
        }
    }

    /// A JSON message keyed by order id.
    pub fn json<T: serde::Serialize>(topic: &str, order_id: &str, value: &T) -> Self {
        // Serializing our own plain structs cannot fail.
        let payload = serde_json::to_vec(value).unwrap_or_default();
        OutMessage::keyed(topic, order_id.to_owned(), payload)
    }

    /// A dead letter for `source`: its key and bytes unchanged, the reason and origin in
    /// headers (`dlq.reason`, `dlq.source.topic`, `dlq.source.partition`,
    /// `dlq.source.offset`, `dlq.worker`).
    pub fn dead_letter(dlq_topic: &str, source: &OwnedMessage, reason: &str, worker: &str) -> Self {
        OutMessage {
            topic: dlq_topic.to_owned(),
            key: source.key().map(<[u8]>::to_vec).unwrap_or_default(),
            payload: source.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: vec![
                ("dlq.reason", reason.as_bytes().to_vec()),
                ("dlq.source.topic", source.topic().as_bytes().to_vec()),
                (
                    "dlq.source.partition",
                    source.partition().to_string().into_bytes(),
                ),
                (
                    "dlq.source.offset",
                    source.offset().to_string().into_bytes(),
                ),
                ("dlq.worker", worker.as_bytes().to_vec()),
            ],
        }
    }

    fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut rec = FutureRecord::to(&self.topic)
            .key(&self.key[..])
            .payload(&self.payload[..]);
        if !self.headers.is_empty() {
            let mut h = OwnedHeaders::new_with_capacity(self.headers.len());
            for (k, v) in &self.headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(&v[..]),
                });
            }
            rec = rec.headers(h);
        }
        rec
    }
}

/// Publishes every message and waits for all delivery reports. A failed delivery is sent
/// again (consumers of every topic are idempotent, so a duplicate is harmless) with capped
/// exponential backoff: 100 ms doubling to 5 s, for as long as it takes, each retry logged.
/// Returns only when all are acknowledged, on shutdown ([`KafkaStepError::Interrupted`]),
/// or on a fatal producer error.
pub async fn publish_all(
    producer: &FutureProducer,
    msgs: &[OutMessage],
    shutdown: &CancellationToken,
) -> Result<(), KafkaStepError> {
    let mut pending: Vec<usize> = (0..msgs.len()).collect();
    let mut delay = Duration::from_millis(100);
    loop {
        let mut futures: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(pending.len());
        for &i in &pending {
            futures.push((i, enqueue(producer, &msgs[i], shutdown).await?));
        }
        let mut failed = Vec::new();
        for (i, fut) in futures {
            match fut.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    tracing::warn!(topic = %msgs[i].topic, error = %e, "delivery failed; will resend");
                    failed.push(i);
                }
                Err(_) => failed.push(i),
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        if let Some((code, reason)) = producer.client().fatal_error() {
            return Err(KafkaStepError::Fatal(format!("{code:?}: {reason}")));
        }
        tracing::warn!(failed = failed.len(), retry_in = ?delay, "resending undelivered messages");
        tokio::select! {
            _ = shutdown.cancelled() => return Err(KafkaStepError::Interrupted),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
        pending = failed;
    }
}

/// Puts every message in the producer's queue, in order (so that an order's events keep
/// their order on each partition), and returns their delivery futures.
pub async fn enqueue_all(
    producer: &FutureProducer,
    msgs: &[OutMessage],
    shutdown: &CancellationToken,
) -> Result<Vec<DeliveryFuture>, KafkaStepError> {
    let mut futures = Vec::with_capacity(msgs.len());
    for m in msgs {
        futures.push(enqueue(producer, m, shutdown).await?);
    }
    Ok(futures)
}

/// A worker's work on one batch: its effects, and what to publish.
pub trait BatchStep: Sync {
    /// The worker's name (`producer`, `consumer`): the prefix of its failpoints in
    /// [`run_pipeline`] (`<name>.after_step`, `<name>.after_publish`, `<name>.after_store`).
    fn name(&self) -> &'static str;

    fn step<'a>(
        &'a self,
        msgs: &'a [OwnedMessage],
        shutdown: &'a CancellationToken,
    ) -> futures::future::BoxFuture<'a, Result<Vec<OutMessage>, KafkaStepError>>;
}

/// The loop both workers run. Batches flow through two stages: `step` (the Redis scripts
/// or the PostgreSQL transaction: one batch at a time, in order) and the wait for delivery
/// reports ([`InFlight`], overlapping the next batch's step). `step` returns what to
/// publish; it is enqueued in batch order, and offsets are stored in batch order once
/// delivered. Returns on shutdown, after the enqueued batches got their reports (30 s at
/// most), or with the first fatal error.
///
/// Failpoints (see [`crate::failpoint`]) at the crash windows of `docs/DESIGN.md`, named
/// after [`BatchStep::name`]: `<name>.after_step` (effects durable, nothing published),
/// `<name>.after_publish` (a batch's delivery reports all in, offsets not stored) and
/// `<name>.after_store` (offsets stored, not committed).
pub async fn run_pipeline(
    consumer: &StreamConsumer,
    producer: &FutureProducer,
    batch: &BatchArgs,
    shutdown: &CancellationToken,
    worker: &impl BatchStep,
) -> Result<(), KafkaStepError> {
    let mut inflight = InFlight::new(batch.pipeline_depth, worker.name());
    let idle = Some(Duration::from_millis(100));
    loop {
        inflight.settle(consumer).await?;
        let Some(msgs) = next_batch(consumer, batch, idle, shutdown).await else {
            break;
        };
        if msgs.is_empty() {
            continue;
        }
        let out = match worker.step(&msgs, shutdown).await {
            Ok(out) => out,
            Err(KafkaStepError::Interrupted) => break,
            Err(e) => return Err(e),
        };
        crate::failpoint!(format!("{}.after_step", worker.name()));
        match enqueue_all(producer, &out, shutdown).await {
            Ok(deliveries) => inflight.push(msgs, deliveries),
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

/// Batches whose messages are enqueued but not all acknowledged yet, oldest first. The
/// worker goes on with the next batch meanwhile (its Redis or PostgreSQL step overlaps
/// the wait); offsets are stored strictly in batch order, each batch's only once all its
/// delivery reports are in. A failed delivery (permanent with `message.timeout.ms=0`) is
/// fatal: nothing of that batch or later ones is stored, and a restart redelivers them.
pub struct InFlight {
    depth: usize,
    queue: std::collections::VecDeque<(Vec<OwnedMessage>, DeliveryWaiter)>,
    /// The worker's name, for its failpoints.
    worker: &'static str,
}

impl InFlight {
    /// At most `depth` batches waiting for delivery reports (1 = no overlap), of `worker`.
    pub fn new(depth: usize, worker: &'static str) -> Self {
        InFlight {
            depth: depth.max(1),
            queue: Default::default(),
            worker,
        }
    }

    /// Adds a batch whose output is enqueued.
    pub fn push(&mut self, msgs: Vec<OwnedMessage>, deliveries: Vec<DeliveryFuture>) {
        let waiter = tokio::spawn(async move {
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
        self.queue.push_back((msgs, waiter));
    }

    /// Stores the offsets of every finished batch at the front; waits for the oldest ones
    /// while more than `depth - 1` are pending, so that there is room for the next.
    pub async fn settle(&mut self, consumer: &StreamConsumer) -> Result<(), KafkaStepError> {
        while let Some((_, waiter)) = self.queue.front() {
            if !waiter.is_finished() && self.queue.len() < self.depth {
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

    async fn complete_front(&mut self, consumer: &StreamConsumer) -> Result<(), KafkaStepError> {
        if let Some((msgs, waiter)) = self.queue.pop_front() {
            waiter
                .await
                .map_err(|e| KafkaStepError::Fatal(format!("delivery waiter: {e}")))??;
            crate::failpoint!(format!("{}.after_publish", self.worker));
            store_offsets(consumer, &msgs);
            crate::failpoint!(format!("{}.after_store", self.worker));
        }
        Ok(())
    }
}

/// Puts one message in the producer's queue, waiting while the queue is full.
async fn enqueue(
    producer: &FutureProducer,
    msg: &OutMessage,
    shutdown: &CancellationToken,
) -> Result<DeliveryFuture, KafkaStepError> {
    loop {
        match producer.send_result(msg.record()) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                if shutdown.is_cancelled() && producer.in_flight_count() == 0 {
                    return Err(KafkaStepError::Interrupted);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    return Err(KafkaStepError::Fatal(format!("{code:?}: {reason}")));
                }
                tracing::warn!(topic = %msg.topic, error = %e, "cannot enqueue message; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(KafkaStepError::Interrupted),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

/// Waits for the producer's queue to drain, for shutdown.
pub fn flush(producer: &FutureProducer) {
    if let Err(e) = producer.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %e, "producer flush did not finish");
    }
}

/// How many partitions `topic` has.
pub fn partition_count(args: &KafkaArgs, topic: &str) -> Result<i32, KafkaError> {
    let consumer: StreamConsumer = client_config(args).create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let n = md.topics().first().map_or(0, |t| t.partitions().len());
    if n == 0 {
        return Err(KafkaError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    Ok(n as i32)
}

/// The high watermark (offset of the next message) of every partition of `topic`.
pub fn end_offsets(args: &KafkaArgs, topic: &str) -> Result<Vec<i64>, KafkaError> {
    let consumer: StreamConsumer = client_config(args).create()?;
    (0..partition_count(args, topic)?)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map(|(_, high)| high)
        })
        .collect()
}

/// The offsets `group` has committed on every partition of `topic` (0 where none).
pub fn committed_offsets(
    args: &KafkaArgs,
    group: &str,
    topic: &str,
) -> Result<Vec<i64>, KafkaError> {
    let mut cfg = client_config(args);
    cfg.set("group.id", group);
    let consumer: StreamConsumer = cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partition_count(args, topic)? {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .collect())
}

/// Reads every message of `topic` from the beginning up to its end offsets at the time of
/// the call, handing each to `f`.
pub async fn read_to_end(
    args: &KafkaArgs,
    topic: &str,
    mut f: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<usize, KafkaError> {
    let mut cfg = client_config(args);
    cfg.set("group.id", "stockpipe-reader")
        .set("enable.auto.commit", "false");
    let consumer: StreamConsumer = cfg.create()?;
    let mut tpl = TopicPartitionList::new();
    // Partitions that hold messages now, and where they end.
    let mut left: BTreeMap<i32, i64> = BTreeMap::new();
    for p in 0..partition_count(args, topic)? {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if low < high {
            left.insert(p, high);
        }
    }
    consumer.assign(&tpl)?;
    let mut n = 0;
    while !left.is_empty() {
        let m = consumer.recv().await?;
        if let Some(end) = left.get(&m.partition()).copied() {
            if m.offset() < end {
                f(&m);
                n += 1;
            }
            if m.offset() + 1 >= end {
                left.remove(&m.partition());
            }
        }
    }
    Ok(n)
}
