//! Kafka plumbing shared by both workers: client settings, topics, publishing and waiting
//! for every delivery report, dead-letter records ([`OutMessage::dead_letter`], sent cut
//! to fit when too large: [`Delivery`]). Reading topics and offsets from outside the
//! pipeline (tests, benchmarks) is `stock-devkit`'s `topics`.
//!
//! The batch loop that reads batches and stores their offsets is
//! [`crate::batch_loop`]. Offsets follow the at-least-once recipe there:
//! `enable.auto.offset.store=false` (set by [`consumer`]), and a batch's offsets are
//! stored only after every effect of the batch is durable.

use crate::config::{ConfigError, KafkaArgs, KafkaSecurity};
use futures::channel::oneshot::Canceled;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
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
    /// No delivery report came for `--kafka-stall-timeout` while the brokers answer a new
    /// client ([`StallWatch`]): this process's client will not recover. Stop; nothing of
    /// the pending batches was acknowledged, so the restarted worker redoes them.
    #[error("kafka client stalled: {0}")]
    Stalled(String),
}

/// Watches the wait for delivery reports. librdkafka clients were seen never to reconnect
/// after a broker restart or a broker that stopped answering for a while (DESIGN, "Kafka,
/// PostgreSQL, Redis restarts"): the broker answered again, yet no report came for minutes
/// and the worker stood still. Once a batch's reports have been awaited for
/// `--kafka-stall-timeout`, and again each time that passes, a new client asks the brokers
/// for metadata. If they answer, the worker's own client is stalled:
/// [`KafkaStepError::Stalled`], the worker exits with that cause and its supervisor starts
/// it afresh (nothing of the pending batches was acknowledged, so they are redone). If
/// they do not, Kafka is down, and waiting is right; and once it answers again, the client
/// gets a whole timeout more to heal before it is called stalled.
///
/// The timeout must leave librdkafka time to heal on its own once the brokers are back:
/// requests stuck on a dead connection end after `socket.timeout.ms` (60 s), and
/// reconnection backs off up to `reconnect.backoff.max.ms` (10 s). Hence 120 s by default;
/// an early restart costs a restart, never an effect.
#[derive(Clone)]
pub struct StallWatch {
    /// `None`: never asks (tools and tests that wait on their own terms).
    args: Option<KafkaArgs>,
    after: Duration,
    /// When the brokers last did not answer (shared by the clones: one client's waits).
    silent_at: Arc<Mutex<Option<tokio::time::Instant>>>,
}

impl StallWatch {
    /// A watch with `args`'s brokers and `--kafka-stall-timeout`.
    pub fn new(args: &KafkaArgs) -> Self {
        StallWatch {
            args: Some(args.clone()),
            after: args.stall_timeout.max(Duration::from_millis(100)),
            silent_at: Arc::default(),
        }
    }

    /// A watch that waits for ever.
    pub fn off() -> Self {
        StallWatch {
            args: None,
            after: Duration::MAX,
            silent_at: Arc::default(),
        }
    }

    /// Awaits `fut` (delivery reports awaited since `since`; `what` names them for the
    /// logs); see [`StallWatch`]. Cancel-safe: `fut` is borrowed, and may be awaited again.
    pub async fn watch<F: Future + Unpin>(
        &self,
        what: &str,
        since: tokio::time::Instant,
        fut: &mut F,
    ) -> Result<F::Output, KafkaStepError> {
        if self.args.is_none() {
            return Ok(fut.await);
        }
        let mut deadline = since + self.after;
        loop {
            if let Ok(out) = tokio::time::timeout_at(deadline, &mut *fut).await {
                return Ok(out);
            }
            self.ask(what, since).await?;
            deadline = tokio::time::Instant::now() + self.after;
        }
    }

    /// Asks the brokers, as [`StallWatch::watch`] does, when reports for `what` have
    /// been awaited since `since` for the timeout or longer; does nothing before that.
    /// Returns when they do not answer (Kafka down: keep waiting).
    pub async fn check(
        &self,
        what: &str,
        since: tokio::time::Instant,
    ) -> Result<(), KafkaStepError> {
        if self.args.is_none() || since.elapsed() < self.after {
            return Ok(());
        }
        self.ask(what, since).await
    }

    /// The stall timeout (`--kafka-stall-timeout`).
    pub fn after(&self) -> Duration {
        self.after
    }

