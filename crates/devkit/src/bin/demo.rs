//! The demo (`bash deploy/demo.sh`): both workers in this process fed by a demo load of
//! order events on topics of their own, ending with a summary and the invariants checked.
//! Exit status: 0 every check passed; 1 a check failed; 2 error.

use clap::Parser;
use std::process::ExitCode;
use stock_common::config::{DatabaseArgs, KafkaArgs, LogArgs, RedisArgs};
use stock_devkit::demo::{self, DemoArgs};

/// Run both workers against a demo load and print a summary.
#[derive(Parser)]
#[command(name = "demo", version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    demo: DemoArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    stock_common::telemetry::init(cli.log.format);
    match demo::run(&cli.kafka, &cli.db, &cli.redis, &cli.demo).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
