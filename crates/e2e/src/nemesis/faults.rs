//! The faults: what each does, the schedule, and control of the local stack's services.
//!
//! Services are restarted with `deploy/stack-down.sh <svc>` and `deploy/stack-up.sh <svc>`,
//! with the stack's settings (`STACK_DIR`, `PGPORT_STACK`, `REDIS_PORT`, `KAFKA_PORT`,
//! `KAFKA_CONTROLLER_PORT`) passed through. Before touching anything, [`StackControl`]
//! checks that the stack in `STACK_DIR` is the one the run's URLs point at (the process in
//! each pid file listens on the URL's port), so a run pointed at a private stack never
//! restarts somebody else's.

use super::check::Violation;
use super::procs::Supervisor;
use crate::TestEnv;
use redis::AsyncCommands;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use stock_common::redis_store::RedisStore;
use stock_devkit::rng::Rng;
use tokio::time::Instant;

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// `kill -9` of one worker process, then a restart.
    Kill9,
    /// SIGSTOP of one worker for longer than the group session timeout, then SIGCONT.
    Pause,
    /// Kafka broker stopped and started again.
    KafkaRestart,
    /// PostgreSQL stopped (fast shutdown) and started again.
    PostgresRestart,
    /// Redis stopped (SHUTDOWN SAVE; AOF on) and started again with its data.
    RedisRestart,
    /// The run's Redis database emptied (FLUSHDB), then `stockctl rebuild`.
    RedisFlush,
    /// One of the cluster layout's three Kafka brokers, drawn at random, killed (`kill -9`)
    /// and started again (`deploy/cluster-fault.sh`); the run's brokers must be those.
    KafkaBrokerKill,
    /// A Redis Cluster master, drawn at random, killed (`kill -9`): its replica takes over;
    /// after the outage the old master comes back as the new master's replica.
    RedisMasterKill,
    /// Slots moved live from one Redis Cluster master to another (`redis-cli --cluster
    /// reshard`): `ASK`/`MOVED` and `TRYAGAIN` while keys migrate.
    RedisReshard,
    /// A Redis Cluster master restarted at once without its data (no failover: it serves its
    /// slots again, empty, and its replica resyncs empty): those slots' markers are gone,
    /// checked, then `stockctl rebuild`.
    RedisMasterEmpty,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Kill9,
        FaultKind::Pause,
        FaultKind::KafkaRestart,
        FaultKind::PostgresRestart,
        FaultKind::RedisRestart,
        FaultKind::RedisFlush,
    ];

    /// The kinds of a run over the cluster layout's three brokers (the plaintext layout's
    /// PostgreSQL and Redis): a broker killed instead of the single broker restarted.
    pub const CLUSTER_KAFKA: [FaultKind; 5] = [
        FaultKind::Kill9,
        FaultKind::Pause,
        FaultKind::KafkaBrokerKill,
        FaultKind::PostgresRestart,
        FaultKind::RedisFlush,
    ];

    /// The kinds of a run over the whole cluster layout (three brokers, the Redis Cluster,
    /// PostgreSQL): a master killed, slots resharded and a master emptied besides.
    pub const CLUSTER: [FaultKind; 7] = [
        FaultKind::Kill9,
        FaultKind::Pause,
        FaultKind::KafkaBrokerKill,
        FaultKind::PostgresRestart,
        FaultKind::RedisMasterKill,
        FaultKind::RedisReshard,
        FaultKind::RedisMasterEmpty,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FaultKind::Kill9 => "kill-9",
            FaultKind::Pause => "pause",
            FaultKind::KafkaRestart => "kafka-restart",
            FaultKind::PostgresRestart => "postgres-restart",
            FaultKind::RedisRestart => "redis-restart",
            FaultKind::RedisFlush => "redis-flush",
            FaultKind::KafkaBrokerKill => "kafka-broker-kill",
            FaultKind::RedisMasterKill => "redis-master-kill",
            FaultKind::RedisReshard => "redis-reshard",
            FaultKind::RedisMasterEmpty => "redis-master-empty",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL
            .into_iter()
            .chain(FaultKind::CLUSTER_KAFKA)
            .chain(FaultKind::CLUSTER)
            .find(|k| k.label() == s.trim())
    }

    /// Whether it stops and starts a service of the stack.
    pub fn restarts_service(self) -> bool {
        matches!(
            self,
            FaultKind::KafkaRestart
                | FaultKind::PostgresRestart
                | FaultKind::RedisRestart
                | FaultKind::KafkaBrokerKill
                | FaultKind::RedisMasterKill
                | FaultKind::RedisReshard
                | FaultKind::RedisMasterEmpty
        )
    }
}