    /// Asks a new client whether this process's consumer (`client.id`
    /// [`member_client_id`]) looks stuck outside `group`; call it when the consumer has had
    /// no partition for a while. librdkafka consumers were seen to lose their session while
    /// a broker did not answer and never get back in, although the coordinator counted
    /// them as members with partitions, or had no member left. `Ok(true)`: the brokers
    /// answer and the group is empty, or stable without this consumer, with partitions
    /// assigned to it, or with no partition assigned to anyone. `Ok(false)`: a
    /// member without partitions (more instances than partitions), a group in a
    /// rebalance, or Kafka not answering (logged).
    pub async fn outside_group(&self, group: &str) -> Result<bool, KafkaStepError> {
        let Some(args) = &self.args else {
            return Ok(false);
        };
        if args
            .options
            .iter()
            .any(|o| o.trim_start().starts_with("client.id="))
        {
            return Ok(false);
        }
        let me = member_client_id(group);
        match group_members(args, group).await {
            Ok((state, members)) => {
                let mine = members.iter().find(|(id, _)| *id == me).map(|(_, n)| *n);
                // Outside: a group with no member at all, a stable group without this
                // consumer, one that counts partitions for it which it does not have, or
                // one where no member has any partition (nobody consumes).
                let total: usize = members.iter().map(|(_, n)| n).sum();
                let outside = matches!(state.as_str(), "Empty" | "Dead")
                    || (state == "Stable" && (mine.is_none_or(|n| n > 0) || total == 0));
                if outside {
                    tracing::warn!(
                        %group, %state, members = members.len(), assigned_here = ?mine, assigned_in_group = total,
                        "the consumer has had no partition for a while, yet its group is \
                         empty, or stable without it, with partitions for it, or with none \
                         for anyone"
                    );
                } else if state != "Stable" {
                    tracing::info!(%group, %state, "the consumer has no partition: its group is rebalancing");
                }
                Ok(outside)
            }
            Err(why) => {
                tracing::warn!(error = %why, "checking the consumer's group: kafka does not answer");
                Ok(false)
            }
        }
    }

    async fn ask(&self, what: &str, since: tokio::time::Instant) -> Result<(), KafkaStepError> {
        let Some(args) = &self.args else {
            return Ok(());
        };
        let waited = since.elapsed();
        tracing::info!(
            waited = ?waited,
            "delivery reports of {what} awaited past --kafka-stall-timeout: asking the brokers"
        );
        let answer = brokers_answer(args).await;
        let mut silent_at = self.silent_at.lock().unwrap_or_else(|e| e.into_inner());
        match answer {
            Ok(()) if silent_at.is_some_and(|t| t.elapsed() < self.after) => {
                tracing::info!(
                    waited = ?waited,
                    "waiting for delivery reports of {what}: kafka answers again; giving the \
                     client time to reconnect"
                );
                Ok(())
            }
            Ok(()) => Err(KafkaStepError::Stalled(format!(
                "no delivery report for {what} in {:.0?}, while the brokers answer a new \
                 client; exiting so that a restart gets a fresh one (nothing of the \
                 pending batches was acknowledged)",
                waited
            ))),
            Err(why) => {
                *silent_at = Some(tokio::time::Instant::now());
                tracing::warn!(
                    waited = ?waited, error = %why,
                    "waiting for delivery reports of {what}: kafka does not answer"
                );
                Ok(())
            }
        }
    }
}

/// How long a probe's client waits for the brokers (twice that for the whole probe).
const PROBE_PATIENCE: Duration = Duration::from_secs(5);

/// Runs `ask` with a new client of `args`, on a thread of its own, and returns its answer
/// before the client is destroyed: destroying a librdkafka client can wait on its broker
/// threads, and the answer must not. `what` names the probe in its errors.
async fn probe<T: Send + 'static>(
    args: &KafkaArgs,
    what: &'static str,
    ask: impl FnOnce(&rdkafka::producer::BaseProducer) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let cfg = client_config(args).map_err(|e| e.to_string())?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("kafka-probe".into())
        .spawn(
            move || match cfg.create::<rdkafka::producer::BaseProducer>() {
                Ok(client) => {
                    let _ = tx.send(ask(&client));
                    drop(client);
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            },
        )
        .map_err(|e| format!("{what}: {e}"))?;
    match tokio::time::timeout(PROBE_PATIENCE * 2, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(format!("{what} ended without an answer")),
        Err(_) => Err(format!("{what}: no answer in {:?}", PROBE_PATIENCE * 2)),
    }
}

