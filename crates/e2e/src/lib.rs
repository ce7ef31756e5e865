//! Test support: one isolated environment per test on the real local stack (its own
//! PostgreSQL database, Redis database, topics and consumer groups), workers run in this
//! process or as child processes, and readers for the output topics.
//!
//! Reaches the stack through the environment `deploy/env.sh` exports
//! ([`stock_devkit::stack`]; defaults: the plaintext layout of `deploy/stack-up.sh`), or
//! the secure layout's file ([`TestEnv::secure`]). The worker binaries for the process tests are looked up next
//! to the test executable's directory (`target/<profile>/`), so build them first
//! (`cargo build --bins`, as the test command does). Worker settings, in this process or
//! as flags of a child process, come from [`stock_devkit::worker_args`]: the binaries' own
//! definitions and defaults, with each test's changes as flags.

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use redis::AsyncCommands;
use sqlx::PgPool;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use stock_common::config::{DatabaseArgs, KafkaArgs, RedisArgs, Topics};
use stock_common::events::Item;
use stock_common::redis_store::{
    stock_key, OrderRecord, RedisStore, ReserveOutcome, ReserveRequest, EPOCH_KEY,
};
use stockctl::admin;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use stock_devkit::harness;
pub use stock_devkit::stack::Stack;
use stock_devkit::stack::{with_database, with_redis_db};
pub use stock_devkit::worker_args::{Wiring, Worker, WorkerFlags};

pub mod nemesis;

/// A Redis database of its own for one test on a single Redis: the workers' settings and
/// the administrator's store, emptied.
async fn redis_database(stack: &Stack) -> (RedisArgs, RedisStore) {
    let base = stock_common::redis_store::client(&stack.redis_admin).expect("REDIS_URL");
    let mut conn = stock_common::redis_store::raw_connection(&base)
        .await
        .expect("connect to Redis");
    let n: i64 = conn
        .incr("stockpipe:test-db-counter", 1)
        .await
        .expect("incr");
    let index = 1 + n % 1000;
    let redis = RedisArgs {
        order_memory: Duration::from_secs(86_400),
        orders_per_call: 100,
        ..with_redis_db(&stack.redis, index).expect("url")
    };
    let redis_admin = RedisArgs {
        order_memory: redis.order_memory,
        ..with_redis_db(&stack.redis_admin, index).expect("url")
    };
    let store = RedisStore::connect(&redis_admin).await.expect("redis");
    let _: () = redis::cmd("FLUSHDB")
        .query_async(&mut store.connection())
        .await
        .expect("flushdb");
    (redis, store)
}

/// A Redis Cluster has one database: a test on it empties every master and must run
/// alone (`cluster_lock`).
async fn cluster_redis(stack: &Stack) -> (RedisArgs, RedisStore) {
    let redis = RedisArgs {
        order_memory: Duration::from_secs(86_400),
        orders_per_call: 100,
        ..stack.redis.clone()
    };
    let redis_admin = RedisArgs {
        order_memory: redis.order_memory,
        ..stack.redis_admin.clone()
    };
    let store = RedisStore::connect(&redis_admin)
        .await
        .expect("redis cluster");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut store.connection())
        .await
        .expect("flushall on every master");
    // No script either: the workers' first calls meet NOSCRIPT, as after a failover.
    forget_scripts(&store).await;
    (redis, store)
}

/// Makes Redis forget every script (`SCRIPT FLUSH`, on every node of a cluster), as a
/// restart without them or a promoted replica does: the next `EVALSHA` meets NOSCRIPT.
///
/// Server-wide, not per database: every test running beside the caller on the same Redis
/// loses its scripts too, and a store loads a script again once per call. So a caller is
/// alone on its Redis: the only test of its binary (`cargo test` runs binaries one after
/// the other; `tests/forgotten_scripts.rs`), or holding [`CLUSTER_LOCK`].
pub async fn forget_scripts(store: &RedisStore) {
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut store.connection())
        .await
        .expect("SCRIPT FLUSH");
}

