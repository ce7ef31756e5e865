//! The demo (`bash deploy/demo.sh`): both workers in this process fed by a demo load of
//! order events on topics of their own, ending with a summary and the invariants checked.
//! Exit status: 0 every check passed; 1 a check failed; 2 error.

use clap::Parser;
use std::process::ExitCode;
use stock_common::config::{DatabaseArgs, KafkaArgs, LogArgs, RedisArgs};
use stock_devkit::demo::{self, DemoArgs};
use stock_devkit::stack::{self, Stack};

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
    let cli: Cli = stock_common::config::parse();
    stock_common::telemetry::init(cli.log.format);
    let get = |k: &str| std::env::var(k).ok();
    let stack = match stack::admin(&cli.kafka, &cli.redis, &cli.db, &get) {
        Ok((kafka_admin, redis_admin, db_admin)) => Stack {
            layout: get("STACK_LAYOUT").unwrap_or_else(|| "plain".into()),
            kafka: cli.kafka,
            kafka_admin,
            redis: cli.redis,
            redis_admin,
            db: cli.db,
            db_admin,
        },
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match demo::run(&stack, &cli.demo).await {
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
