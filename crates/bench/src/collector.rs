//! Reads `stock.results` from its beginning in the background, like
//! `stock_devkit::harness::ResultCollector`, but also keeps when each result arrived and when
//! the last expected order got its first one: the end of an end-to-end measurement. A
//! closed-loop client can also [`Collector::watch`] one order and be woken by its result.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use stock_common::config::KafkaArgs;
use stock_common::events::StockResult;
use stock_devkit::harness::Outcomes;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct State {
    outcomes: Outcomes,
    expected: HashSet<String>,
    /// Expected orders without a result yet.
    pending: usize,
    arrivals: Vec<Instant>,
    first_at: HashMap<String, Instant>,
    all_in_at: Option<Instant>,
    unparsed: usize,
    unexpected: usize,
    /// Orders a client waits for, woken by their first result.
    watchers: HashMap<String, oneshot::Sender<StockResult>>,
}

struct Shared {
    state: Mutex<State>,
    all_in: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What was read, once the collector stopped.
pub struct Collected {
    pub outcomes: Outcomes,
    /// When each result arrived, in arrival order.
    pub arrivals: Vec<Instant>,
    /// When each expected order got its first result.
    pub first_at: HashMap<String, Instant>,
    /// When the last expected order got its first result.
    pub all_in_at: Option<Instant>,
    /// Messages that were not results.
    pub unparsed: usize,
    /// Results for orders not expected.
    pub unexpected: usize,
}

pub struct Collector {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Collector {
    /// Starts reading `topic` with a group of its own; `expected` are the orders waited for.
    pub fn start(
        kafka: &KafkaArgs,
        topic: &str,
        expected: HashSet<String>,
    ) -> anyhow::Result<Self> {
        let group = format!("bench-collector-{}", uuid::Uuid::new_v4().simple());
        let consumer: StreamConsumer = stock_common::kafka::consumer(kafka, &group, &[topic])?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: expected.len(),
                expected,
                ..State::default()
            }),
            all_in: Notify::new(),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(read(consumer, shared.clone(), stop.clone()));
        Ok(Collector { shared, stop, task })
    }

    /// Results read so far.
    pub fn received(&self) -> usize {
        self.shared.lock().arrivals.len()
    }

    /// Whether `order_id` has a result.
    pub fn has(&self, order_id: &str) -> bool {
        self.shared.lock().outcomes.contains_key(order_id)
    }

    /// The first result of `order_id`, when it arrives (at once if it has arrived). Watch
    /// before publishing the order. The order must be one of the expected ones.
    pub fn watch(&self, order_id: &str) -> oneshot::Receiver<StockResult> {
        let (tx, rx) = oneshot::channel();
        let mut s = self.shared.lock();
        match s.outcomes.get(order_id).and_then(|rs| rs.first()) {
            Some(first) => {
                // The receiver is in hand: sending cannot fail.
                let _ = tx.send(first.clone());
            }
            None => {
                s.watchers.insert(order_id.to_owned(), tx);
            }
        }
        rx
    }

    /// Waits until every expected order has a result; false on timeout.
    pub async fn wait_all(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.shared.all_in.notified();
            if self.shared.lock().pending == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.shared.lock().pending == 0;
            }
        }
    }

    /// Waits until each of `ids` has a result; false on timeout.
    pub async fn wait_for(&self, ids: &[String], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if ids.iter().all(|id| self.has(id)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Keeps reading for `grace` (to catch late duplicates), then stops.
    pub async fn finish(self, grace: Duration) -> Collected {
        tokio::time::sleep(grace).await;
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "result collector task failed");
        }
        let mut s = self.shared.lock();
        let s = std::mem::take(&mut *s);
        Collected {
            outcomes: s.outcomes,
            arrivals: s.arrivals,
            first_at: s.first_at,
            all_in_at: s.all_in_at,
            unparsed: s.unparsed,
            unexpected: s.unexpected,
        }
    }
}

/// Reads `consumer` until `stop`, handing `on_result` each message's payload parsed as a
/// [`StockResult`] (`None`: no payload), when it was received and its Kafka timestamp
/// (milliseconds since 1970, when it has one). A receive error is logged as `what` and the
/// read retried 100 ms later.
pub(crate) async fn receive_results(
    consumer: &StreamConsumer,
    stop: &CancellationToken,
    what: &str,
    mut on_result: impl FnMut(Option<serde_json::Result<StockResult>>, Instant, Option<i64>),
) {
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => break,
            m = consumer.recv() => m,
        };
        let now = Instant::now();
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "{what}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        on_result(
            m.payload().map(serde_json::from_slice::<StockResult>),
            now,
            m.timestamp().to_millis(),
        );
    }
}

async fn read(consumer: StreamConsumer, shared: Arc<Shared>, stop: CancellationToken) {
    receive_results(&consumer, &stop, "result collector", |parsed, now, _| {
        let mut s = shared.lock();
        s.arrivals.push(now);
        let Some(Ok(r)) = parsed else {
            s.unparsed += 1;
            return;
        };
        let expected = s.expected.contains(&r.order_id);
        let r_id = r.order_id.clone();
        let results = s.outcomes.entry(r.order_id.clone()).or_default();
        let first = results.is_empty();
        results.push(r.clone());
        if !expected {
            s.unexpected += 1;
        } else if first {
            if let Some(w) = s.watchers.remove(&r.order_id) {
                // A client that stopped waiting dropped its receiver: nothing to do.
                let _ = w.send(r);
            }
            s.first_at.insert(r_id, now);
            s.pending -= 1;
            if s.pending == 0 {
                s.all_in_at = Some(now);
                shared.all_in.notify_waiters();
            }
        }
    })
    .await;
    consumer.unsubscribe();
}

/// Most results that arrived within any one-second window.
pub fn peak_per_second(arrivals: &[Instant]) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..arrivals.len() {
        while arrivals[hi].duration_since(arrivals[lo]) >= Duration::from_secs(1) {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Results per whole second after `from` (the last second may be partial).
pub fn per_second(arrivals: &[Instant], from: Instant) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for a in arrivals {
        let s = a.saturating_duration_since(from).as_secs() as usize;
        if out.len() <= s {
            out.resize(s + 1, 0);
        }
        out[s] += 1;
    }
    out
}