/// `n` faults: every kind of `kinds` once, in an order chosen by `rng`, then kinds drawn
/// at random.
pub fn schedule(kinds: &[FaultKind], n: usize, rng: &mut Rng) -> Vec<FaultKind> {
    if kinds.is_empty() {
        return Vec::new();
    }
    let mut first = kinds.to_vec();
    rng.shuffle(&mut first);
    let mut out: Vec<FaultKind> = first.into_iter().take(n).collect();
    while out.len() < n {
        out.push(*rng.pick(kinds));
    }
    out
}

/// One fault as it happened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultRecord {
    pub kind: String,
    /// The worker or service it hit.
    pub target: String,
    /// Seconds from the start of the workload.
    pub at_s: f64,
    /// How long the fault lasted, recovery included.
    pub took_s: f64,
    pub note: String,
}

/// The local stack's services, as `deploy/` runs them.
#[derive(Debug, Clone)]
pub struct StackControl {
    deploy_dir: PathBuf,
    stack_dir: PathBuf,
    env: Vec<(String, String)>,
    pg_port: u16,
    /// The single Redis's port; `None` when the run's Redis is the cluster layout's.
    redis_port: Option<u16>,
    /// The single broker's port; `None` when the run's brokers are several (the cluster
    /// layout's, controlled by `deploy/cluster-fault.sh`).
    kafka_port: Option<u16>,
}

fn url_port(url: &str, default: u16, what: &str) -> Result<u16, String> {
    let u = url::Url::parse(url).map_err(|e| format!("{what} is not a URL: {e}"))?;
    match u.host_str() {
        Some("127.0.0.1" | "localhost" | "::1" | "[::1]") => {}
        other => {
            return Err(format!(
                "{what} points at {other:?}: the nemesis restarts services of the local stack only"
            ))
        }
    }
    Ok(u.port().unwrap_or(default))
}

/// The port the stack's environment variable `var` says, checked against `from_url`.
fn stack_port(var: &str, from_url: u16) -> Result<u16, String> {
    match std::env::var(var) {
        Ok(v) => {
            let p: u16 = v
                .trim()
                .parse()
                .map_err(|_| format!("{var}={v} is not a port"))?;
            if p != from_url {
                return Err(format!(
                    "{var}={p} but the URL uses port {from_url}: the stack the harness would restart \
                     is not the one the run uses"
                ));
            }
            Ok(p)
        }
        Err(_) => Ok(from_url),
    }
}

impl StackControl {
    /// The stack of `STACK_DIR` (default `/var/tmp/stockpipe`) serving the given
    /// connection settings; `deploy_dir` holds `stack-up.sh` and `stack-down.sh`.
    pub fn from_env(
        deploy_dir: &Path,
        kafka_brokers: &str,
        database_url: &str,
        redis_url: Option<&str>,
    ) -> Result<StackControl, String> {
        let stack_dir = PathBuf::from(
            std::env::var("STACK_DIR").unwrap_or_else(|_| "/var/tmp/stockpipe".into()),
        );
        let brokers: Vec<&str> = kafka_brokers.split(',').map(str::trim).collect();
        let first = brokers.first().copied().unwrap_or_default();
        let kafka_port = url_port(&format!("kafka://{first}"), 9092, "KAFKA_BROKERS")?;
        let pg_port = url_port(database_url, 5432, "DATABASE_URL")?;
        let redis_port = redis_url
            .map(|u| url_port(u, 6379, "REDIS_URL"))
            .transpose()?;
        let kafka_port = if brokers.len() > 1 {
            None
        } else {
            Some(stack_port("KAFKA_PORT", kafka_port)?)
        };
        let pg_port = stack_port("PGPORT_STACK", pg_port)?;
        let redis_port = redis_port
            .map(|p| stack_port("REDIS_PORT", p))
            .transpose()?;
        let controller = match std::env::var("KAFKA_CONTROLLER_PORT") {
            Ok(v) => v,
            Err(_) => controller_port(&stack_dir).unwrap_or_else(|| "9093".into()),
        };
        let mut env = vec![
            ("STACK_DIR".into(), stack_dir.display().to_string()),
            ("PGPORT_STACK".into(), pg_port.to_string()),
            ("KAFKA_CONTROLLER_PORT".into(), controller),
            ("SKIP_TOPICS".into(), "1".into()),
        ];
        if let Some(p) = kafka_port {
            env.push(("KAFKA_PORT".into(), p.to_string()));
        }
        if let Some(p) = redis_port {
            env.push(("REDIS_PORT".into(), p.to_string()));
        }
        let ctl = StackControl {
            deploy_dir: deploy_dir.to_path_buf(),
            stack_dir,
            env,
            pg_port,
            redis_port,
            kafka_port,
        };
        ctl.verify()?;
        Ok(ctl)
    }