/// Whether a new client gets the cluster's metadata within a few seconds ([`probe`]).
async fn brokers_answer(args: &KafkaArgs) -> Result<(), String> {
    probe(args, "metadata probe", |client| {
        match client.client().fetch_metadata(None, PROBE_PATIENCE) {
            Ok(m) if !m.brokers().is_empty() => Ok(()),
            Ok(_) => Err("metadata names no broker".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// How many partitions a consumer-protocol assignment (a group member's, as the
/// coordinator holds it) names: version (i16), topics (i32 count; each a name of i16 length
/// and an i32 count of i32 partitions), user data. `None` if it does not parse.
fn assigned_partitions(bytes: &[u8]) -> Option<usize> {
    let mut at = 2usize;
    let i32_at = |at: usize| -> Option<i32> {
        Some(i32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let topics = i32_at(at)?;
    at += 4;
    let mut total = 0usize;
    for _ in 0..topics.max(0) {
        let len = i16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?);
        at += 2 + usize::try_from(len.max(0)).ok()?;
        let n = i32_at(at)?;
        at += 4 + 4 * usize::try_from(n.max(0)).ok()?;
        total += usize::try_from(n.max(0)).ok()?;
    }
    Some(total)
}

/// The state of `group` and, per member, its client id and how many partitions the
/// coordinator assigns it, asked by a new client ([`probe`]).
async fn group_members(
    args: &KafkaArgs,
    group: &str,
) -> Result<(String, Vec<(String, usize)>), String> {
    let group = group.to_owned();
    probe(args, "group probe", move |client| {
        let list = client
            .client()
            .fetch_group_list(Some(&group), PROBE_PATIENCE)
            .map_err(|e| e.to_string())?;
        let g = list
            .groups()
            .iter()
            .find(|g| g.name() == group)
            .ok_or_else(|| format!("group {group} not found"))?;
        Ok((
            g.state().to_owned(),
            g.members()
                .iter()
                .map(|m| {
                    let n = m.assignment().and_then(assigned_partitions).unwrap_or(0);
                    (m.client_id().to_owned(), n)
                })
                .collect(),
        ))
    })
    .await
}

/// Settings common to every client: the brokers, security and the user's `--kafka-option`s.
/// A setting that cannot be used (an unreadable password file, a password in an option)
/// is a [`KafkaError::ClientCreation`] whose text names the cause and no secret.
pub fn client_config(args: &KafkaArgs) -> Result<ClientConfig, KafkaError> {
    let mut cfg = ClientConfig::new();
    apply_user_settings(&mut cfg, args)?;
    Ok(cfg)
}

/// TLS and SASL settings of `args` on `cfg`. TLS verifies the broker's certificate and its
/// host name (`https` endpoint identification) against the CA file, or the system's roots
/// (`probe`: the statically linked OpenSSL knows no default location).
fn apply_security(cfg: &mut ClientConfig, args: &KafkaArgs) -> Result<(), ConfigError> {
    let tls = args.tls();
    let password = args.password()?;
    let sasl = match args.security_protocol {
        KafkaSecurity::Plaintext => {
            if tls.any() || args.username.is_some() || password.is_some() {
                return Err(ConfigError::invalid(
                    "kafka",
                    "TLS files or SASL credentials are set but the security protocol is \
                     plaintext: set KAFKA_SECURITY_PROTOCOL to ssl or sasl-ssl",
                ));
            }
            cfg.set("security.protocol", "plaintext");
            return Ok(());
        }
        KafkaSecurity::Ssl => {
            if args.username.is_some() || password.is_some() {
                return Err(ConfigError::invalid(
                    "kafka",
                    "SASL credentials are set but the security protocol is ssl: \
                     set KAFKA_SECURITY_PROTOCOL to sasl-ssl",
                ));
            }
            cfg.set("security.protocol", "ssl");
            None
        }
        KafkaSecurity::SaslSsl => {
            let (Some(user), Some(pass)) = (&args.username, password) else {
                return Err(ConfigError::invalid(
                    "kafka",
                    "sasl-ssl needs KAFKA_USERNAME and a password (KAFKA_PASSWORD or \
                     KAFKA_PASSWORD_FILE)",
                ));
            };
            cfg.set("security.protocol", "sasl_ssl");
            Some((user, pass))
        }
    };
    tls.check("kafka")?;
    cfg.set("enable.ssl.certificate.verification", "true")
        .set("ssl.endpoint.identification.algorithm", "https");
    match &tls.ca {
        Some(ca) => cfg.set("ssl.ca.location", ca.to_string_lossy()),
        None => cfg.set("ssl.ca.location", "probe"),
    };
    if let Some((cert, key)) = tls.client_pair("kafka")? {
        cfg.set("ssl.certificate.location", cert.to_string_lossy())
            .set("ssl.key.location", key.to_string_lossy());
    }
    if let Some((user, pass)) = sasl {
        cfg.set("sasl.mechanism", &args.sasl_mechanism)
            .set("sasl.username", user)
            .set("sasl.password", pass.expose());
    }
    Ok(())
}

/// Sets the brokers, security and the user's `--kafka-option`s on `cfg`; called last so
/// they win over the defaults of this module.
fn apply_user_settings(cfg: &mut ClientConfig, args: &KafkaArgs) -> Result<(), KafkaError> {
    let refuse = |e: ConfigError| KafkaError::ClientCreation(e.to_string());
    cfg.set("bootstrap.servers", &args.brokers);
    // librdkafka 2.10+ "re-bootstraps" when every broker looks down. After a restart of the
    // broker, clients were seen stuck for good in that sequence ("1/1 brokers are down"
    // while the broker answered; librdkafka #5088, #5600): the nemesis test caught a
    // consumer and a producer that never recovered. `none` keeps the pre-2.10 behaviour,
    // reconnecting to the brokers already known, which is what a broker restart needs.
    // A `--kafka-option metadata.recovery.strategy=rebootstrap` restores the default.
    cfg.set("metadata.recovery.strategy", "none");
    apply_security(cfg, args).map_err(refuse)?;
    for opt in &args.options {
        match opt.split_once('=') {
            Some((k, _)) if k.to_ascii_lowercase().contains("password") => {
                return Err(refuse(ConfigError::invalid(
                    "kafka",
                    format!(
                        "--kafka-option {} would carry a password: passwords come from \
                         KAFKA_PASSWORD or KAFKA_PASSWORD_FILE",
                        k.trim()
                    ),
                )));
            }
            Some((k, v)) => {
                cfg.set(k.trim(), v.trim());
            }
            None => tracing::warn!(option = %opt, "ignoring a kafka option that is not key=value"),
        }
    }
    Ok(())
}

/// Records the last error a client reported, for [`check`].
#[derive(Default)]
struct LastError(std::sync::Mutex<Option<(Option<RDKafkaErrorCode>, String)>>);

impl rdkafka::ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some((error.rdkafka_error_code(), reason.to_owned()));
        }
    }
}

impl rdkafka::producer::ProducerContext for LastError {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

impl LastError {
    fn take(&self) -> Option<(Option<RDKafkaErrorCode>, String)> {
        self.0.lock().ok().and_then(|mut l| l.take())
    }
}

/// Whether a client error is a setting that will not heal: a refused certificate or
/// handshake, failed authentication, a plaintext client at a TLS listener.
fn is_refusal(code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::InvalidArgument
        )
    ) || reason.contains("security.protocol")
        || reason.contains("SSL handshake")
        || reason.contains("SASL")
}

/// Reaches the brokers once, at start-up, so that a setting that cannot work stops the
/// worker at once with the cause (librdkafka itself would retry for ever, logging): a
/// refused certificate or host name, a wrong password, the wrong security protocol. Brokers
/// that are not reachable yet are waited for, up to `patience`, with a warning per attempt.
pub async fn check(args: &KafkaArgs, patience: Duration) -> Result<(), KafkaError> {
    let ctx = LastError::default();
    let client: rdkafka::producer::BaseProducer<LastError> =
        client_config(args)?.create_with_context(ctx)?;
    let brokers = args.brokers.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + patience;
        loop {
            let fetched = client.client().fetch_metadata(None, Duration::from_secs(2));
            // Serves the error callbacks of the attempt.
            client.poll(Duration::from_millis(100));
            let last = client.context().take();
            match (fetched, last) {
                (Ok(_), _) => return Ok(()),
                (Err(_), Some((code, reason))) if is_refusal(code, &reason) => {
                    return Err(format!(
                        "kafka: brokers {brokers} refuse this client: {reason}"
                    ))
                }
                (Err(e), last) => {
                    let why = last.map(|(_, r)| r).unwrap_or_else(|| e.to_string());
                    if std::time::Instant::now() >= deadline {
                        return Err(format!(
                            "kafka: brokers {brokers} not reachable within {patience:?}: {why}"
                        ));
                    }
                    tracing::warn!(%brokers, error = %why, "kafka not reachable yet; retrying");
                }
            }
        }
    })
    .await
    .map_err(|e| KafkaError::ClientCreation(format!("kafka check: {e}")))?;
    outcome.map_err(KafkaError::ClientCreation)
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
    cfg.set("client.id", member_client_id(group));
    apply_user_settings(&mut cfg, args)?;
    let consumer: StreamConsumer = cfg.create()?;
    consumer.subscribe(topics)?;
    Ok(consumer)
}

