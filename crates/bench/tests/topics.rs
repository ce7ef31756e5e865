//! The bench's topics on the real broker (`deploy/stack-up.sh`; `KAFKA_BROKERS`): with a
//! retention (`bench soak --topic-retention`), each of the five topics keeps that long of
//! messages and rolls its segments every half of it; without one, they keep the broker's
//! default. Read back from the broker with DescribeConfigs.

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use std::time::Duration;
use stock_bench::env::{BenchTopics, Stack};
use stock_common::config::KafkaArgs;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    stack: Stack,
}

/// `retention.ms` and `segment.ms` of each of `topics`, as the broker reports them, and
/// whether each was set on the topic itself.
async fn retention_of(kafka: &KafkaArgs, topics: &[String]) -> Vec<(String, String, bool)> {
    let admin: AdminClient<DefaultClientContext> = stock_common::kafka::client_config(kafka)
        .and_then(|c| c.create())
        .expect("admin client");
    let specs: Vec<ResourceSpecifier> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let described = admin
        .describe_configs(&specs, &AdminOptions::new())
        .await
        .expect("describe configs");
    described
        .into_iter()
        .map(|r| {
            let r = r.expect("a topic's configs");
            let value = |name: &str| {
                let e = r.get(name).unwrap_or_else(|| panic!("{name} described"));
                (
                    e.value.clone().unwrap_or_default(),
                    e.source == ConfigSource::DynamicTopic,
                )
            };
            let (retention, own) = value("retention.ms");
            let (segment, _) = value("segment.ms");
            (retention, segment, own)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soaks_topics_keep_only_their_retention() {
    let cli = Cli::try_parse_from(["topics-test"]).expect("arguments");
    let admin = cli.stack.admin().expect("admin settings");
    let id = format!("topics-{}", uuid::Uuid::new_v4().simple());

    let bounded = BenchTopics::create(&admin.kafka, &id, 2, Some(Duration::from_secs(600)))
        .await
        .expect("topics created (is the stack up? deploy/stack-up.sh)");
    let names: Vec<String> = bounded.topics.all().iter().map(|t| t.to_string()).collect();
    assert_eq!(names.len(), 5);
    let got = retention_of(&admin.kafka, &names).await;
    bounded.cleanup().await;
    for (topic, (retention, segment, own)) in names.iter().zip(&got) {
        assert_eq!(
            (retention.as_str(), segment.as_str(), *own),
            ("600000", "300000", true),
            "{topic}"
        );
    }

    let id = format!("topics-{}", uuid::Uuid::new_v4().simple());
    let default = BenchTopics::create(&admin.kafka, &id, 1, None)
        .await
        .expect("topics created");
    let names: Vec<String> = default.topics.all().iter().map(|t| t.to_string()).collect();
    let got = retention_of(&admin.kafka, &names).await;
    default.cleanup().await;
    for (topic, (retention, _, own)) in names.iter().zip(&got) {
        // deploy/kafka/server.properties: log.retention.hours=168.
        assert_eq!((retention.as_str(), *own), ("604800000", false), "{topic}");
    }
}