/// A one-item order for the store's calls.
pub fn reserve_request(order_id: &str, product_id: i64, quantity: i64) -> ReserveRequest {
    ReserveRequest {
        order_id: order_id.into(),
        items: vec![Item {
            product_id,
            quantity,
        }],
        forced: None,
        customer: None,
        replaces: None,
    }
}

/// The token of a pre-deduction and whether this call made it (`fresh`); panics on any
/// other outcome.
pub fn held_token(outcome: &ReserveOutcome) -> (String, bool) {
    match outcome {
        ReserveOutcome::Decided {
            record: OrderRecord::Held { token, .. },
            fresh,
        } => (token.clone(), *fresh),
        other => panic!("not held: {other:?}"),
    }
}

/// Held by each test that uses the Redis Cluster (one database for all), so that tests of
/// one binary take turns; `cargo test` runs binaries one after the other.
pub static CLUSTER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test's private slice of the stack.
pub struct TestEnv {
    pub id: String,
    /// The workers' Kafka settings (also the test's own readers and writers).
    pub kafka: KafkaArgs,
    pub topics: Topics,
    /// The workers' database settings (the consumer's role on the secure layout).
    pub db: DatabaseArgs,
    /// The producer's Redis settings (its least-privilege user on the secure layout).
    pub redis: RedisArgs,
    /// The administrator's pool (the migrations' role): loads, checks and reads.
    pub pool: PgPool,
    /// The administrator's Redis (`stockctl`'s user).
    pub store: RedisStore,
    pub partitions: i32,
    /// The whole stack, both sets of credentials.
    pub stack: Stack,
    db_name: String,
}

impl TestEnv {
    /// A fresh database (migrated), Redis database (flushed) and topics on the stack the
    /// environment points at (`deploy/env.sh`: the plaintext layout, or the secure one with
    /// `STACK_LAYOUT=secure`).
    pub async fn new() -> TestEnv {
        TestEnv::on(Stack::from_env().expect("stack settings from the environment")).await
    }

    /// [`TestEnv::new`] on the secure layout, whatever the environment says
    /// (`$STACK_DIR/secure/env`).
    pub async fn secure() -> TestEnv {
        TestEnv::on(Stack::secure().expect("the secure layout")).await
    }

    /// A fresh slice of `stack` with topics of 4 partitions ([`TestEnv::on_with`]).
    pub async fn on(stack: Stack) -> TestEnv {
        TestEnv::on_with(stack, 4).await
    }

    /// A fresh slice of `stack`, topics of `partitions` partitions (the brokers' default
    /// replication): created with the administrator's credentials, used by the workers with
    /// theirs (granted what they need with `db::grant`).
    pub async fn on_with(stack: Stack, partitions: i32) -> TestEnv {
        init_logging();
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        tracing::info!(
            id,
            layout = stack.layout,
            kafka = stack.kafka.brokers,
            redis = %stack.redis.url,
            database = %stack.db.url,
            "test environment"
        );
        let topics = Topics::prefixed(&format!("t-{id}."));
        stock_common::kafka::create_topics(&stack.kafka_admin, &topics.all(), partitions)
            .await
            .expect("create topics (is the stack up? deploy/stack-up.sh)");

        let db_name = format!("t_{id}");
        let pool = create_database(&stack, &db_name).await;
        stock_common::db::migrate(&pool).await.expect("migrate");
        if let (true, Some(role)) = (stack.has_worker_roles(), stack.worker_db_role()) {
            stock_common::db::grant(&pool, &role)
                .await
                .expect("grant the workers' role");
        }
        let db = with_database(&stack.db, &db_name).expect("url");

        let (redis, store) = if stack.redis_is_cluster() {
            cluster_redis(&stack).await
        } else {
            redis_database(&stack).await
        };

        TestEnv {
            id,
            kafka: stack.kafka.clone(),
            topics,
            db,
            redis,
            pool,
            store,
            partitions,
            stack,
            db_name,
        }
    }