    /// Checks that the process in each service's pid file listens on the port the run
    /// uses.
    pub fn verify(&self) -> Result<(), String> {
        for script in ["stack-up.sh", "stack-down.sh"] {
            if !self.deploy_dir.join(script).exists() {
                return Err(format!("{} has no {script}", self.deploy_dir.display()));
            }
        }
        let d = &self.stack_dir;
        let mut checks = vec![("pg", d.join("pg/data/postmaster.pid"), self.pg_port)];
        if let Some(port) = self.redis_port {
            checks.push(("redis", d.join("redis/redis.pid"), port));
        }
        if let Some(port) = self.kafka_port {
            checks.push(("kafka", d.join("kafka/kafka.pid"), port));
        }
        for (svc, pidfile, port) in checks {
            let pid = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    format!(
                        "{svc}: no pid in {} (is STACK_DIR={} the stack the run uses?)",
                        pidfile.display(),
                        d.display()
                    )
                })?;
            let listeners = listening_pids(port)?;
            if !listeners.contains(&pid) {
                return Err(format!(
                    "{svc}: port {port} is served by pid(s) {listeners:?}, not by pid {pid} of {}: \
                     set STACK_DIR (and the port variables) to the stack the URLs point at",
                    pidfile.display()
                ));
            }
        }
        Ok(())
    }

    async fn script(&self, script: &str, svc: &str) -> Result<(), String> {
        run_bash(&self.deploy_dir.join(script), &[svc], &self.env).await
    }

    /// `deploy/cluster-fault.sh kill-broker ID`, `outage`, then `start-broker ID` (which
    /// waits until the broker is back in sync).
    pub async fn kill_broker(&self, id: u64, outage: Duration) -> Result<String, String> {
        if self.kafka_port.is_some() {
            return Err("kafka-broker-kill needs the cluster layout's brokers".into());
        }
        let id = id.to_string();
        cluster_fault(&self.deploy_dir, &["kill-broker", &id]).await?;
        tokio::time::sleep(outage).await;
        cluster_fault(&self.deploy_dir, &["start-broker", &id]).await?;
        Ok(format!("broker {id} killed and back"))
    }

    /// `deploy/cluster-fault.sh kill-redis-master PORT` (waits for the failover),
    /// `outage`, then `start-redis PORT` (it comes back as the new master's replica).
    pub async fn kill_redis_master(&self, port: u16, outage: Duration) -> Result<String, String> {
        let port = port.to_string();
        cluster_fault(&self.deploy_dir, &["kill-redis-master", &port]).await?;
        tokio::time::sleep(outage).await;
        cluster_fault(&self.deploy_dir, &["start-redis", &port]).await?;
        Ok(format!(
            "master {port} killed, its replica took over; back as a replica"
        ))
    }

    /// `deploy/cluster-fault.sh reshard FROM TO SLOTS`, live.
    pub async fn reshard(&self, from: u16, to: u16, slots: u64) -> Result<String, String> {
        let (f, t, n) = (from.to_string(), to.to_string(), slots.to_string());
        cluster_fault(&self.deploy_dir, &["reshard", &f, &t, &n]).await?;
        Ok(format!("{slots} slots moved from {from} to {to}"))
    }

    /// `deploy/cluster-fault.sh restart-redis-empty PORT`.
    pub async fn restart_redis_empty(&self, port: u16) -> Result<(), String> {
        cluster_fault(
            &self.deploy_dir,
            &["restart-redis-empty", &port.to_string()],
        )
        .await
    }

    /// Stops `svc`, waits `outage`, starts it again (retrying the start a few times).
    pub async fn restart(&self, svc: &str, outage: Duration) -> Result<String, String> {
        self.script("stack-down.sh", svc).await?;
        tokio::time::sleep(outage).await;
        let mut last = String::new();
        for attempt in 1..=5 {
            match self.script("stack-up.sh", svc).await {
                Ok(()) => return Ok(format!("up after {attempt} attempt(s)")),
                Err(e) => {
                    tracing::warn!(svc, attempt, error = %e, "service did not start; retrying");
                    last = e;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
        Err(last)
    }
}

/// `deploy_dir/cluster-fault.sh ARGS` (the cluster layout's faults, each waiting for its
/// outcome), for the nemesis and the tests.
pub async fn cluster_fault(deploy_dir: &Path, args: &[&str]) -> Result<(), String> {
    run_bash(&deploy_dir.join("cluster-fault.sh"), args, &[]).await
}

/// `bash SCRIPT ARGS` with `envs` added, given at most 240 s; on failure the error names
/// the command and ends with the last 15 lines of its output.
async fn run_bash(script: &Path, args: &[&str], envs: &[(String, String)]) -> Result<(), String> {
    let what = format!(
        "{} {}",
        script
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        args.join(" ")
    );
    let run = tokio::process::Command::new("bash")
        .arg(script)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .map_err(|_| format!("{what}: no answer within 240 s"))?
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// The controller port in the rendered `server.properties` of the stack.
fn controller_port(stack_dir: &Path) -> Option<String> {
    let props = std::fs::read_to_string(stack_dir.join("kafka/server.properties")).ok()?;
    let line = props.lines().find(|l| l.starts_with("listeners="))?;
    let ctl = line.split(',').find(|s| s.contains("CONTROLLER://"))?;
    Some(ctl.rsplit(':').next()?.trim().to_owned())
}

/// Pids listening on 127.0.0.1:`port` (from `ss`).
fn listening_pids(port: u16) -> Result<Vec<String>, String> {
    let out = std::process::Command::new("ss")
        .args(["-H", "-ltnp", &format!("sport = :{port}")])
        .output()
        .map_err(|e| format!("cannot run ss (iproute2) to check the stack: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut pids: Vec<String> = text
        .split("pid=")
        .skip(1)
        .map(|s| s.chars().take_while(char::is_ascii_digit).collect())
        .collect();
    pids.sort();
    pids.dedup();
    Ok(pids)
}

/// What the faults act on.
pub struct FaultCtx<'a> {
    pub env: &'a TestEnv,
    pub workers: &'a Mutex<Supervisor>,
    pub stack: Option<&'a StackControl>,
    pub outage: Duration,
    pub pause: Duration,
    pub violations: &'a Mutex<Vec<Violation>>,
    pub start: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultCtx<'_> {
    fn violation(&self, kind: &str, detail: String) {
        tracing::error!(kind, %detail, "violation");
        lock(self.violations).push(Violation {
            kind: kind.to_owned(),
            detail,
        });
    }

    /// Injects one fault and waits until it is over (service back, worker resumed, Redis
    /// rebuilt). An error means the run cannot go on (a service that does not come back).
    pub async fn inject(&self, kind: FaultKind, rng: &mut Rng) -> anyhow::Result<FaultRecord> {
        let started = Instant::now();
        let at_s = started.duration_since(self.start).as_secs_f64();
        let (target, note) = match kind {
            FaultKind::Kill9 | FaultKind::Pause => {
                let (i, name) = {
                    let sup = lock(self.workers);
                    let i = rng.range(0, sup.slots.len() as u64) as usize;
                    (i, sup.slots[i].name.clone())
                };
                let note = if kind == FaultKind::Kill9 {
                    lock(self.workers).kill9(i);
                    tokio::time::sleep(Duration::from_millis(rng.range(0, 1000))).await;
                    lock(self.workers).respawn(i)?;
                    "killed and restarted".to_owned()
                } else {
                    let stopped = lock(self.workers).sigstop(i)?;
                    tokio::time::sleep(self.pause).await;
                    lock(self.workers).sigcont(i)?;
                    if stopped {
                        format!("stopped for {:?}", self.pause)
                    } else {
                        "was not running".to_owned()
                    }
                };
                (name, note)
            }
            FaultKind::KafkaRestart | FaultKind::PostgresRestart | FaultKind::RedisRestart => {
                let svc = match kind {
                    FaultKind::KafkaRestart => "kafka",
                    FaultKind::PostgresRestart => "pg",
                    _ => "redis",
                };
                let stack = self
                    .stack
                    .ok_or_else(|| anyhow::anyhow!("no stack control for {}", kind.label()))?;
                let note = stack
                    .restart(svc, self.outage)
                    .await
                    .map_err(|e| anyhow::anyhow!("{} did not come back: {e}", kind.label()))?;
                if kind == FaultKind::RedisRestart {
                    self.after_redis_restart().await;
                }
                (svc.to_owned(), note)
            }
            FaultKind::KafkaBrokerKill => {
                let stack = self
                    .stack
                    .ok_or_else(|| anyhow::anyhow!("no stack control for {}", kind.label()))?;
                let id = 1 + rng.range(0, 3);
                let note = stack
                    .kill_broker(id, self.outage)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e}", kind.label()))?;
                (format!("kafka broker {id}"), note)
            }
            FaultKind::RedisMasterKill | FaultKind::RedisReshard | FaultKind::RedisMasterEmpty => {
                let stack = self
                    .stack
                    .ok_or_else(|| anyhow::anyhow!("no stack control for {}", kind.label()))?;
                let masters = self.env.store.masters().await?;
                anyhow::ensure!(masters.len() >= 2, "a Redis Cluster of several masters");
                let i = rng.range(0, masters.len() as u64) as usize;
                let port = masters[i].1;
                let note = match kind {
                    FaultKind::RedisMasterKill => {
                        // A failover may lose writes the replica had not received: its
                        // slots are rebuilt from PostgreSQL, as after a loss (issue 11).
                        let served = self.env.store.slots_served_by(&masters[i].0, port).await?;
                        let note = stack
                            .kill_redis_master(port, self.outage)
                            .await
                            .map_err(|e| anyhow::anyhow!("{}: {e}", kind.label()))?;
                        let report = self
                            .rebuild_slots_retrying(stockctl::rebuild::Slots::Named(served))
                            .await?;
                        format!(
                            "{note}; its slots {} rebuilt in generation {}, stopped there {} ms",
                            report.slots, report.generation, report.stopped_ms
                        )
                    }
                    FaultKind::RedisReshard => {
                        let to = masters[(i + 1) % masters.len()].1;
                        let n = rng.range(50, 400);
                        stack
                            .reshard(port, to, n)
                            .await
                            .map_err(|e| anyhow::anyhow!("{}: {e}", kind.label()))?
                    }
                    _ => self.empty_master_and_rebuild(stack, port).await?,
                };
                (format!("redis {port}"), note)
            }
            FaultKind::RedisFlush => {
                // How long Redis stays empty before the rebuild starts varies, so that the
                // rebuild meets the pipeline in different states (reservations expiring,
                // compensations in flight, …).
                let max = self.outage.as_millis().max(300) as u64;
                let empty = Duration::from_millis(fault_rng_range(rng, 300, max));
                ("redis".to_owned(), self.flush_and_rebuild(empty).await?)
            }
        };
        let took_s = started.elapsed().as_secs_f64();
        tracing::info!(fault = kind.label(), %target, took_s, %note, "fault over");
        Ok(FaultRecord {
            kind: kind.label().to_owned(),
            target,
            at_s,
            took_s,
            note,
        })
    }

    /// Redis came back with its data: the marker must still be there.
    async fn after_redis_restart(&self) {
        for _ in 0..50 {
            match self.env.store.is_loaded().await {
                Ok(true) => return,
                Ok(false) => {
                    self.violation(
                        "redis.data_lost_on_restart",
                        "stockpipe:loaded missing after a restart with data kept".into(),
                    );
                    // Let the run go on: selling stays stopped until a rebuild.
                    let _ = self.rebuild_retrying().await;
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        tracing::warn!("could not read the marker after the Redis restart");
    }

    /// Restarts a master empty; its slots must then be unloaded (the loss is noticed: G6)
    /// until the rebuild of those slots alone (`stockctl rebuild --lost`), which follows:
    /// the other masters' slots keep selling through it.
    async fn empty_master_and_rebuild(
        &self,
        stack: &StackControl,
        port: u16,
    ) -> anyhow::Result<String> {
        stack
            .restart_redis_empty(port)
            .await
            .map_err(|e| anyhow::anyhow!("redis-master-empty: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let unloaded = loop {
            match self.env.store.unloaded_shards().await {
                Ok(s) => break s.len(),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "cannot read the loaded markers yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => anyhow::bail!("redis-master-empty: the markers cannot be read: {e}"),
            }
        };
        if unloaded == 0 {
            self.violation(
                "G6.loss_not_noticed",
                format!("master {port} restarted empty, yet every slot's loaded marker is there"),
            );
        }
        tokio::time::sleep(self.outage).await;
        let report = self
            .rebuild_slots_retrying(stockctl::rebuild::Slots::Lost)
            .await?;
        Ok(format!(
            "{unloaded} slots unloaded; slots {} rebuilt: generation {}, {} products, {} held, \
             {} holds of lost records given back, stopped there {} ms",
            report.slots,
            report.generation,
            report.products,
            report.held,
            report.orphans,
            report.stopped_ms
        ))
    }

    async fn flush_and_rebuild(&self, empty: Duration) -> anyhow::Result<String> {
        let mut flushed = false;
        for _ in 0..20 {
            let r: redis::RedisResult<()> = redis::cmd("FLUSHDB")
                .query_async(&mut self.env.store.connection())
                .await;
            match r {
                Ok(()) => {
                    flushed = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "FLUSHDB failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        anyhow::ensure!(flushed, "FLUSHDB did not go through");
        // Traffic goes on against an empty Redis for a while: nothing may be written.
        tokio::time::sleep(empty).await;
        let (written, sample) = keys_sample(&self.env.store).await;
        if written > 0 {
            self.violation(
                "G6.written_while_empty",
                format!(
                    "Redis emptied and not rebuilt, yet it holds {written} keys, e.g. {sample:?}"
                ),
            );
        }
        let report = self.rebuild_retrying().await?;
        Ok(format!(
            "empty for {} ms, {} keys written meanwhile; rebuilt: generation {}, {} products, {} held, stopped {} ms",
            empty.as_millis(),
            written,
            report.generation,
            report.products,
            report.held,
            report.stopped_ms
        ))
    }

    /// `stockctl rebuild --lost` or `--slots`, retried as [`Self::rebuild_retrying`].
    async fn rebuild_slots_retrying(
        &self,
        which: stockctl::rebuild::Slots,
    ) -> anyhow::Result<stockctl::rebuild::RebuildReport> {
        let (pool, store) = (&self.env.pool, &self.env.store);
        retrying("rebuild of some slots", || {
            stockctl::rebuild::rebuild_slots(pool, store, which.clone())
        })
        .await
    }

    async fn rebuild_retrying(&self) -> anyhow::Result<stockctl::rebuild::RebuildReport> {
        let (pool, store) = (&self.env.pool, &self.env.store);
        retrying("rebuild", || stockctl::rebuild::rebuild(pool, store)).await
    }
}

/// `run` (`what`, a rebuild) until it succeeds, at most 10 times, 2 s apart.
async fn retrying<F, Fut>(what: &str, run: F) -> anyhow::Result<stockctl::rebuild::RebuildReport>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<
        Output = Result<stockctl::rebuild::RebuildReport, stockctl::admin::AdminError>,
    >,
{
    let mut last = String::new();
    for attempt in 1..=10 {
        match run().await {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "{what} failed; retrying");
                last = e.to_string();
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    anyhow::bail!("{what} kept failing: {last}")
}

/// Uniform in `lo..=hi` milliseconds.
fn fault_rng_range(rng: &mut Rng, lo: u64, hi: u64) -> u64 {
    rng.range(lo, hi + 1)
}

/// How many keys the run's Redis database holds, and up to 10 of them.
async fn keys_sample(store: &RedisStore) -> (u64, Vec<String>) {
    let mut conn = store.connection();
    let size: redis::RedisResult<u64> = redis::cmd("DBSIZE").query_async(&mut conn).await;
    let size = match size {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read DBSIZE");
            return (0, Vec::new());
        }
    };
    if size == 0 {
        return (0, Vec::new());
    }
    let keys: redis::RedisResult<Vec<String>> = conn.keys("*").await;
    (
        size,
        keys.unwrap_or_default().into_iter().take(10).collect(),
    )
}
