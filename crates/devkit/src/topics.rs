//! Kafka helpers of tests and benchmarks: deleting a run's topics, and reading topics,
//! watermarks and committed offsets from outside the pipeline. The workers never need
//! them.

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;
use stock_common::config::KafkaArgs;
use stock_common::kafka::client_config;

/// Deletes `topics` (those already gone are fine). For tests and benchmarks, which
/// create topics of their own: left behind, thousands of them make a broker restart take
/// minutes.
pub async fn delete_topics(args: &KafkaArgs, topics: &[&str]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(args)?.create()?;
    for r in admin.delete_topics(topics, &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// How many partitions `topic` has.
pub fn partition_count(args: &KafkaArgs, topic: &str) -> Result<i32, KafkaError> {
    let consumer: StreamConsumer = client_config(args)?.create()?;
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
    let consumer: StreamConsumer = client_config(args)?.create()?;
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
    let mut cfg = client_config(args)?;
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
    let mut cfg = client_config(args)?;
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