    /// Loads stock into PostgreSQL and Redis and marks Redis loaded.
    pub async fn load_stock(&self, stock: &[(i64, i64)]) {
        for &(p, n) in stock {
            admin::set_stock(&self.pool, &self.store, p, n, false)
                .await
                .expect("set stock");
        }
        stockctl::rebuild::rebuild(&self.pool, &self.store)
            .await
            .expect("rebuild");
    }

    /// Overwrites `stock:{p}` in Redis only (to set up a drift).
    pub async fn set_redis_stock(&self, product: i64, value: i64) {
        let _: () = redis::pipe()
            .atomic()
            .set(stock_key(product), value)
            .ignore()
            .incr(EPOCH_KEY, 1)
            .ignore()
            .query_async(&mut self.store.connection())
            .await
            .expect("set");
    }

    pub async fn redis_stock(&self, product: i64) -> Option<i64> {
        self.store.stock_levels(&[product]).await.expect("mget")[0]
    }

    pub async fn stock_row(&self, product: i64) -> admin::StockRow {
        admin::stock_rows(&self.pool, &[product])
            .await
            .expect("stock row")[0]
    }

    /// Every order of `ids` has one distinct outcome in `outcomes`, and the ledger holds one
    /// reservation per order reported reserved (none lost, none repeated); returns how many
    /// were reserved.
    pub async fn assert_one_outcome_each<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a String>,
        outcomes: &harness::Outcomes,
    ) -> usize {
        let bad = harness::conflicting(outcomes);
        assert!(
            bad.is_empty(),
            "orders with two outcomes: {:?}",
            &bad[..bad.len().min(5)]
        );
        let reserved = ids
            .into_iter()
            .filter(|id| {
                outcomes[*id]
                    .iter()
                    .any(|r| r.status == stock_common::events::Status::Reserved)
            })
            .count();
        let ledger_reserved: i64 =
            sqlx::query_scalar("SELECT count(*) FROM order_ledger WHERE status = 'reserved'")
                .fetch_one(&self.pool)
                .await
                .expect("count");
        assert_eq!(
            reserved as i64, ledger_reserved,
            "every reserved result is one reservation in PostgreSQL"
        );
        reserved
    }

    /// Guarantees 1 and 3 for `products`; panics with the violations.
    pub async fn assert_invariants(&self, products: &[i64]) {
        let v = admin::check_invariants(&self.pool, &self.store, products)
            .await
            .expect("check");
        assert!(v.is_empty(), "invariant violations: {v:?}");
    }

    /// Guarantee 2 in the history: per product and kind, the `stock_movement` rows sum
    /// exactly the ledger's orders (each reserved order once in `reserve`, each settled one
    /// once in its settlement); panics with the disagreements
    /// ([`nemesis::check::history_disagreements`]).
    pub async fn assert_history_matches_ledger(&self) {
        let (ledger, movements) = nemesis::read_ledger_and_history(&self.pool)
            .await
            .expect("read the ledger and the history");
        let v = nemesis::check::history_disagreements(&movements, &ledger);
        assert!(v.is_empty(), "the history disagrees with the ledger: {v:?}");
    }

    /// Where this test's workers connect.
    pub fn wiring(&self) -> Wiring<'_> {
        Wiring {
            kafka: &self.kafka,
            topics: &self.topics,
            redis: &self.redis,
            db: &self.db,
        }
    }

    /// The settings of `worker` in group `t-<id>-<group>`, as flags: the binary's defaults
    /// ([`stock_devkit::worker_args`]) with batches of 500; add a test's own with
    /// [`WorkerFlags::set`].
    pub fn worker_flags(&self, worker: Worker, group: &str) -> WorkerFlags {
        WorkerFlags::new(worker, self.wiring(), &format!("t-{}-{group}", self.id))
            .set("--batch-size", 500)
    }

    /// The flags of the worker binary `name` (`producer`, `consumer`) in group `name`, for
    /// [`WorkerProcess::spawn`].
    pub fn process_flags(&self, name: &str) -> WorkerFlags {
        self.worker_flags(name.parse().expect("a worker binary"), name)
    }

    /// The producer's settings in group `group` ([`TestEnv::worker_flags`]).
    pub fn producer_args(&self, group: &str) -> stock_producer::ProducerArgs {
        self.producer_args_with(group, &[])
    }

    /// [`TestEnv::producer_args`] with `overrides` (flag, value), e.g. `("--order-memory", "2s")`.
    pub fn producer_args_with(
        &self,
        group: &str,
        overrides: &[(&str, &str)],
    ) -> stock_producer::ProducerArgs {
        overrides
            .iter()
            .fold(self.worker_flags(Worker::Producer, group), |f, (k, v)| {
                f.set(k, v)
            })
            .producer()
            .expect("producer flags")
    }

    /// The consumer's settings in group `group` ([`TestEnv::worker_flags`]).
    pub fn consumer_args(&self, group: &str) -> stock_consumer::ConsumerArgs {
        self.consumer_args_with(group, &[])
    }

    /// [`TestEnv::consumer_args`] with `overrides` (flag, value).
    pub fn consumer_args_with(
        &self,
        group: &str,
        overrides: &[(&str, &str)],
    ) -> stock_consumer::ConsumerArgs {
        overrides
            .iter()
            .fold(self.worker_flags(Worker::Consumer, group), |f, (k, v)| {
                f.set(k, v)
            })
            .consumer()
            .expect("consumer flags")
    }

    /// Both workers in this process, with the default groups.
    pub async fn start_workers(&self) -> Workers {
        Workers::start(self, "producer", "consumer").await
    }

    /// Publishes raw `(key, payload)` messages to the orders topic.
    pub async fn send_orders(&self, msgs: Vec<(String, Vec<u8>)>) {
        let producer = stock_common::kafka::producer(&self.kafka).expect("producer");
        harness::publish(&producer, &self.topics.orders, msgs)
            .await
            .expect("publish");
    }

    /// `stockctl <args>` run as a process against this test's database, Redis (or Redis
    /// Cluster) and brokers, with `failpoints` armed: how it ended, and its stdout and
    /// stderr.
    pub async fn stockctl(
        &self,
        args: &[&str],
        failpoints: &str,
    ) -> (std::process::ExitStatus, String) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let redis = if self.redis.cluster_nodes.is_empty() {
            ("REDIS_URL".to_owned(), self.redis.url.expose().to_owned())
        } else {
            (
                "REDIS_CLUSTER_NODES".to_owned(),
                self.redis.cluster_nodes.join(","),
            )
        };
        let vars: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), self.db.url.expose().to_owned()),
            redis,
            ("KAFKA_BROKERS".into(), self.kafka.brokers.clone()),
            ("RUST_LOG".into(), "info".into()),
            ("FAILPOINTS".into(), failpoints.into()),
        ];
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary("stockctl"))
                .args(args)
                .env_remove("REDIS_URL")
                .env_remove("REDIS_CLUSTER_NODES")
                .envs(vars)
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run stockctl")
        })
        .await
        .expect("join");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    pub fn collector(&self) -> harness::ResultCollector {
        harness::ResultCollector::start(&self.kafka, &self.topics.results).expect("collector")
    }

    /// Drops the test database (topics and the Redis database are left; Redis databases
    /// are flushed when reused).
    pub async fn cleanup(self) {
        if let Err(e) =
            stock_devkit::topics::delete_topics(&self.stack.kafka_admin, &self.topics.all()).await
        {
            eprintln!("could not delete the test's topics: {e}");
        }
        self.pool.close().await;
        let _ = drop_database(&self.stack, &self.db_name).await;
    }
}

