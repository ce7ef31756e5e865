use clap::{Parser, Subcommand};
use std::process::ExitCode;
use stock_common::config::{DatabaseArgs, KafkaArgs, LogArgs, RedisArgs, Topics};
use stock_common::redis_store::RedisStore;
use stockctl::{admin, demo};

/// Operators' tool for the stock pipeline.
#[derive(Parser)]
#[command(name = "stockctl", version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply the database migrations.
    Migrate,
    /// Create the pipeline's topics (skipping those that exist).
    CreateTopics {
        #[command(flatten)]
        topics: Topics,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Give a product exactly STOCK available units (PostgreSQL, then Redis).
    Set {
        #[arg(long)]
        product: i64,
        #[arg(long)]
        stock: i64,
        /// Overwrite even if the product has reservations or sales.
        #[arg(long)]
        force: bool,
    },
    /// Load Redis from PostgreSQL (stock and order records) and allow selling.
    Rebuild,
    /// Check that PostgreSQL and Redis agree and nothing is oversold (pipeline idle).
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Run both workers against a demo load and print a summary.
    Demo(demo::DemoArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    stock_common::telemetry::init(cli.log.format);
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    use anyhow::Context;
    let pool = || stock_common::db::pool(&cli.db);
    let redis = || async {
        RedisStore::connect(&cli.redis)
            .await
            .with_context(|| format!("connecting to {}", cli.redis.url))
    };
    match &cli.cmd {
        Cmd::Migrate => {
            stock_common::db::migrate(&pool()?)
                .await
                .with_context(|| format!("migrating {}", cli.db.url))?;
            println!("migrations applied");
        }
        Cmd::CreateTopics { topics, partitions } => {
            stock_common::kafka::create_topics(&cli.kafka, &topics.all(), *partitions).await?;
            println!("topics ready: {}", topics.all().join(", "));
        }
        Cmd::Set {
            product,
            stock,
            force,
        } => {
            let row = admin::set_stock(&pool()?, &redis().await?, *product, *stock, *force).await?;
            println!("{}", serde_json::to_string(&row)?);
        }
        Cmd::Rebuild => {
            let (p, o) = stockctl::rebuild::load_from_postgres(&pool()?, &redis().await?).await?;
            println!("redis rebuilt: {p} products, {o} orders");
        }
        Cmd::Check { json } => {
            let v = admin::check_invariants(&pool()?, &redis().await?, &[]).await?;
            if *json {
                println!("{}", serde_json::to_string(&v)?);
            } else if v.is_empty() {
                println!("ok: every product conserved, redis equals available");
            } else {
                for x in &v {
                    println!("product {}: {}", x.product_id, x.what);
                }
            }
            return Ok(v.is_empty());
        }
        Cmd::Demo(args) => return demo::run(&cli.kafka, &cli.db, &cli.redis, args).await,
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
        stock_producer::ProducerArgs::command().debug_assert();
        stock_consumer::ConsumerArgs::command().debug_assert();
    }
}
