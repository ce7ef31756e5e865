//! Driving the pipeline from outside, as the order service does: publish order events,
//! read `stock.results`. Used by the demo, the tests and the benchmarks.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stock_common::config::KafkaArgs;
use stock_common::events::{Item, Status, StockResult};
use stock_common::kafka::{self, KafkaStepError, OutMessage};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The JSON of an `order_created`.
pub fn created(order_id: &str, items: &[Item]) -> Vec<u8> {
    json!({"type": "order_created", "order_id": order_id, "items": items})
        .to_string()
        .into_bytes()
}

/// The JSON of an `order_created` by `customer_id` (contract "Per-customer limits").
pub fn created_by(order_id: &str, customer_id: &str, items: &[Item]) -> Vec<u8> {
    json!({"type": "order_created", "order_id": order_id, "customer_id": customer_id, "items": items})
        .to_string()
        .into_bytes()
}

/// The JSON of an `order_paid`.
pub fn paid(order_id: &str) -> Vec<u8> {
    json!({"type": "order_paid", "order_id": order_id})
        .to_string()
        .into_bytes()
}

/// The JSON of an `order_cancelled`.
pub fn cancelled(order_id: &str) -> Vec<u8> {
    json!({"type": "order_cancelled", "order_id": order_id})
        .to_string()
        .into_bytes()
}

/// Publishes `(key, payload)` pairs to `topic` and waits for every delivery.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    msgs: Vec<(String, Vec<u8>)>,
) -> Result<(), KafkaStepError> {
    let out: Vec<OutMessage> = msgs
        .into_iter()
        .map(|(key, payload)| OutMessage::keyed(topic, key, payload))
        .collect();
    for chunk in out.chunks(20_000) {
        kafka::publish_all(
            producer,
            chunk,
            &kafka::StallWatch::off(),
            &CancellationToken::new(),
        )
        .await?;
    }
    Ok(())
}

/// Every result read from `stock.results`, by order id, in arrival order.
pub type Outcomes = HashMap<String, Vec<StockResult>>;

/// Reads a results topic from the beginning in the background.
pub struct ResultCollector {
    seen: Arc<Mutex<Outcomes>>,
    unparsed: Arc<Mutex<usize>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl ResultCollector {
    /// Starts reading `topic` from its earliest offset with a group of its own.
    pub fn start(kafka_args: &KafkaArgs, topic: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let group = format!("collector-{}", uuid::Uuid::new_v4());
        let consumer: StreamConsumer = kafka::consumer(kafka_args, &group, &[topic])?;
        let seen = Arc::new(Mutex::new(Outcomes::new()));
        let unparsed = Arc::new(Mutex::new(0));
        let stop = CancellationToken::new();
        let (s, u, st) = (seen.clone(), unparsed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = st.cancelled() => break,
                    m = consumer.recv() => match m {
                        Ok(m) => match m.payload().map(serde_json::from_slice::<StockResult>) {
                            Some(Ok(r)) => s.lock().unwrap_or_else(|e| e.into_inner()).entry(r.order_id.clone()).or_default().push(r),
                            _ => *u.lock().unwrap_or_else(|e| e.into_inner()) += 1,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "result collector");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            consumer.unsubscribe();
        });
        Ok(ResultCollector {
            seen,
            unparsed,
            stop,
            task,
        })
    }

    /// A copy of everything read so far.
    pub fn snapshot(&self) -> Outcomes {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many messages were not results.
    pub fn unparsed(&self) -> usize {
        *self.unparsed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every id in `ids` has at least `per_order` results, or `timeout`.
    /// Returns whether they all arrived.
    pub async fn wait_for(
        &self,
        ids: &HashSet<String>,
        per_order: usize,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let done = {
                let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                ids.iter()
                    .all(|id| seen.get(id).is_some_and(|v| v.len() >= per_order))
            };
            if done {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the total number of results read reaches `n`, or `timeout`.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let count: usize = self
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(Vec::len)
                .sum();
            if count >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The distinct outcomes of an order's `order_created` (`reserved` or `rejected`).
pub fn created_outcomes(results: &[StockResult]) -> HashSet<&StockResult> {
    results
        .iter()
        .filter(|r| matches!(r.status, Status::Reserved | Status::Rejected))
        .collect()
}

/// Orders whose `order_created` got more than one distinct outcome: guarantee 4's
/// violations.
pub fn conflicting(outcomes: &Outcomes) -> Vec<(String, Vec<StockResult>)> {
    let mut bad: Vec<(String, Vec<StockResult>)> = outcomes
        .iter()
        .filter_map(|(id, rs)| {
            let distinct = created_outcomes(rs);
            (distinct.len() > 1).then(|| (id.clone(), distinct.into_iter().cloned().collect()))
        })
        .collect();
    bad.sort_by(|a, b| a.0.cmp(&b.0));
    bad
}
