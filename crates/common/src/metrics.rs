//! Prometheus metrics and the health endpoints every worker serves on `--metrics-addr`:
//! `/metrics`, `/healthz` (the process answers) and `/readyz` (its dependencies do: the
//! producer is not ready while Redis is unreachable or not loaded, the consumer while
//! PostgreSQL is unreachable).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Where to serve metrics: `--metrics-addr HOST:PORT`, or `off`.
#[derive(clap::Args, Clone, Debug)]
pub struct MetricsArgs {
    /// Address of `/metrics`, `/healthz` and `/readyz` (`off` to disable). Default: the
    /// producer 127.0.0.1:9464, the consumer 127.0.0.1:9465.
    #[arg(long = "metrics-addr", env = "METRICS_ADDR")]
    pub addr: Option<String>,
}

/// Every metric of one worker; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Results published, by `status` and `reason` (`-` when none).
    pub outcomes: IntCounterVec,
    /// Messages per batch.
    pub batch_size: Histogram,
    /// Seconds per PostgreSQL batch transaction (consumer) — including retries' last try.
    pub apply_seconds: Histogram,
    /// Seconds per Redis script pipeline (producer).
    pub redis_seconds: Histogram,
    /// Messages behind the end of each input topic, summed over assigned partitions.
    pub lag: IntGaugeVec,
    /// Compensations, by `stage`: `issued` (consumer) or `restored` (producer).
    pub compensations: IntCounterVec,
    /// Messages sent to the dead-letter topic.
    pub dead_letters: IntCounter,
    /// Retries, by `cause` (`redis`, `redis_unloaded`, `database`, `kafka`, `conflict`).
    pub retries: IntCounterVec,
    /// Reservations released by the expiry sweeper.
    pub expired: IntCounter,
    /// Orders dead-lettered because a stock key they need does not hold an integer, by
    /// `key` (producer): those products stop selling, the others go on.
    pub corrupt_stock: IntCounterVec,
    /// Batches whose database step failed and is being retried, by `cause` (`transient`,
    /// `permanent`): a decided order is never dropped, the consumer stalls and says why.
    pub stalled: IntCounterVec,
    /// Producer batches on a Redis Cluster published before every master's replica
    /// confirmed their writes (`WAIT` timed out: a replica down or far behind).
    pub unreplicated: IntCounter,
    /// Producer messages waiting for a Redis Cluster slot that lost its data (orders and
    /// compensations that touch it, and the later events of those orders).
    pub waiting: prometheus::IntGauge,
    /// The producer's view of Redis memory: used over budget on the fullest node.
    pub redis_memory_ratio: prometheus::Gauge,
    /// The producer's memory guard: 0 normal, 1 shorter order memory, 2 shedding load.
    pub redis_memory_pressure: prometheus::IntGauge,
}

impl Metrics {
    /// A fresh registry; every metric is labelled with `worker`.
    pub fn new(worker: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(
            Some("stockpipe".into()),
            Some([("worker".to_owned(), worker.to_owned())].into()),
        )?;
        let outcomes = IntCounterVec::new(
            Opts::new("outcomes_total", "Results published"),
            &["status", "reason"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("batch_size", "Messages per batch").buckets(vec![
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0,
            ]),
        )?;
        let latency = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]))
        };
        let apply_seconds = latency("apply_seconds", "PostgreSQL batch transaction time")?;
        let redis_seconds = latency("redis_script_seconds", "Redis script pipeline time")?;
        let lag = IntGaugeVec::new(
            Opts::new("consumer_lag", "Messages behind the end of the topic"),
            &["topic"],
        )?;
        let compensations = IntCounterVec::new(
            Opts::new("compensations_total", "Compensations"),
            &["stage"],
        )?;
        let dead_letters = IntCounter::new("dead_letters_total", "Messages dead-lettered")?;
        let retries = IntCounterVec::new(Opts::new("retries_total", "Retried steps"), &["cause"])?;
        let expired = IntCounter::new(
            "reservations_expired_total",
            "Reservations released by expiry",
        )?;
        let corrupt_stock = IntCounterVec::new(
            Opts::new(
                "corrupt_stock_orders_total",
                "Orders dead-lettered because a stock key does not hold an integer",
            ),
            &["key"],
        )?;
        let stalled = IntCounterVec::new(
            Opts::new(
                "database_failures_total",
                "Failed attempts to apply a batch, retried without dropping anything",
            ),
            &["cause"],
        )?;
        let unreplicated = IntCounter::new(
            "redis_unreplicated_batches_total",
            "Batches published before every Redis master's replica confirmed their writes",
        )?;
        let waiting = prometheus::IntGauge::new(
            "redis_waiting_messages",
            "Messages waiting for a Redis Cluster slot to be rebuilt while the others go on",
        )?;
        let redis_memory_ratio = prometheus::Gauge::new(
            "redis_memory_ratio",
            "Redis used memory over its budget, on the fullest node (producer)",
        )?;
        let redis_memory_pressure = prometheus::IntGauge::new(
            "redis_memory_pressure",
            "The producer's memory guard: 0 normal, 1 shorter order memory, 2 shedding load",
        )?;
        for c in [
            Box::new(outcomes.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(redis_memory_ratio.clone()),
            Box::new(redis_memory_pressure.clone()),
            Box::new(unreplicated.clone()),
            Box::new(waiting.clone()),
            Box::new(batch_size.clone()),
            Box::new(apply_seconds.clone()),
            Box::new(redis_seconds.clone()),
            Box::new(lag.clone()),
            Box::new(compensations.clone()),
            Box::new(dead_letters.clone()),
            Box::new(retries.clone()),
            Box::new(expired.clone()),
            Box::new(corrupt_stock.clone()),
            Box::new(stalled.clone()),
        ] {
            registry.register(c)?;
        }
        // Known label values start at zero, so dashboards see them before the first event.
        for cause in [
            "redis",
            "redis_unloaded",
            "redis_memory",
            "database",
            "conflict",
        ] {
            retries.with_label_values(&[cause]);
        }
        for stage in ["issued", "restored"] {
            compensations.with_label_values(&[stage]);
        }
        Ok(Metrics {
            registry,
            outcomes,
            batch_size,
            apply_seconds,
            redis_seconds,
            lag,
            compensations,
            dead_letters,
            retries,
            expired,
            corrupt_stock,
            stalled,
            unreplicated,
            waiting,
            redis_memory_ratio,
            redis_memory_pressure,
        })
    }

    /// Counts one published result.
    pub fn outcome(&self, r: &crate::events::StockResult) {
        let status = serde_json::to_value(r.status).ok();
        let status = status.as_ref().and_then(|v| v.as_str()).unwrap_or("?");
        let reason = r.reason.map_or("-", |x| x.as_str());
        self.outcomes.with_label_values(&[status, reason]).inc();
    }

    /// Counts what one batch publishes: its results, its dead letters, and its
    /// compensations at `stage` (`issued` by the consumer, `restored` by the producer).
    pub fn batch_published<'a>(
        &self,
        results: impl IntoIterator<Item = &'a crate::events::StockResult>,
        dead_letters: usize,
        stage: &str,
        compensations: usize,
    ) {
        for r in results {
            self.outcome(r);
        }
        self.dead_letters.inc_by(dead_letters as u64);
        self.compensations
            .with_label_values(&[stage])
            .inc_by(compensations as u64);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Answers `Ok` when the worker's dependencies are usable, or why not.
pub type ReadinessCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    ready: ReadinessCheck,
}

