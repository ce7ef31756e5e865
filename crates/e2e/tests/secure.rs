//! The secure layout (`STACK_LAYOUT=secure bash deploy/stack-up.sh`): TLS to every
//! service, SCRAM users on Kafka, ACL users on Redis (mutual TLS), scram roles on
//! PostgreSQL. What must be refused, how fast a worker stops on a setting that cannot work
//! (and that it names the service and the cause), that each role has least privilege, and
//! that no secret reaches a worker's output. The pipeline's own tests (hot SKU,
//! all-or-nothing, duplicates, replay, crash) run over this layout too: `deploy/test.sh`
//! runs them again with `STACK_LAYOUT=secure`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use stock_common::config::{DatabaseArgs, KafkaArgs, RedisArgs};
use stock_common::events::{Item, Status};
use stock_common::redis_store::{Guards, OrderRecord, RedisStore, ReserveRequest, Risk};
use stock_e2e::harness::created;
use stock_e2e::{
    free_port, http_get, reserve_request, Stack, TestEnv, Worker, WorkerFlags, WorkerProcess,
};
use stockctl::admin;

/// A worker must stop within this on a refused certificate or password: well before the
/// patience it gives a service that is not reachable yet (`STARTUP_PATIENCE`, 60 s), which
/// is what a refusal must not wait for. A third of it, not less: on a loaded box a Kafka
/// refusal took 9.4 s (librdkafka's reconnect backoff between the check's attempts), and
/// a limit of 10 s failed two tests (session 21's CI run) that pass in 1-4 s alone.
const FAST: Duration = Duration::from_secs(stock_common::config::STARTUP_PATIENCE.as_secs() / 3);

fn secure_stack() -> Stack {
    Stack::secure().expect("the secure layout: STACK_LAYOUT=secure bash deploy/stack-up.sh")
}

/// Every password of the layout (workers' and administrators').
fn secrets(stack: &Stack) -> Vec<String> {
    let files = [
        &stack.kafka.password_file,
        &stack.kafka_admin.password_file,
        &stack.redis.password_file,
        &stack.redis_admin.password_file,
        &stack.db.password_file,
        &stack.db_admin.password_file,
    ];
    let found: Vec<String> = files
        .iter()
        .filter_map(|f| f.as_ref())
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_else(|e| panic!("password file {f:?}: {e}"))
                .trim()
                .to_owned()
        })
        .collect();
    assert_eq!(
        found.len(),
        6,
        "every service has a password file: {stack:?}"
    );
    found
}

/// A file `deploy/stack-up.sh` wrote for the secure layout: `$STACK_DIR/secure/<path>`.
fn secure_file(path: &str) -> PathBuf {
    let dir = std::env::var("STACK_DIR").unwrap_or_else(|_| "/var/tmp/stockpipe".into());
    let p = PathBuf::from(dir).join("secure").join(path);
    assert!(p.exists(), "{p:?} (made by deploy/stack-up.sh)");
    p
}

fn other_ca() -> PathBuf {
    secure_file("tls/other-ca.crt")
}

/// A password file holding a wrong password.
fn wrong_password_file() -> (PathBuf, String) {
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    let path = std::env::temp_dir().join(format!("stockpipe-wrong-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, &wrong).expect("write the wrong password");
    (path, wrong)
}

fn assert_no_secret(text: &str, secrets: &[String], what: &str) {
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "a password appears in {what}:\n{text}"
        );
    }
}