/// Creates the empty database `name` on `stack` (no migrations) and returns a pool on it
/// with the administrator's credentials.
pub async fn create_database(stack: &Stack, name: &str) -> PgPool {
    let admin_pool = stock_common::db::pool(&stack.db_admin).expect("admin pool");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin_pool)
        .await
        .expect("create test database (is the stack up? deploy/stack-up.sh)");
    admin_pool.close().await;
    let db_admin = with_database(&stack.db_admin, name).expect("admin url");
    stock_common::db::pool(&db_admin).expect("pool")
}

/// Drops the database `name` of `stack`, closing whatever is still connected to it.
pub async fn drop_database(stack: &Stack, name: &str) -> Result<(), sqlx::Error> {
    let admin_pool = stock_common::db::pool(&stack.db_admin)?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin_pool)
        .await?;
    admin_pool.close().await;
    Ok(())
}

/// Both workers running as tasks of the test process.
pub struct Workers {
    shutdown: CancellationToken,
    producer: JoinHandle<anyhow::Result<()>>,
    consumer: JoinHandle<anyhow::Result<()>>,
}

impl Workers {
    pub async fn start(env: &TestEnv, producer_group: &str, consumer_group: &str) -> Workers {
        Workers::start_with(
            &env.producer_args(producer_group),
            &env.consumer_args(consumer_group),
        )
        .await
    }