/// The `client.id` of this process's consumer in `group`: unique to the process, so that a
/// new client can tell whether that consumer is still a member ([`StallWatch::outside_group`]).
pub fn member_client_id(group: &str) -> String {
    static TAG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("{}-{nanos:x}", std::process::id())
    });
    format!("{group}.{}", *TAG)
}

/// An idempotent producer (`acks=all`, no duplicates or reordering from its own retries).
pub fn producer(args: &KafkaArgs) -> Result<FutureProducer, KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        // Batches are compressed (LZ4, the cheapest codec to run): the broker appends,
        // checksums and serves a quarter of the bytes (stock.deduct: 25 bytes a record
        // instead of 109 of key and value), which saves more than the compressing costs
        // (issue 12, docs/perf/issue12-session16.txt: Kafka 6.9 -> 5.9 us/order, the
        // pipeline 64.3 -> 61.1, workers unchanged, medians of 6 alternating runs). A
        // `--kafka-option compression.type=none` turns it off.
        .set("compression.type", "lz4")
        // Never give up on a message: a delivery that failed after a timeout may still have
        // been written, and re-sending it later could reorder an order's events. With
        // idempotence, librdkafka retries in order until the broker has it; what fails
        // still is permanent (and stops the worker).
        .set("message.timeout.ms", "0");
    apply_user_settings(&mut cfg, args)?;
    cfg.create()
}