/// Runs `flags` as a process that must stop by itself within [`FAST`], with a non-zero
/// status and an error naming `service` and one of `causes`, and no secret.
async fn refused(flags: WorkerFlags, service: &str, causes: &[&str], secrets: &[String]) {
    let started = Instant::now();
    let mut p = WorkerProcess::spawn(&flags, &[]);
    let status = p.exit_status(FAST).await;
    let log = p.log_text();
    let status = status.unwrap_or_else(|| panic!("still running after {FAST:?}:\n{log}"));
    assert!(!status.success(), "it must fail:\n{log}");
    let lower = log.to_lowercase();
    assert!(
        lower.contains(service),
        "the error names the service {service}:\n{log}"
    );
    assert!(
        causes.iter().any(|c| lower.contains(&c.to_lowercase())),
        "the error names the cause ({causes:?}):\n{log}"
    );
    assert_no_secret(&log, secrets, "a refused worker's output");
    eprintln!(
        "{} stopped in {:?}: {}",
        flags.worker().binary(),
        started.elapsed(),
        log.lines().last().unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_by_every_service() {
    let stack = secure_stack();

    // Kafka: a plaintext client at the SASL_SSL listener gets no metadata (librdkafka
    // names the likely cause, a wrong security.protocol, only on some attempts: the check
    // gives up after its patience otherwise).
    let plain = KafkaArgs::plaintext(&stack.kafka.brokers);
    let e = stock_common::kafka::check(&plain, Duration::from_secs(5))
        .await
        .expect_err("kafka refuses plaintext");
    assert!(e.to_string().contains("kafka"), "{e}");

    // Redis: no plaintext port at all, and plaintext at the TLS port is not answered.
    let mut url = url::Url::parse(stack.redis.url.expose()).expect("url");
    url.set_scheme("redis").expect("scheme");
    let plain = RedisArgs {
        url: url.as_str().parse().expect("url"),
        ca_file: None,
        cert_file: None,
        key_file: None,
        ..stack.redis.clone()
    };
    let r = tokio::time::timeout(Duration::from_secs(30), RedisStore::connect(&plain)).await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "redis must refuse a plaintext client"
    );

    // PostgreSQL: a connection without TLS is refused by pg_hba.conf.
    let mut url = url::Url::parse(stack.db.url.expose()).expect("url");
    url.set_query(Some("sslmode=disable"));
    let plain = DatabaseArgs {
        url: url.as_str().parse().expect("url"),
        ca_file: None,
        ..stack.db.clone()
    };
    let e = stock_common::db::check(&plain, Duration::from_secs(5))
        .await
        .expect_err("postgres refuses plaintext");
    let text = e.to_string();
    assert!(text.contains("postgres"), "{text}");
    assert!(
        text.contains("pg_hba.conf") || text.contains("encryption"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_stops_each_worker_at_once_naming_the_service() {
    let env = TestEnv::secure().await;
    let secrets = secrets(&env.stack);
    let ca = other_ca();
    let ca = ca.to_string_lossy();
    let tls = ["certificate", "ssl handshake", "unknownissuer"];
    refused(
        env.worker_flags(Worker::Producer, "ca-k")
            .set("--kafka-ca-file", &ca),
        "kafka",
        &tls,
        &secrets,
    )
    .await;
    refused(
        env.worker_flags(Worker::Producer, "ca-r")
            .set("--redis-ca-file", &ca),
        "redis",
        &tls,
        &secrets,
    )
    .await;
    refused(
        env.worker_flags(Worker::Consumer, "ca-p")
            .set("--database-ca-file", &ca),
        "postgres",
        &tls,
        &secrets,
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_each_worker_at_once_naming_the_service() {
    let env = TestEnv::secure().await;
    let (file, wrong) = wrong_password_file();
    let mut secrets = secrets(&env.stack);
    secrets.push(wrong);
    let file = file.to_string_lossy();
    refused(
        env.worker_flags(Worker::Producer, "pw-k")
            .set("--kafka-password-file", &file),
        "kafka",
        &["authentication failed", "invalid credentials"],
        &secrets,
    )
    .await;
    refused(
        env.worker_flags(Worker::Producer, "pw-r")
            .set("--redis-password-file", &file),
        "redis",
        &["wrongpass", "invalid username-password", "authentication"],
        &secrets,
    )
    .await;
    refused(
        env.worker_flags(Worker::Consumer, "pw-p")
            .set("--database-password-file", &file),
        "postgres",
        &["password authentication failed"],
        &secrets,
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_has_least_privilege() {
    let env = TestEnv::secure().await;

    // Redis: the producer's user reaches the project's keys and scripts only.
    let producer = stock_common::redis_store::client(&env.redis).expect("client");
    let mut conn = stock_common::redis_store::raw_connection(&producer)
        .await
        .expect("the producer's user connects");
    let ok: redis::RedisResult<()> = redis::cmd("SET")
        .arg("stock:1")
        .arg(5)
        .query_async(&mut conn)
        .await;
    ok.expect("the producer may write stock keys");
    for (cmd, args) in [
        ("SET", vec!["other:1", "1"]),
        ("GET", vec!["session:42"]),
        ("FLUSHDB", vec![]),
        ("FLUSHALL", vec![]),
        ("CONFIG", vec!["GET", "maxmemory"]),
        ("KEYS", vec!["*"]),
        ("ACL", vec!["LIST"]),
    ] {
        let r: redis::RedisResult<redis::Value> =
            redis::cmd(cmd).arg(&args).query_async(&mut conn).await;
        let e = r.expect_err(&format!("{cmd} {args:?} must be refused"));
        assert!(
            e.to_string().contains("NOPERM") || e.to_string().to_lowercase().contains("permission"),
            "{cmd}: {e}"
        );
    }

    // A client that names no user is `default`, which is off: refused every command, and
    // no password makes it `default` (which keeps every command for Redis's own AOF replay,
    // deploy/redis-users.acl).
    // Database 0: the client sends no SELECT as it connects.
    let anonymous = RedisArgs {
        username: None,
        password_file: None,
        ..stock_devkit::stack::with_redis_db(&env.redis, 0).expect("a Redis URL")
    };
    let anonymous = stock_common::redis_store::client(&anonymous).expect("client");
    let mut conn = stock_common::redis_store::raw_connection(&anonymous)
        .await
        .expect("a client with our certificate and no user connects");
    let r: redis::RedisResult<Option<String>> = redis::cmd("GET")
        .arg("stock:1")
        .query_async(&mut conn)
        .await;
    let e = r.expect_err("no user, no command");
    assert!(e.to_string().contains("NOAUTH"), "{e}");
    for password in ["", "nopass", "default"] {
        let r: redis::RedisResult<()> = redis::cmd("AUTH")
            .arg("default")
            .arg(password)
            .query_async(&mut conn)
            .await;
        let e = r.expect_err("nobody authenticates as default");
        assert!(e.to_string().contains("WRONGPASS"), "{e}");
    }

    // PostgreSQL: the consumer's role manipulates data, and changes no schema.
    let pool = stock_common::db::pool(&env.db).expect("pool");
    sqlx::query("SELECT count(*) FROM stock")
        .execute(&pool)
        .await
        .expect("the consumer reads its tables");
    sqlx::query("INSERT INTO stock (product_id, available, total_added) VALUES (777, 1, 1)")
        .execute(&pool)
        .await
        .expect("the consumer writes its tables");
    for sql in [
        "CREATE TABLE intruder (i int)",
        "DROP TABLE stock",
        "ALTER TABLE stock ADD COLUMN x int",
        "TRUNCATE stock",
        "DELETE FROM _sqlx_migrations",
        "CREATE DATABASE intruder",
    ] {
        let e = sqlx::query(sql)
            .execute(&pool)
            .await
            .expect_err(&format!("{sql} must be refused"));
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned())
            .unwrap_or_default();
        assert!(code == "42501", "{sql}: {e} (code {code})");
    }
    pool.close().await;

    // Kafka: the workers' user neither creates nor deletes topics.
    let extra = format!("t-{}.intruder", env.id);
    let e = stock_common::kafka::create_topics(&env.kafka, &[&extra], 1).await;
    assert!(e.is_err(), "the workers' Kafka user must not create topics");
    let e = stock_devkit::topics::delete_topics(&env.kafka, &[&env.topics.results]).await;
    assert!(e.is_err(), "the workers' Kafka user must not delete topics");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_over_tls_sell_and_leak_no_secret() {
    let env = TestEnv::secure().await;
    let secrets = secrets(&env.stack);
    env.load_stock(&[(42, 50)]).await;
    let collector = env.collector();
    let debug = [("RUST_LOG", "debug")];
    let (pport, cport) = (free_port(), free_port());
    let producer = WorkerProcess::spawn(
        &env.process_flags("producer")
            .set("--metrics-addr", format!("127.0.0.1:{pport}")),
        &debug,
    );
    let consumer = WorkerProcess::spawn(
        &env.process_flags("consumer")
            .set("--metrics-addr", format!("127.0.0.1:{cport}")),
        &debug,
    );
    let ids: HashSet<String> = (0..200).map(|i| format!("tls-{i}")).collect();
    let msgs = ids
        .iter()
        .map(|id| {
            let item = Item {
                product_id: 42,
                quantity: 1,
            };
            (id.clone(), created(id, &[item]))
        })
        .collect();
    env.send_orders(msgs).await;
    assert!(
        collector.wait_for(&ids, 1, Duration::from_secs(90)).await,
        "every order gets an outcome over TLS"
    );
    let outcomes = collector.snapshot();
    let reserved = ids
        .iter()
        .filter(|id| {
            outcomes
                .get(*id)
                .is_some_and(|r| r[0].status == Status::Reserved)
        })
        .count();
    assert_eq!(reserved, 50);
    let row = env.stock_row(42).await;
    assert_eq!((row.available, row.reserved), (0, 50));
    // Their endpoints answer, and show no secret either.
    for port in [pport, cport] {
        for path in ["/metrics", "/readyz", "/healthz"] {
            let (code, body) = http_get(port, path).await.expect("the worker's endpoint");
            assert_eq!(code, 200, "{path}: {body}");
            assert_no_secret(&body, &secrets, path);
        }
    }
    let (plog, clog) = (producer.log_text(), consumer.log_text());
    assert!(producer.terminate() && consumer.terminate(), "clean exits");
    assert_no_secret(&plog, &secrets, "the producer's output");
    assert_no_secret(&clog, &secrets, "the consumer's output");

    // `--help` with every password in the environment shows none of them.
    for worker in [Worker::Producer, Worker::Consumer] {
        let out = std::process::Command::new(stock_e2e::binary(worker.binary()))
            .arg("--help")
            .env("KAFKA_PASSWORD", &secrets[0])
            .env("REDIS_PASSWORD", &secrets[2])
            .env("DATABASE_PASSWORD", &secrets[4])
            .env("DATABASE_URL", format!("postgres://u:{}@h/db", secrets[4]))
            .env("REDIS_URL", format!("rediss://u:{}@h/0", secrets[2]))
            .output()
            .expect("--help");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("--kafka-password-file"), "{text}");
        assert_no_secret(&text, &secrets, "--help");
    }
    collector.stop().await;
    env.cleanup().await;
}

/// A Redis of the secure layout's own settings (its runtime configuration: TLS, the ACL
/// users of `deploy/redis-users.acl`, the AOF fsynced before each reply) on a port and in
/// a directory of its own, so that killing it disturbs no other test.
struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    /// Settings over the layout's (`--name value` pairs).
    settings: Vec<String>,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start(settings: &[&str]) -> PrivateRedis {
        let mut r = PrivateRedis {
            port: free_port(),
            dir: std::env::temp_dir().join(format!("stockpipe-redis-{}", uuid::Uuid::new_v4())),
            settings: settings.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let conf = secure_file("redis/redis.runtime.conf");
        let dir = &self.dir;
        std::fs::create_dir_all(dir).expect("a directory for the private Redis");
        let child = std::process::Command::new("redis-server")
            .arg(&conf)
            .args(["--tls-port", &self.port.to_string()])
            .arg("--dir")
            .arg(dir)
            .arg("--pidfile")
            .arg(dir.join("redis.pid"))
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(["--daemonize", "no"])
            .args(&self.settings)
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
    }

    /// `kill -9`: what it acknowledged is in its AOF (`appendfsync always`), nothing else.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// `args` (the stack's settings for a user) pointed at this server's database 0.
    fn args(&self, args: &RedisArgs) -> RedisArgs {
        let mut url = url::Url::parse(args.url.expose()).expect("a Redis URL");
        url.set_port(Some(self.port)).expect("a port");
        url.set_path("/0");
        RedisArgs {
            url: url.as_str().parse().expect("a Redis URL"),
            ..args.clone()
        }
    }

    /// A store for `args` once this server answers (after loading its AOF).
    async fn store(&self, args: &RedisArgs) -> RedisStore {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(store) = RedisStore::connect(&self.args(args)).await {
                let pong: redis::RedisResult<String> = redis::cmd("PING")
                    .query_async(&mut store.connection())
                    .await;
                if pong.is_ok() {
                    return store;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the private Redis answers within 30 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The administrator's store on this server once product 1 has `units` in the test's
    /// database and this Redis is loaded from it (`stockctl rebuild`).
    async fn loaded(&self, env: &TestEnv, units: i64) -> RedisStore {
        let admin = self.store(&env.stack.redis_admin).await;
        admin::set_stock(&env.pool, &admin, 1, units, false)
            .await
            .expect("set stock");
        stockctl::rebuild::rebuild(&env.pool, &admin)
            .await
            .expect("rebuild");
        admin
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a restart must keep: the stock level, every order's record and the key count.
async fn redis_state(
    store: &RedisStore,
    product: i64,
    ids: &[String],
) -> (Option<i64>, Vec<Option<OrderRecord>>, i64) {
    let level = store.stock_levels(&[product]).await.expect("stock")[0];
    let mut records = Vec::new();
    for id in ids {
        records.push(store.order_record(id).await.expect("record"));
    }
    let keys: i64 = redis::cmd("DBSIZE")
        .query_async(&mut store.connection())
        .await
        .expect("DBSIZE");
    (level, records, keys)
}

/// The secure layout's Redis, killed and started again, holds every decision it
/// acknowledged. The producer's scripts reach the AOF as MULTI/EXEC blocks of their
/// effects, and Redis (7.0.15 here) checks the ACL again at EXEC while it replays the AOF,
/// as the `default` user (redis/redis#14541): with `default` refused every command, it
/// dropped every script's effects since the last rewrite, so the stock came back as it was
/// before those sales and would have been sold again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_keeps_every_decision_it_acknowledged() {
    let env = TestEnv::secure().await;
    let mut server = PrivateRedis::start(&[]);
    let admin = server.loaded(&env, 100).await;

    // The producer's user decides 70 orders of 2: 50 find stock, 20 do not.
    let producer = server.store(&env.redis).await;
    let ids: Vec<String> = (0..70).map(|i| format!("restart-{i}")).collect();
    let reqs: Vec<ReserveRequest> = ids.iter().map(|id| reserve_request(id, 1, 2)).collect();
    producer
        .reserve_many(&reqs[..50], &Guards::default())
        .await
        .expect("reserve");
    producer
        .reserve_many(&reqs[50..], &Guards::default())
        .await
        .expect("reserve");
    let before = redis_state(&admin, 1, &ids).await;
    assert_eq!(before.0, Some(0), "70 orders of 2 against 100: 50 held");
    assert!(
        before.1.iter().all(Option::is_some),
        "every order remembered"
    );

    server.kill();
    server.spawn();
    let admin = server.store(&env.stack.redis_admin).await;
    let after = redis_state(&admin, 1, &ids).await;
    let log = server.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("NOPERM")).collect();
    let kept = before
        .1
        .iter()
        .zip(&after.1)
        .filter(|(b, a)| b == a)
        .count();
    assert!(
        after == before,
        "the restarted Redis lost acknowledged writes: stock {:?} (was {:?}), {kept} of {} \
         order records kept, {} keys (were {}); {} commands refused in its AOF replay: {:?}",
        after.0,
        before.0,
        ids.len(),
        after.2,
        before.2,
        refused.len(),
        refused.first()
    );
    assert!(!log.contains("NOPERM"), "no command refused in the replay");
    env.cleanup().await;
}

/// A Redis that stalls is waited for, by the workers' store and by the connections that
/// tools, tests and benchmarks open (`redis_store::raw_connection`). With `appendfsync
/// always` Redis answers only after its AOF's `fdatasync`, which this box's volume has held
/// for up to 2.4 s; redis-rs' own limits (1 s to connect, 500 ms for a reply) failed three
/// secure tests and the survey in session 23's CI run, each at a connection or a reply.
/// `CLIENT PAUSE ... ALL` holds every other client's commands as such a stall does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_waited_for() {
    let stack = secure_stack();
    let server = PrivateRedis::start(&[]);
    let admin = server.store(&stack.redis_admin).await;
    let stall = Duration::from_millis(2_000);
    let pause = || async {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(stall.as_millis() as u64)
            .arg("ALL")
            .query_async(&mut admin.connection())
            .await
            .expect("CLIENT PAUSE");
        Instant::now()
    };
    let client = stock_common::redis_store::client(&server.args(&stack.redis)).expect("client");

    // A connection opened during the stall (its handshake's HELLO waits).
    let paused = pause().await;
    let mut conn = stock_common::redis_store::raw_connection(&client)
        .await
        .expect("a connection opened during a stall");
    let _: () = redis::cmd("SET")
        .arg("stock:1")
        .arg(5)
        .query_async(&mut conn)
        .await
        .expect("a write during a stall");
    assert!(paused.elapsed() >= stall / 2, "the stall held the client");

    // A reply on an open connection during the stall.
    let paused = pause().await;
    let level: i64 = redis::cmd("GET")
        .arg("stock:1")
        .query_async(&mut conn)
        .await
        .expect("a reply during a stall");
    assert_eq!(level, 5);
    assert!(paused.elapsed() >= stall / 2, "the stall held the reply");

    // The producer's store, connecting and reading during the stall.
    let paused = pause().await;
    let store = RedisStore::connect_producer(&server.args(&stack.redis))
        .await
        .expect("the producer's store connects during a stall");
    let level: i64 = redis::cmd("GET")
        .arg("stock:1")
        .query_async(&mut store.connection())
        .await
        .expect("a read during a stall");
    assert_eq!(level, 5);
    assert!(paused.elapsed() >= stall / 2, "the stall held the store");
}

/// `stockctl check` names the Redis settings under which a restart loses decisions, and
/// fails: an ACL user `default` that may not run every command (the secure layout's until
/// session 22) and no AOF. The layout's own settings pass, and a Redis that will not show
/// its settings is named without failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_names_redis_settings_that_lose_decisions_on_a_restart() {
    let env = TestEnv::secure().await;
    let users =
        std::fs::read_to_string(secure_file("redis/users.acl")).expect("the layout's ACL file");
    let refusing = std::env::temp_dir().join(format!("stockpipe-acl-{}", uuid::Uuid::new_v4()));
    let old_default = "user default off resetpass resetkeys resetchannels -@all";
    std::fs::write(
        &refusing,
        users
            .lines()
            .map(|l| {
                if l.starts_with("user default ") {
                    old_default
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .expect("an ACL file");
    let refusing = refusing.to_string_lossy().into_owned();
    let cases: [(&[&str], Option<&str>); 3] = [
        (&[], None),
        (&["--aclfile", &refusing], Some("redis/redis#14541")),
        (&["--appendonly", "no"], Some("appendonly is not yes")),
    ];
    for (settings, danger) in cases {
        let server = PrivateRedis::start(settings);
        let admin = server.loaded(&env, 10).await;
        let r = admin::check_drift(&env.pool, &admin, false)
            .await
            .expect("check");
        assert!(r.drift.is_empty(), "{settings:?}: {r:?}");
        match danger {
            None => {
                assert_eq!(r.redis_risks, vec![], "the layout's settings");
                assert!(r.clean(), "{r:?}");
            }
            Some(what) => {
                assert!(
                    matches!(&r.redis_risks[..], [Risk::Danger(d)] if d.contains(what)),
                    "{settings:?}: {:?}",
                    r.redis_risks
                );
                assert!(!r.clean(), "a danger fails the check");
            }
        }
    }
    // A Redis that will not show its settings (a managed service renames or refuses
    // CONFIG) is named, and does not fail the check.
    let server = PrivateRedis::start(&["--rename-command", "CONFIG", ""]);
    let admin = server.loaded(&env, 10).await;
    let r = admin::check_drift(&env.pool, &admin, false)
        .await
        .expect("check");
    assert!(
        matches!(&r.redis_risks[..], [Risk::Unknown(u)] if u.contains("CONFIG GET refused")),
        "{:?}",
        r.redis_risks
    );
    assert!(r.clean(), "{r:?}");
    let _ = std::fs::remove_file(&refusing);
    env.cleanup().await;
}