    /// Both workers with the given settings.
    pub async fn start_with(
        pargs: &stock_producer::ProducerArgs,
        cargs: &stock_consumer::ConsumerArgs,
    ) -> Workers {
        let shutdown = CancellationToken::new();
        let p = stock_producer::worker::Worker::new(pargs)
            .await
            .expect("producer");
        let c = stock_consumer::worker::Worker::new(cargs)
            .await
            .expect("consumer");
        Workers {
            producer: tokio::spawn(p.run(shutdown.clone())),
            consumer: tokio::spawn(c.run(shutdown.clone())),
            shutdown,
        }
    }

    /// Cooperative shutdown; panics if a worker failed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.producer
            .await
            .expect("join")
            .expect("producer ran cleanly");
        self.consumer
            .await
            .expect("join")
            .expect("consumer ran cleanly");
    }
}

/// A worker binary running as a child process.
pub struct WorkerProcess {
    child: Child,
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// `target/<profile>/<name>`, found from the test executable's location.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --bins` first",
        path.display()
    );
    path
}

impl WorkerProcess {
    /// The worker binary of `flags` with those flags (and no environment variable its
    /// settings read), `RUST_LOG=info`, `RUST_LIB_BACKTRACE=0`, and `env` (e.g. `FAILPOINTS`).
    pub fn spawn(flags: &WorkerFlags, env: &[(&str, &str)]) -> WorkerProcess {
        let name = flags.worker().binary();
        let log = std::env::temp_dir().join(format!(
            "stockpipe-test-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = flags
            .command(&binary(name))
            .expect("worker flags")
            .env("RUST_LOG", "info")
            // No backtrace in a worker's error (anyhow captures one when RUST_BACKTRACE is
            // set, as on the CI machine): printing it symbolizes the debug binary, which
            // took over 20 s on a loaded box after the refused worker had named its error
            // (a_wrong_ca_stops_each_worker_at_once_naming_the_service, session 27's CI).
            // A panic keeps its backtrace (RUST_BACKTRACE).
            .env("RUST_LIB_BACKTRACE", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn worker");
        tracing::info!(name, pid = child.id(), log = %log.display(), "worker process started");
        WorkerProcess {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// `kill -9`.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited successfully.
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `topic` from the beginning until `n` messages arrived or `timeout`.
pub async fn read_topic(
    kafka: &KafkaArgs,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let group = format!("reader-{}", uuid::Uuid::new_v4());
    let consumer: StreamConsumer =
        stock_common::kafka::consumer(kafka, &group, &[topic]).expect("reader");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => tracing::warn!(error = %e, "reader"),
            Err(_) => break,
        }
    }
    out
}

/// A header's value as text.
pub fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
}

/// Commits offset 0 for every partition of `topics` in `group` (whose members must be
/// stopped): the next member replays from the earliest retained offset.
pub fn reset_group_to_earliest(kafka: &KafkaArgs, group: &str, topics: &[&str], partitions: i32) {
    let mut cfg = stock_common::kafka::client_config(kafka).expect("kafka settings");
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: StreamConsumer = cfg.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            tpl.add_partition_offset(t, p, Offset::Offset(0))
                .expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("commit offsets");
}

/// The committed offsets of `group` on `topic`, summed over partitions. Asked again for up
/// to 30 s while Kafka answers with an error: right after a broker is lost, the group's
/// coordinator moves and the question meets `NotCoordinator` or a coordinator still
/// loading (a CI run of `kafka_cluster.rs` failed on one such answer).
pub fn committed_total(kafka: &KafkaArgs, group: &str, topic: &str) -> i64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match stock_devkit::topics::committed_offsets(kafka, group, topic) {
            Ok(offsets) => return offsets.iter().sum(),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "committed offsets not answered yet; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("committed offsets of {group} on {topic}: {e}"),
        }
    }
}

/// Test logging (captured by the test runner); colours only when stdout is a terminal.
fn init_logging() {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,stock_e2e=info")),
        )
        .with_test_writer()
        .try_init();
}

