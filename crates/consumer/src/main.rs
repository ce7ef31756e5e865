use stock_consumer::{worker::Worker, ConsumerArgs};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: ConsumerArgs = stock_common::config::parse();
    stock_common::telemetry::init(args.log.format);
    // Armed from FAILPOINTS only in test builds (feature `failpoints`); nothing otherwise.
    let _failpoints = stock_common::failpoint::setup();
    let shutdown = stock_common::shutdown::on_signals();
    let worker = Worker::new(&args).await?;
    worker.run(shutdown).await
}