/// Creates `topics` with `partitions` partitions each and the brokers' default replication
/// factor (`default.replication.factor`: 1 on one broker, 3 on the cluster layout),
/// ignoring those that exist already.
pub async fn create_topics(
    args: &KafkaArgs,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    create_topics_with(args, topics, partitions, &[]).await
}

/// [`create_topics`] with topic-level settings (`retention.ms`, `segment.ms`, ...) given
/// to each new topic; a topic that exists already keeps its own.
pub async fn create_topics_with(
    args: &KafkaArgs,
    topics: &[&str],
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(args)?.create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            config.iter().fold(
                NewTopic::new(t, partitions, TopicReplication::Fixed(-1)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
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

/// A message to publish, owned so that it can be re-sent after a failed delivery.
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// A dead letter: when it is too large to be sent whole, it is sent cut to fit
    /// ([`OutMessage::truncated`]) rather than retried for ever.
    dead_letter: bool,
}

/// Header of a dead letter sent cut: `true`.
pub const DLQ_TRUNCATED: &str = "dlq.truncated";
/// Header of a dead letter sent cut: the original payload's size in bytes (decimal).
pub const DLQ_ORIGINAL_SIZE: &str = "dlq.original.size";
/// Header of a dead letter sent cut: the SHA-256 of the original payload (lowercase hex).
pub const DLQ_ORIGINAL_SHA256: &str = "dlq.original.sha256";
/// Header of a dead letter whose key had to be cut too: the original key's size.
pub const DLQ_ORIGINAL_KEY_SIZE: &str = "dlq.original.key.size";
/// Longest key a cut dead letter keeps (a readable order id is at most 1,024 bytes).
const DLQ_MAX_KEY: usize = 1024;
/// What librdkafka adds to key, value and headers when it checks a record against
/// `message.max.bytes` (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`, 36 bytes), with room to spare.
const RECORD_OVERHEAD: usize = 64;
/// Per header: its two length varints, at most 5 bytes each.
const HEADER_OVERHEAD: usize = 10;
/// librdkafka's default `message.max.bytes`, for a client whose setting cannot be read.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

impl OutMessage {
    /// Ready-made bytes keyed by `key`, without headers.
    pub fn keyed(topic: &str, key: String, payload: Vec<u8>) -> Self {
        OutMessage {
            topic: topic.to_owned(),
            key: key.into_bytes(),
            payload,
            headers: Vec::new(),
            dead_letter: false,
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
    ///
    /// A message that fitted its own topic may not fit the dead-letter topic once the
    /// headers are added (the client's `message.max.bytes`), or at all (a smaller
    /// `max.message.bytes` on the dead-letter topic). Publishing then sends it cut to fit
    /// ([`OutMessage::truncated`]): it is still dead-lettered, with its origin, and the
    /// worker goes on.
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
            dead_letter: true,
        }
    }

    /// Whether this is a dead letter (which may be sent cut to fit).
    pub fn is_dead_letter(&self) -> bool {
        self.dead_letter
    }

    /// This dead letter with its payload cut to at most `max_payload` bytes (and its key
    /// to [`DLQ_MAX_KEY`]), marked [`DLQ_TRUNCATED`], with the original payload's size and
    /// SHA-256 in headers, so that an operator knows what is missing and can match it
    /// against the source message (whose origin headers are kept).
    pub fn truncated(&self, max_payload: usize) -> OutMessage {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&self.payload);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let mut headers = self.headers.clone();
        headers.push((DLQ_TRUNCATED, b"true".to_vec()));
        headers.push((
            DLQ_ORIGINAL_SIZE,
            self.payload.len().to_string().into_bytes(),
        ));
        headers.push((DLQ_ORIGINAL_SHA256, hex.into_bytes()));
        if self.key.len() > DLQ_MAX_KEY {
            headers.push((
                DLQ_ORIGINAL_KEY_SIZE,
                self.key.len().to_string().into_bytes(),
            ));
        }
        OutMessage {
            topic: self.topic.clone(),
            key: self.key[..self.key.len().min(DLQ_MAX_KEY)].to_vec(),
            payload: self.payload[..self.payload.len().min(max_payload)].to_vec(),
            headers,
            dead_letter: true,
        }
    }

    /// The most payload a cut copy of this dead letter can carry within a client's
    /// `message.max.bytes`: what librdkafka counts of a record is its key, value,
    /// serialized headers and a fixed framing.
    fn payload_budget(&self, max_message_bytes: usize) -> usize {
        let frame = self.truncated(0);
        let headers: usize = frame
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD)
            .sum();
        max_message_bytes.saturating_sub(RECORD_OVERHEAD + frame.key.len() + headers)
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
/// A dead letter too large to be sent whole is sent cut to fit instead ([`enqueue`]).
/// Returns only when all are acknowledged, on shutdown ([`KafkaStepError::Interrupted`]),
/// on a fatal producer error, or when `stall` finds the client stalled.
pub async fn publish_all(
    producer: &FutureProducer,
    msgs: &[OutMessage],
    stall: &StallWatch,
    shutdown: &CancellationToken,
) -> Result<(), KafkaStepError> {
    let mut pending: Vec<usize> = (0..msgs.len()).collect();
    let mut delay = Duration::from_millis(100);
    loop {
        let mut futures: Vec<(usize, Delivery)> = Vec::with_capacity(pending.len());
        for &i in &pending {
            futures.push((i, enqueue(producer, &msgs[i], shutdown).await?));
        }
        let mut failed = Vec::new();
        let since = tokio::time::Instant::now();
        for (i, mut fut) in futures {
            match stall.watch("published messages", since, &mut fut).await? {
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
) -> Result<Vec<Delivery>, KafkaStepError> {
    let mut futures = Vec::with_capacity(msgs.len());
    for m in msgs {
        futures.push(enqueue(producer, m, shutdown).await?);
    }
    Ok(futures)
}

/// The delivery report of one enqueued message: what `DeliveryFuture` resolves to. For a
/// dead letter it resolves only after the copy actually written (whole or cut to fit) has
/// its report: a dead letter the broker refuses as too large (`MessageSizeTooLarge`,
/// `MessageBatchTooLarge`, e.g. a dead-letter topic with a smaller `max.message.bytes`) is
/// sent again with half the payload, and so on down to none, each retry logged; the
/// broker's limit is not known to the client, and at most about 20 halvings reach an
/// empty payload. Dead letters sharing a refused record batch are all cut, even one that
/// alone would have fitted; each still says how large it was.
pub struct Delivery(DeliveryKind);

enum DeliveryKind {
    Plain(DeliveryFuture),
    DeadLetter(futures::future::BoxFuture<'static, Result<OwnedDeliveryResult, Canceled>>),
}

impl Future for Delivery {
    type Output = Result<OwnedDeliveryResult, Canceled>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            DeliveryKind::Plain(f) => Pin::new(f).poll(cx),
            DeliveryKind::DeadLetter(f) => f.as_mut().poll(cx),
        }
    }
}

/// Why one message could not be put in the queue.
enum EnqueueError {
    /// The client refuses it as larger than its `message.max.bytes`: permanent.
    TooLarge,
    Step(KafkaStepError),
}

/// Whether a delivery error says the message (or its batch) is too large for the broker.
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}

/// Puts one message in the producer's queue, waiting while the queue is full. A dead
/// letter larger than the client's `message.max.bytes` is cut to fit it; any other message
/// that large is a fatal error (retrying could not help).
async fn enqueue(
    producer: &FutureProducer,
    msg: &OutMessage,
    shutdown: &CancellationToken,
) -> Result<Delivery, KafkaStepError> {
    if !msg.dead_letter {
        return match send(producer, msg, shutdown).await {
            Ok(f) => Ok(Delivery(DeliveryKind::Plain(f))),
            Err(EnqueueError::TooLarge) => Err(KafkaStepError::Fatal(format!(
                "a {}-byte message for {} is over the client's message.max.bytes",
                msg.payload.len(),
                msg.topic
            ))),
            Err(EnqueueError::Step(e)) => Err(e),
        };
    }
    let (first, sent) = send_dead_letter(producer, msg, None, shutdown).await?;
    let producer = producer.clone();
    let letter = msg.clone();
    let shutdown = shutdown.clone();
    Ok(Delivery(DeliveryKind::DeadLetter(Box::pin(async move {
        let mut pending = first;
        let mut sent = sent;
        loop {
            match pending.await? {
                Err((e, m)) if too_large(&e) && sent > 0 => {
                    let max = sent / 2;
                    tracing::warn!(
                        topic = %letter.topic,
                        original_bytes = letter.payload.len(),
                        refused_bytes = sent,
                        retry_bytes = max,
                        error = %e,
                        "dead letter refused by the broker as too large; sending it cut"
                    );
                    match send_dead_letter(&producer, &letter, Some(max), &shutdown).await {
                        Ok((f, n)) => {
                            pending = f;
                            sent = n;
                        }
                        // Shutdown or a fatal error: report the refusal; nothing of this
                        // batch is stored, so it is read again after a restart.
                        Err(_) => return Ok(Err((e, m))),
                    }
                }
                report => return Ok(report),
            }
        }
    }))))
}

/// Sends `letter` whole (`max_payload` None) or cut to `max_payload` bytes; if the client
/// refuses it as too large, cut to what its `message.max.bytes` leaves for the payload,
/// then halved until it fits. Returns the delivery future and the payload bytes sent.
async fn send_dead_letter(
    producer: &FutureProducer,
    letter: &OutMessage,
    max_payload: Option<usize>,
    shutdown: &CancellationToken,
) -> Result<(DeliveryFuture, usize), KafkaStepError> {
    let mut max_payload = max_payload;
    loop {
        let cut;
        let attempt = match max_payload {
            None => letter,
            Some(max) => {
                cut = letter.truncated(max);
                &cut
            }
        };
        match send(producer, attempt, shutdown).await {
            Ok(f) => return Ok((f, attempt.payload.len())),
            Err(EnqueueError::Step(e)) => return Err(e),
            Err(EnqueueError::TooLarge) => {
                let next = match max_payload {
                    None => {
                        let limit =
                            max_message_bytes(producer).unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
                        letter.payload_budget(limit)
                    }
                    Some(0) => {
                        return Err(KafkaStepError::Fatal(format!(
                            "a dead letter for {} is over the client's message.max.bytes even without its payload",
                            letter.topic
                        )))
                    }
                    Some(max) => max / 2,
                };
                tracing::warn!(
                    topic = %letter.topic,
                    original_bytes = letter.payload.len(),
                    retry_bytes = next,
                    "dead letter over the client's message.max.bytes; sending it cut"
                );
                max_payload = Some(next);
            }
        }
    }
}

/// Puts one message in the producer's queue, waiting while the queue is full and retrying
/// transient refusals every 200 ms until shutdown.
async fn send(
    producer: &FutureProducer,
    msg: &OutMessage,
    shutdown: &CancellationToken,
) -> Result<DeliveryFuture, EnqueueError> {
    loop {
        match producer.send_result(msg.record()) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                if shutdown.is_cancelled() && producer.in_flight_count() == 0 {
                    return Err(EnqueueError::Step(KafkaStepError::Interrupted));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                return Err(EnqueueError::TooLarge)
            }
            Err((e, _)) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    return Err(EnqueueError::Step(KafkaStepError::Fatal(format!(
                        "{code:?}: {reason}"
                    ))));
                }
                tracing::warn!(topic = %msg.topic, error = %e, "cannot enqueue message; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(EnqueueError::Step(KafkaStepError::Interrupted)),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

/// The effective `message.max.bytes` of `producer`: the user's setting or librdkafka's
/// default, read back from the live client (rdkafka keeps no copy of the settings a
/// client was built from, and `--kafka-option` may have changed it).
fn max_message_bytes(producer: &FutureProducer) -> Option<usize> {
    use rdkafka::bindings::{rd_kafka_conf, rd_kafka_conf_get};
    use rdkafka::types::RDKafkaConfRes;
    let mut buf = [0 as std::ffi::c_char; 32];
    let mut len = buf.len();
    // SAFETY: `native_ptr` is the live rd_kafka_t of `producer`, borrowed for this call;
    // `rd_kafka_conf` returns that instance's own configuration (valid while it lives, never
    // freed by the caller); `rd_kafka_conf_get` writes at most `len` bytes, NUL-terminated,
    // into `buf`, and takes a NUL-terminated name.
    let res = unsafe {
        let conf = rd_kafka_conf(producer.client().native_ptr());
        if conf.is_null() {
            return None;
        }
        rd_kafka_conf_get(
            conf,
            c"message.max.bytes".as_ptr(),
            buf.as_mut_ptr(),
            &mut len,
        )
    };
    if res != RDKafkaConfRes::RD_KAFKA_CONF_OK {
        return None;
    }
    let text: String = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    text.trim().parse().ok()
}

/// Waits for the producer's queue to drain, for shutdown.
pub fn flush(producer: &FutureProducer) {
    if let Err(e) = producer.flush(Duration::from_secs(10)) {
        tracing::warn!(error = %e, "producer flush did not finish");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    fn source(payload: Vec<u8>, key: Vec<u8>) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload),
            Some(key),
            "orders".into(),
            Timestamp::NotAvailable,
            3,
            17,
            None,
        )
    }

    fn header<'a>(m: &'a OutMessage, key: &str) -> Option<&'a [u8]> {
        m.headers
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| &v[..])
    }

    #[test]
    fn a_cut_dead_letter_says_what_is_missing() {
        let dl = OutMessage::dead_letter(
            "dlq",
            &source(b"abcdef".to_vec(), b"k".to_vec()),
            "bad",
            "producer",
        );
        assert!(dl.is_dead_letter());
        assert!(!OutMessage::keyed("t", "k".into(), vec![]).is_dead_letter());
        assert_eq!(header(&dl, DLQ_TRUNCATED), None);
        let cut = dl.truncated(4);
        assert!(cut.is_dead_letter());
        assert_eq!(cut.payload, b"abcd");
        assert_eq!(cut.key, b"k");
        assert_eq!(header(&cut, DLQ_TRUNCATED), Some(&b"true"[..]));
        assert_eq!(header(&cut, DLQ_ORIGINAL_SIZE), Some(&b"6"[..]));
        // sha256("abcdef")
        assert_eq!(
            header(&cut, DLQ_ORIGINAL_SHA256),
            Some(&b"bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721"[..])
        );
        assert_eq!(header(&cut, "dlq.source.topic"), Some(&b"orders"[..]));
        assert_eq!(header(&cut, "dlq.source.partition"), Some(&b"3"[..]));
        assert_eq!(header(&cut, "dlq.source.offset"), Some(&b"17"[..]));
        assert_eq!(header(&cut, DLQ_ORIGINAL_KEY_SIZE), None);
        assert_eq!(dl.truncated(100).payload, b"abcdef");
    }

    #[test]
    fn a_huge_key_is_cut_too() {
        let dl = OutMessage::dead_letter(
            "dlq",
            &source(vec![1; 10], vec![b'k'; 5000]),
            "bad",
            "consumer",
        );
        let cut = dl.truncated(0);
        assert_eq!(cut.key.len(), DLQ_MAX_KEY);
        assert_eq!(header(&cut, DLQ_ORIGINAL_KEY_SIZE), Some(&b"5000"[..]));
    }

    #[test]
    fn the_payload_budget_leaves_room_for_key_and_headers() {
        let dl = OutMessage::dead_letter(
            "dlq",
            &source(vec![7; 2_000_000], b"key".to_vec()),
            "not JSON",
            "producer",
        );
        let budget = dl.payload_budget(1_000_000);
        let cut = dl.truncated(budget);
        let headers: usize = cut.headers.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        // librdkafka's own count: framing of at most 36 bytes, key, value, headers.
        assert!(36 + cut.key.len() + cut.payload.len() + headers <= 1_000_000);
        assert!(budget > 999_000, "{budget}");
        assert_eq!(dl.payload_budget(100), 0);
    }

    #[test]
    fn a_member_assignment_is_counted() {
        // version 1; 2 topics: "ab" [0, 3], "c" []; no user data.
        let mut b = vec![0, 1, 0, 0, 0, 2, 0, 2, b'a', b'b', 0, 0, 0, 2];
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 3]);
        b.extend_from_slice(&[0, 1, b'c', 0, 0, 0, 0, 255, 255, 255, 255]);
        assert_eq!(assigned_partitions(&b), Some(2));
        assert_eq!(assigned_partitions(&[0, 1, 0, 0, 0, 0]), Some(0));
        assert_eq!(assigned_partitions(&[0, 1, 0, 0, 0, 1, 0]), None);
    }

    #[test]
    fn the_client_limit_is_read_from_the_live_client() {
        let args = KafkaArgs::plaintext("127.0.0.1:1");
        let p = producer(&args).expect("producer");
        assert_eq!(max_message_bytes(&p), Some(1_000_000));
        let args = KafkaArgs {
            options: vec!["message.max.bytes=123456".into()],
            ..args
        };
        let p = producer(&args).expect("producer");
        assert_eq!(max_message_bytes(&p), Some(123_456));
    }
}