/// Serves the endpoints on `addr` until `shutdown`. `addr` of `off` serves nothing. A port
/// that cannot be bound is logged, and the worker runs on without endpoints.
pub async fn serve(
    addr: &str,
    metrics: Metrics,
    ready: ReadinessCheck,
    shutdown: CancellationToken,
) {
    if addr == "off" {
        return;
    }
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve metrics and health");
            return;
        }
    };
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                match tokio::time::timeout(std::time::Duration::from_secs(2), (s.ready)()).await {
                    Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
                    Ok(Err(why)) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                    Err(_) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: check timed out\n".to_owned(),
                    ),
                }
            }),
        )
        .with_state(AppState { metrics, ready });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "metrics server stopped");
    }
}

/// Sets the `consumer_lag` gauge for each subscribed topic from the consumer's positions and
/// the brokers' high watermarks (a blocking call, so run on the blocking pool).
pub async fn update_lag(consumer: Arc<rdkafka::consumer::StreamConsumer>, metrics: Metrics) {
    use rdkafka::consumer::Consumer;
    let res = tokio::task::spawn_blocking(move || {
        let Ok(positions) = consumer.position() else {
            return;
        };
        let mut by_topic: std::collections::BTreeMap<String, i64> = Default::default();
        for e in positions.elements() {
            let Ok((_, high)) = consumer.fetch_watermarks(
                e.topic(),
                e.partition(),
                std::time::Duration::from_secs(2),
            ) else {
                continue;
            };
            let pos = match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => continue,
            };
            *by_topic.entry(e.topic().to_owned()).or_default() += (high - pos).max(0);
        }
        for (topic, lag) in by_topic {
            metrics.lag.with_label_values(&[topic.as_str()]).set(lag);
        }
    })
    .await;
    if let Err(e) = res {
        tracing::debug!(error = %e, "lag update task failed");
    }
}

/// Updates the lag gauge every 5 s until `shutdown`.
pub async fn lag_loop(
    consumer: Arc<rdkafka::consumer::StreamConsumer>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
        update_lag(consumer.clone(), metrics.clone()).await;
    }
}

/// Starts the endpoints and the lag updates as background tasks for the life of
/// `shutdown`. `default_addr` applies when `--metrics-addr` is not given.
pub fn spawn(
    args: &MetricsArgs,
    default_addr: &str,
    metrics: &Metrics,
    consumer: Arc<rdkafka::consumer::StreamConsumer>,
    ready: ReadinessCheck,
    shutdown: &CancellationToken,
) {
    let addr = args.addr.clone().unwrap_or_else(|| default_addr.to_owned());
    tokio::spawn(serve_owned(addr, metrics.clone(), ready, shutdown.clone()));
    tokio::spawn(lag_loop(consumer, metrics.clone(), shutdown.clone()));
}

async fn serve_owned(
    addr: String,
    metrics: Metrics,
    ready: ReadinessCheck,
    shutdown: CancellationToken,
) {
    serve(&addr, metrics, ready, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Reason, StockResult};

    #[test]
    fn renders_labelled_metrics() {
        let m = Metrics::new("producer").expect("metrics");
        m.outcome(&StockResult::rejected(
            "a",
            Reason::InsufficientStock,
            Some(1),
        ));
        m.outcome(&StockResult::reserved("b"));
        m.dead_letters.inc();
        let text = m.render();
        assert!(text.contains(r#"stockpipe_outcomes_total{reason="insufficient_stock",status="rejected",worker="producer"} 1"#), "{text}");
        assert!(text.contains(
            r#"stockpipe_outcomes_total{reason="-",status="reserved",worker="producer"} 1"#
        ));
        assert!(text.contains(r#"stockpipe_dead_letters_total{worker="producer"} 1"#));
    }
}
