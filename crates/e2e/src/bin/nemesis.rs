//! `nemesis`: the fault-injection run of the pipeline against whatever stack the
//! environment points at (`KAFKA_BROKERS`, `DATABASE_URL`, `REDIS_URL`, and for service
//! restarts `STACK_DIR`, `PGPORT_STACK`, `REDIS_PORT`, `KAFKA_PORT`,
//! `KAFKA_CONTROLLER_PORT`). Prints the summary; exits 1 when a guarantee was broken, 2
//! when the run could not be carried out.
//!
//! ```sh
//! cargo build --release --bins
//! cargo run --release -p stock-e2e --bin nemesis -- --orders 100000 --faults 24
//! ```

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use stock_common::config::parse_duration;
use stock_e2e::nemesis::{self, faults::FaultKind, NemesisConfig};

#[derive(Parser, Debug)]
#[command(
    name = "nemesis",
    about = "Fault-injection run of the stock pipeline: workload + kill -9, SIGSTOP, Kafka/PostgreSQL/Redis restarts, Redis loss; checks the six guarantees"
)]
struct Args {
    /// Valid orders (invalid ones, orders for a missing product and junk come on top)
    /// [default: 100000; 10000 with --reduced].
    #[arg(long)]
    orders: Option<usize>,
    /// Faults to inject: every kind once first, then at random [default: 24; 6 with
    /// --reduced].
    #[arg(long)]
    faults: Option<usize>,
    /// Seed of the workload and of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Reservation TTL of the consumers [default: 4s].
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Expiry sweep interval of the consumers [default: 500ms].
    #[arg(long, value_parser = parse_duration)]
    expiry_interval: Option<Duration>,
    /// Tail products; product 1 is the hot SKU [default: 200; 100 with --reduced].
    #[arg(long)]
    products: Option<usize>,
    /// Share of orders that include the hot SKU [default: 0.3].
    #[arg(long)]
    hot_share: Option<f64>,
    /// Stock of the hot SKU as a share of its demand [default: 0.15].
    #[arg(long)]
    hot_stock_share: Option<f64>,
    /// Customers the orders are drawn from (a fifth of them send four fifths of the
    /// orders); 0: no customer_id [default: 2000].
    #[arg(long)]
    customers: Option<usize>,
    /// Per-customer limit of the hot SKU, set before the workers start, or `none`
    /// [default: 2].
    #[arg(long)]
    hot_limit: Option<String>,
    /// Over how long the orders are spread [default: 12 s per fault, at least 20 s; 60 s
    /// with --reduced].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Fault kinds to draw from, comma separated: kill-9, pause, kafka-restart,
    /// postgres-restart, redis-restart, redis-flush, kafka-broker-kill (with
    /// --kafka-cluster) [default: all; with --kafka-cluster: kill-9, pause,
    /// kafka-broker-kill, postgres-restart, redis-flush].
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// How long a restarted service stays down; Redis stays empty for 0.3 s to this long
    /// before the rebuild [default: 3s; 2s with --reduced].
    #[arg(long, value_parser = parse_duration)]
    outage: Option<Duration>,
    /// How long a paused worker stays stopped; keep it above the 10 s session timeout
    /// [default: 13s; 12s with --reduced].
    #[arg(long, value_parser = parse_duration)]
    pause: Option<Duration>,
    /// How long to wait for the pipeline to become idle after the faults [default: 300s].
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Directory of stack-up.sh / stack-down.sh [default: the repository's deploy/].
    #[arg(long)]
    deploy_dir: Option<PathBuf>,
    /// Start from the settings of the test suite's reduced run (crates/e2e/tests/nemesis.rs).
    #[arg(long)]
    reduced: bool,
    /// Keep the run's database (t_<run id>) even when the run passes; it is always kept
    /// when a guarantee was broken.
    #[arg(long)]
    keep: bool,
    /// Run over the cluster layout's three Kafka brokers (`STACK_LAYOUT=cluster bash
    /// deploy/stack-up.sh`; 12 partitions), with the plaintext layout's PostgreSQL and Redis.
    #[arg(long)]
    kafka_cluster: bool,
    /// Run over the whole cluster layout: three Kafka brokers and the Redis Cluster (3
    /// masters, 3 replicas), with Redis master kills, live reshards and a master emptied
    /// among the faults.
    #[arg(long, conflicts_with = "kafka_cluster")]
    cluster: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Progress of the run; the clients' own complaints while Kafka is down are expected.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,stock_e2e=info,rdkafka=off,librdkafka=off")
    });
    // Colours only on a terminal: the log is often redirected to a file.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let mut cfg = if args.reduced {
        NemesisConfig::reduced(args.seed)
    } else {
        NemesisConfig::full(args.seed)
    };
    cfg.orders = args.orders.unwrap_or(cfg.orders);
    cfg.faults = args.faults.unwrap_or(cfg.faults);
    cfg.ttl = args.ttl.unwrap_or(cfg.ttl);
    cfg.expiry_interval = args.expiry_interval.unwrap_or(cfg.expiry_interval);
    cfg.products = args.products.unwrap_or(cfg.products).max(1);
    cfg.hot_share = args.hot_share.unwrap_or(cfg.hot_share);
    cfg.hot_stock_share = args.hot_stock_share.unwrap_or(cfg.hot_stock_share);
    cfg.duration = args.duration.or(cfg.duration);
    cfg.customers = args.customers.unwrap_or(cfg.customers);
    match args.hot_limit.as_deref() {
        None => {}
        Some("none") => cfg.hot_limit = None,
        Some(n) => match n.parse::<i64>() {
            Ok(n) if n >= 0 => cfg.hot_limit = Some(n),
            _ => {
                eprintln!("nemesis: --hot-limit {n:?}: a number >= 0, or none");
                return ExitCode::from(2);
            }
        },
    }
    cfg.outage = args.outage.unwrap_or(cfg.outage);
    cfg.pause = args.pause.unwrap_or(cfg.pause);
    cfg.idle_timeout = args.idle_timeout.unwrap_or(cfg.idle_timeout);
    cfg.keep = args.keep;
    if args.kafka_cluster {
        cfg.kafka_cluster = true;
        cfg.kinds = FaultKind::CLUSTER_KAFKA.to_vec();
    }
    if args.cluster {
        cfg.redis_cluster = true;
        cfg.kinds = FaultKind::CLUSTER.to_vec();
    }
    if let Some(d) = args.deploy_dir {
        cfg.deploy_dir = d;
    }
    if !args.kinds.is_empty() {
        let mut kinds = Vec::new();
        for k in &args.kinds {
            match FaultKind::parse(k) {
                Some(kind) => kinds.push(kind),
                None => {
                    eprintln!("nemesis: unknown fault kind {k:?}");
                    return ExitCode::from(2);
                }
            }
        }
        cfg.kinds = kinds;
    }
    match nemesis::run(&cfg).await {
        Ok(report) => {
            println!("{report}");
            if let Some(path) = args.json {
                let written = serde_json::to_vec_pretty(&report)
                    .map_err(|e| e.to_string())
                    .and_then(|b| std::fs::write(&path, b).map_err(|e| e.to_string()));
                if let Err(e) = written {
                    eprintln!("nemesis: cannot write {}: {e}", path.display());
                }
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("nemesis: the run could not be carried out: {e:#}");
            ExitCode::from(2)
        }
    }
}
