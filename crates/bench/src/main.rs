use clap::{Parser, Subcommand};
use std::process::ExitCode;
use stock_bench::{apply, e2e, env::Stack, redis_stage, soak, survey};

/// Benchmarks of the stock pipeline against the local stack (`deploy/stack-up.sh`).
/// Logs go to stderr (`RUST_LOG`, default `warn,sqlx=error`); tables and JSON lines to stdout.
#[derive(Parser)]
#[command(name = "bench", version)]
struct Cli {
    #[command(flatten)]
    stack: Stack,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole pipeline: end-to-end and drain rates, CPU per order of each process, with
    /// checks. The workers run as processes of the `producer` and `consumer` binaries next
    /// to the bench (build them with it), or in the bench with --in-process.
    E2e(e2e::E2eArgs),
    /// The whole pipeline at a steady rate for a long time, e.g. `--duration 60m --rate
    /// 5000 --window 10m`: per window rate, p50/p99, CPU per order of each process, RSS,
    /// PostgreSQL sizes and autovacuum runs, Redis memory; first and last window compared
    /// (within ±25%); a Markdown file and an SVG chart in --out; the e2e checks at the end.
    Soak(soak::SoakArgs),
    /// PostgreSQL apply rate on one hot SKU: batched apply against per-order baselines.
    Apply(apply::ApplyArgs),
    /// The producer's Redis stage alone, against redis-benchmark on the same script.
    Redis(redis_stage::RedisStageArgs),
    /// The survey's strategies and the pipeline on one workload: its §8 table, measured.
    Survey(survey::SurveyArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // e2e and soak stop on SIGINT or SIGTERM while measuring: the worker processes are
    // killed, the run's environment removed (`workers::interrupted`).
    let outcome = match &cli.cmd {
        Cmd::E2e(args) => e2e::run(&cli.stack, args).await,
        Cmd::Apply(args) => apply::run(&cli.stack, args).await,
        Cmd::Redis(args) => redis_stage::run(&cli.stack, args).await,
        Cmd::Survey(args) => survey::run(&cli.stack, args).await,
        Cmd::Soak(args) => soak::run(&cli.stack, args).await,
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: a check failed (see the table above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error"));
    // Colours only on a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
