use clap::Parser;
use stock_consumer::{worker::Worker, ConsumerArgs};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ConsumerArgs::parse();
    stock_common::telemetry::init(args.log.format);
    let shutdown = stock_common::shutdown::on_signals();
    let worker = Worker::new(&args).await?;
    worker.run(shutdown).await
}
