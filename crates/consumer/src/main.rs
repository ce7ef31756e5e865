use stock_consumer::{worker::Worker, ConsumerArgs};

// mimalloc: a fifth of a worker's CPU went to glibc's malloc and free, one small
// allocation per field of every message (docs/perf/issue12-profile.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One thread: the worker's tasks wait on Kafka, Redis and PostgreSQL in turn, and a
// second scheduler thread only added wake-ups and hand-offs (-8% CPU per order at
// 12,000 orders/s). librdkafka keeps its own threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: ConsumerArgs = stock_common::config::parse();
    stock_common::telemetry::init(args.log.format);
    // Armed from FAILPOINTS only in test builds (feature `failpoints`); nothing otherwise.
    let _failpoints = stock_common::failpoint::setup();
    let shutdown = stock_common::shutdown::on_signals();
    let worker = Worker::new(&args).await?;
    worker.run(shutdown).await
}