/// The sum over partitions of `topic`'s high watermarks (messages ever written).
pub fn end_offsets_total(kafka: &KafkaArgs, topic: &str) -> i64 {
    stock_devkit::topics::end_offsets(kafka, topic)
        .expect("watermarks")
        .iter()
        .sum()
}

impl TestEnv {
    /// Waits until the pipeline is idle: every expiry release announced (the sweeper's
    /// outbox is empty), then the producer group (`t-<id>-<producer_group>`) has committed
    /// everything on the orders and compensate topics, and the consumer group everything on
    /// the deduct topic. The outbox is read first, so that an announcement made before it
    /// emptied is among the offsets waited for. Returns whether that happened within 90 s.
    pub async fn wait_idle(&self, producer_group: &str, consumer_group: &str) -> bool {
        let pg = format!("t-{}-{producer_group}", self.id);
        let cg = format!("t-{}-{consumer_group}", self.id);
        let caught_up = |group: &str, topic: &str| {
            committed_total(&self.kafka, group, topic) >= end_offsets_total(&self.kafka, topic)
        };
        wait_until(|| async {
            let unannounced: i64 =
                sqlx::query_scalar("SELECT count(*) FROM order_ledger WHERE NOT announced")
                    .fetch_one(&self.pool)
                    .await
                    .unwrap_or(1);
            unannounced == 0
                && caught_up(&pg, &self.topics.orders)
                && caught_up(&cg, &self.topics.deduct)
                && caught_up(&pg, &self.topics.compensate)
        })
        .await
    }
}

/// Polls `check` every 100 ms until it holds or 90 s pass; returns whether it held.
pub async fn wait_until<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A plain HTTP/1.1 GET on 127.0.0.1: (status code, body), or None if nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// Sets `key=value` on `topic` (e.g. `max.message.bytes`, to make a topic accept larger or
/// smaller messages than the broker's default). Replaces the topic's other overrides,
/// which test topics do not have.
pub async fn set_topic_config(kafka: &KafkaArgs, topic: &str, settings: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = stock_common::kafka::client_config(kafka)
        .and_then(|c| c.create())
        .expect("admin client");
    let mut change = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (k, v) in settings {
        change = change.set(k, v);
    }
    for r in admin
        .alter_configs(&[change], &AdminOptions::new())
        .await
        .expect("alter configs")
    {
        r.unwrap_or_else(|e| panic!("cannot set {settings:?} on {topic}: {e:?}"));
    }
}

/// The SHA-256 of `bytes` in lowercase hex, computed by the system's `sha256sum`, so that
/// a test checks the pipeline's digests against an implementation it does not share.
pub fn sha256sum(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

impl WorkerProcess {
    /// Waits up to `timeout` (polling, without blocking the runtime) for the process to exit
    /// by itself; returns how it exited, or `None` if it is still running.
    pub async fn exit_status(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the process wrote to stdout and stderr so far (empty if unreadable).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
