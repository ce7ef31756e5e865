//! Producer and consumer workers as tasks of this process, on a [`PipelineEnv`], with the
//! batch settings under test, each serving its metrics on a free local port (read by
//! [`crate::worker_metrics`]). Their other settings are the binaries' defaults, built by
//! [`stock_devkit::worker_args`] (no environment variable applies).

use crate::env::PipelineEnv;
use crate::worker_metrics::{self, Sample};
use anyhow::{anyhow, Context, Result};
use stock_common::config::BatchArgs;
use stock_consumer::ConsumerArgs;
use stock_devkit::worker_args::{self, Wiring, Worker, WorkerFlags};
use stock_producer::ProducerArgs;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Consumer-group names of a run's workers.
pub fn producer_group(env: &PipelineEnv) -> String {
    format!("bench-{}-producer", env.id)
}

pub fn consumer_group(env: &PipelineEnv) -> String {
    format!("bench-{}-consumer", env.id)
}

/// The workers' batch settings as the binaries have them by default.
pub fn default_batch() -> BatchArgs {
    worker_args::producer_defaults().batch
}

/// `worker`'s flags on this run's connections and topics, in its group, with `batch` and
/// its metrics on `metrics_addr`.
fn flags(env: &PipelineEnv, worker: Worker, batch: &BatchArgs, metrics_addr: &str) -> WorkerFlags {
    let wiring = Wiring {
        kafka: &env.kafka,
        topics: env.topics(),
        redis: &env.redis.args,
        db: &env.db.args,
    };
    let group = match worker {
        Worker::Producer => producer_group(env),
        Worker::Consumer => consumer_group(env),
    };
    WorkerFlags::new(worker, wiring, &group)
        .batch(batch)
        .set("--metrics-addr", metrics_addr)
}

/// The producer's settings: its defaults, with this run's connections, topics, group and
/// batch.
pub fn producer_args(
    env: &PipelineEnv,
    batch: &BatchArgs,
    metrics_addr: &str,
) -> Result<ProducerArgs> {
    flags(env, Worker::Producer, batch, metrics_addr)
        .producer()
        .context("producer settings")
}

/// The consumer's settings, like [`producer_args`]; the schema is already migrated.
pub fn consumer_args(
    env: &PipelineEnv,
    batch: &BatchArgs,
    metrics_addr: &str,
) -> Result<ConsumerArgs> {
    flags(env, Worker::Consumer, batch, metrics_addr)
        .consumer()
        .context("consumer settings")
}

/// Running workers; [`Workers::stop`] shuts them down cooperatively.
#[derive(Default)]
pub struct Workers {
    shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<Result<()>>)>,
    producer_metrics: Vec<String>,
    consumer_metrics: Vec<String>,
}

impl Workers {
    /// Starts `n` producer workers (one consumer group).
    pub async fn start_producers(
        &mut self,
        env: &PipelineEnv,
        batch: &BatchArgs,
        n: usize,
    ) -> Result<()> {
        for _ in 0..n {
            let addr = worker_metrics::free_addr()?;
            let args = producer_args(env, batch, &addr)?;
            self.producer_metrics.push(addr);
            let w = stock_producer::worker::Worker::new(&args)
                .await
                .context("starting a producer worker")?;
            self.tasks
                .push(("producer", tokio::spawn(w.run(self.shutdown.clone()))));
        }
        Ok(())
    }

    /// Starts `n` consumer workers (one consumer group).
    pub async fn start_consumers(
        &mut self,
        env: &PipelineEnv,
        batch: &BatchArgs,
        n: usize,
    ) -> Result<()> {
        for _ in 0..n {
            let addr = worker_metrics::free_addr()?;
            let args = consumer_args(env, batch, &addr)?;
            self.consumer_metrics.push(addr);
            let w = stock_consumer::worker::Worker::new(&args)
                .await
                .context("starting a consumer worker")?;
            self.tasks
                .push(("consumer", tokio::spawn(w.run(self.shutdown.clone()))));
        }
        Ok(())
    }

    /// The producers' metrics summed (zero before any started).
    pub async fn producer_sample(&self) -> Result<Sample> {
        worker_metrics::scrape_all(&self.producer_metrics).await
    }

    /// The consumers' metrics summed (zero before any started).
    pub async fn consumer_sample(&self) -> Result<Sample> {
        worker_metrics::scrape_all(&self.consumer_metrics).await
    }

    /// Whether a worker has stopped on its own (it failed).
    pub fn any_finished(&self) -> bool {
        self.tasks.iter().any(|(_, t)| t.is_finished())
    }

    /// Asks every worker to stop and waits; the first failure is returned.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let mut first_err = None;
        for (name, task) in self.tasks {
            let outcome = match task.await {
                Ok(r) => r.with_context(|| format!("{name} worker failed")),
                Err(e) => Err(anyhow!("{name} worker panicked: {e}")),
            };
            if let Err(e) = outcome {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
