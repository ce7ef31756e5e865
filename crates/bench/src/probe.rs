//! Looking at the pipeline from Kafka's side: how many messages a topic holds (its high
//! watermarks) and how far a group has committed. Used to tell when a stage has finished
//! and when the pipeline is idle. The calls are blocking broker round trips, so they run
//! under `block_in_place`.

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;
use stock_common::config::KafkaArgs;
use tokio::time::Instant;

const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for watermarks and (optionally) one group's committed offsets.
pub struct Probe {
    consumer: BaseConsumer,
    partitions: i32,
}

impl Probe {
    /// A probe of topics with `partitions` partitions; with `group`, it can read that
    /// group's commits (it never joins the group).
    pub fn new(kafka: &KafkaArgs, group: Option<&str>, partitions: i32) -> Result<Self> {
        let mut cfg = stock_common::kafka::client_config(kafka).context("kafka settings")?;
        if let Some(g) = group {
            cfg.set("group.id", g).set("enable.auto.commit", "false");
        }
        let consumer: BaseConsumer = cfg.create().context("kafka probe client")?;
        Ok(Probe {
            consumer,
            partitions,
        })
    }

    /// Whether consumer group `group` is `Stable` with exactly `members` members (every
    /// member joined and the partitions are assigned; no rebalance under way).
    pub fn group_stable(&self, group: &str, members: usize) -> Result<bool> {
        tokio::task::block_in_place(|| {
            let list = self
                .consumer
                .fetch_group_list(Some(group), BROKER_TIMEOUT)
                .with_context(|| format!("describing group {group}"))?;
            Ok(list.groups().iter().any(|g| {
                g.name() == group && g.state() == "Stable" && g.members().len() == members
            }))
        })
    }

    /// Messages ever written to `topic` (sum of high watermarks).
    pub fn written(&self, topic: &str) -> Result<i64> {
        tokio::task::block_in_place(|| {
            let mut total = 0;
            for p in 0..self.partitions {
                let (_, high) = self
                    .consumer
                    .fetch_watermarks(topic, p, BROKER_TIMEOUT)
                    .with_context(|| format!("watermarks of {topic}/{p}"))?;
                total += high;
            }
            Ok(total)
        })
    }

    /// Offsets the probe's group committed on `topic`, summed over partitions.
    pub fn committed(&self, topic: &str) -> Result<i64> {
        tokio::task::block_in_place(|| {
            let mut tpl = TopicPartitionList::new();
            for p in 0..self.partitions {
                tpl.add_partition(topic, p);
            }
            let committed = self
                .consumer
                .committed_offsets(tpl, BROKER_TIMEOUT)
                .with_context(|| format!("committed offsets on {topic}"))?;
            Ok(committed
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                })
                .sum())
        })
    }

    /// Whether the group committed everything written to `topic`.
    pub fn caught_up(&self, topic: &str) -> Result<bool> {
        Ok(self.committed(topic)? >= self.written(topic)?)
    }
}

/// Polls `check` every `every` until it holds (true) or `timeout` passes (false).
pub async fn poll_until<F>(every: Duration, timeout: Duration, mut check: F) -> Result<bool>
where
    F: FnMut() -> Result<bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(every).await;
    }
}
