//! Producer and consumer workers on a [`PipelineEnv`], with the batch settings under test,
//! each serving its metrics on a free local port (read by [`crate::worker_metrics`]). Their
//! other settings are the binaries' defaults, built by [`stock_devkit::worker_args`] (no
//! environment variable applies).
//!
//! Two placements, the same settings:
//! * tasks of this process ([`Workers::default`]): one CPU figure for the workers, the
//!   load generator and the result collector together;
//! * processes of the release binaries `producer` and `consumer` found next to the running
//!   executable ([`Workers::processes`]): the same flags (through
//!   [`WorkerFlags::command`]), each with its output in a log file of its own, counted on
//!   its own by [`crate::cpu`]. A process is ready once its metrics endpoint answers.
//!   [`Workers::stop`] sends SIGTERM, waits up to [`STOP_TIMEOUT`], then kills; dropping
//!   [`Workers`] (an error, a panic, a run dropped by [`interrupted`]) kills and reaps
//!   every process still running, so none is left behind.

use crate::cpu;
use crate::env::PipelineEnv;
use crate::worker_metrics::{self, Sample};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use stock_common::config::BatchArgs;
use stock_consumer::ConsumerArgs;
use stock_devkit::worker_args::{self, Wiring, Worker, WorkerFlags};
use stock_producer::ProducerArgs;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long [`Workers::stop`] waits for a worker process after SIGTERM before killing it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a worker process may take to serve its metrics after it started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The release binary of `worker` next to the running executable (`target/release/`).
pub fn binary(worker: Worker) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let mut dir = exe
        .parent()
        .context("the bench executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        // A test binary: the binaries are one level up.
        dir.pop();
    }
    let path = dir.join(worker.binary());
    if !path.is_file() {
        bail!(
            "{} not found: build the workers next to the bench with \
             `cargo build --release -p stock-bench -p stock-producer -p stock-consumer` \
             (or run with --in-process)",
            path.display()
        );
    }
    Ok(path)
}

/// Consumer-group names of a run's workers.
pub fn producer_group(env: &PipelineEnv) -> String {
    format!("bench-{}-producer", env.id)
}

pub fn consumer_group(env: &PipelineEnv) -> String {
    format!("bench-{}-consumer", env.id)
}

/// The workers' batch settings as the binaries have them by default.
pub fn default_batch() -> BatchArgs {
    worker_args::producer_defaults().batch
}

/// `worker`'s flags on this run's connections and topics, in its group, with `batch` and
/// its metrics on `metrics_addr`.
pub fn flags(
    env: &PipelineEnv,
    worker: Worker,
    batch: &BatchArgs,
    metrics_addr: &str,
) -> WorkerFlags {
    let wiring = Wiring {
        kafka: &env.kafka,
        topics: env.topics(),
        redis: &env.redis.args,
        db: &env.db.args,
    };
    let group = match worker {
        Worker::Producer => producer_group(env),
        Worker::Consumer => consumer_group(env),
    };
    WorkerFlags::new(worker, wiring, &group)
        .batch(batch)
        .set("--metrics-addr", metrics_addr)
}

/// The producer's settings: its defaults, with this run's connections, topics, group and
/// batch.
pub fn producer_args(
    env: &PipelineEnv,
    batch: &BatchArgs,
    metrics_addr: &str,
) -> Result<ProducerArgs> {
    flags(env, Worker::Producer, batch, metrics_addr)
        .producer()
        .context("producer settings")
}

/// The consumer's settings, like [`producer_args`]; the schema is already migrated.
pub fn consumer_args(
    env: &PipelineEnv,
    batch: &BatchArgs,
    metrics_addr: &str,
) -> Result<ConsumerArgs> {
    flags(env, Worker::Consumer, batch, metrics_addr)
        .consumer()
        .context("consumer settings")
}

/// One worker process: its name (`producer-1`), its process and log file.
struct WorkerProc {
    name: String,
    kind: Worker,
    child: Child,
    log: PathBuf,
}

/// Where the workers run.
#[derive(Default)]
enum Placement {
    /// Tasks of this process.
    #[default]
    InProcess,
    /// Processes of the release binaries; logs in `log_dir`, named `<prefix><name>.log`.
    Processes {
        log_dir: PathBuf,
        prefix: String,
        producer: PathBuf,
        consumer: PathBuf,
    },
}

/// Running workers; [`Workers::stop`] shuts them down cooperatively. [`Workers::default`]
/// runs them in this process, [`Workers::processes`] as processes.
#[derive(Default)]
pub struct Workers {
    placement: Placement,
    /// Flags added to every worker of a kind (after the run's own).
    extra: Vec<(Worker, String, String)>,
    shutdown: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<Result<()>>)>,
    procs: Procs,
    producer_metrics: Vec<String>,
    consumer_metrics: Vec<String>,
}

impl Workers {
    /// Workers as processes of the release binaries next to this executable (an error
    /// naming the missing one and the build command), each logging to
    /// `log_dir/<prefix><name>.log`.
    pub fn processes(log_dir: &Path, prefix: &str) -> Result<Workers> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        Ok(Workers {
            placement: Placement::Processes {
                log_dir: log_dir.to_path_buf(),
                prefix: prefix.to_owned(),
                producer: binary(Worker::Producer)?,
                consumer: binary(Worker::Consumer)?,
            },
            ..Workers::default()
        })
    }

    /// Adds `flag value` to every worker of `kind` started from now on.
    pub fn with_flag(mut self, kind: Worker, flag: &str, value: impl ToString) -> Workers {
        self.extra.push((kind, flag.to_owned(), value.to_string()));
        self
    }

    /// Whether the workers are processes of their own.
    pub fn separate(&self) -> bool {
        matches!(self.placement, Placement::Processes { .. })
    }

    /// The worker processes, for [`crate::cpu::sample_with`] (none in process).
    pub fn pids(&self) -> Vec<cpu::Proc> {
        self.procs
            .iter()
            .map(|p| cpu::Proc {
                kind: p.kind.binary(),
                name: p.name.clone(),
                pid: p.child.id(),
            })
            .collect()
    }

    /// The log file of each worker process.
    pub fn logs(&self) -> Vec<PathBuf> {
        self.procs.iter().map(|p| p.log.clone()).collect()
    }

    fn flags_of(
        &self,
        env: &PipelineEnv,
        kind: Worker,
        batch: &BatchArgs,
        addr: &str,
    ) -> WorkerFlags {
        self.extra
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .fold(flags(env, kind, batch, addr), |f, (_, flag, v)| {
                f.set(flag, v)
            })
    }

    /// Starts `n` producer workers (one consumer group).
    pub async fn start_producers(
        &mut self,
        env: &PipelineEnv,
        batch: &BatchArgs,
        n: usize,
    ) -> Result<()> {
        for _ in 0..n {
            let addr = worker_metrics::free_addr()?;
            let f = self.flags_of(env, Worker::Producer, batch, &addr);
            if self.separate() {
                self.spawn(&f, &addr).await?;
                self.producer_metrics.push(addr);
                continue;
            }
            let args = f.producer().context("producer settings")?;
            self.producer_metrics.push(addr);
            let w = stock_producer::worker::Worker::new(&args)
                .await
                .context("starting a producer worker")?;
            self.tasks
                .push(("producer", tokio::spawn(w.run(self.shutdown.clone()))));
        }
        Ok(())
    }

    /// Starts `n` consumer workers (one consumer group).
    pub async fn start_consumers(
        &mut self,
        env: &PipelineEnv,
        batch: &BatchArgs,
        n: usize,
    ) -> Result<()> {
        for _ in 0..n {
            let addr = worker_metrics::free_addr()?;
            let f = self.flags_of(env, Worker::Consumer, batch, &addr);
            if self.separate() {
                self.spawn(&f, &addr).await?;
                self.consumer_metrics.push(addr);
                continue;
            }
            let args = f.consumer().context("consumer settings")?;
            self.consumer_metrics.push(addr);
            let w = stock_consumer::worker::Worker::new(&args)
                .await
                .context("starting a consumer worker")?;
            self.tasks
                .push(("consumer", tokio::spawn(w.run(self.shutdown.clone()))));
        }
        Ok(())
    }

    /// Starts one worker process with `flags`, its output to its log file, and waits until
    /// its metrics endpoint at `addr` answers.
    async fn spawn(&mut self, flags: &WorkerFlags, addr: &str) -> Result<()> {
        let Placement::Processes {
            log_dir,
            prefix,
            producer,
            consumer,
        } = &self.placement
        else {
            bail!("workers run in this process");
        };
        let kind = flags.worker();
        let bin = match kind {
            Worker::Producer => producer,
            Worker::Consumer => consumer,
        };
        let name = format!(
            "{}-{}",
            kind.binary(),
            self.procs.iter().filter(|p| p.kind == kind).count() + 1
        );
        let log = log_dir.join(format!("{prefix}{name}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd: Command = flags
            .command(bin)
            .with_context(|| format!("{name} settings"))?;
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        tracing::info!(worker = %name, pid = child.id(), log = %log.display(), "worker process started");
        let pid = child.id();
        self.procs.push(WorkerProc {
            name: name.clone(),
            kind,
            child,
            log: log.clone(),
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if cpu::exited(pid) {
                bail!(
                    "{name} (pid {pid}) exited at start-up: see {}",
                    log.display()
                );
            }
            if worker_metrics::scrape(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} (pid {pid}) did not serve its metrics on {addr} within {READY_TIMEOUT:?}: see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The producers' metrics summed (zero before any started).
    pub async fn producer_sample(&self) -> Result<Sample> {
        worker_metrics::scrape_all(&self.producer_metrics).await
    }

    /// The consumers' metrics summed (zero before any started).
    pub async fn consumer_sample(&self) -> Result<Sample> {
        worker_metrics::scrape_all(&self.consumer_metrics).await
    }

    /// Whether a worker has stopped on its own (it failed).
    pub fn any_finished(&self) -> bool {
        self.tasks.iter().any(|(_, t)| t.is_finished())
            || self.procs.iter().any(|p| cpu::exited(p.child.id()))
    }

    /// The worker processes that ended, with their log files, for an error message.
    pub fn finished(&self) -> String {
        let gone: Vec<String> = self
            .procs
            .iter()
            .filter(|p| cpu::exited(p.child.id()))
            .map(|p| format!("{} exited (log {})", p.name, p.log.display()))
            .collect();
        if gone.is_empty() {
            "a worker task ended".into()
        } else {
            gone.join("; ")
        }
    }

    /// Asks every worker to stop and waits; the first failure is returned. Processes get
    /// SIGTERM, and are killed when they have not exited within [`STOP_TIMEOUT`].
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        let mut first_err = None;
        for p in self.procs.iter() {
            if let Err(e) = terminate(p.child.id()) {
                tracing::warn!(worker = %p.name, error = %e, "cannot send SIGTERM");
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for mut p in std::mem::take(&mut *self.procs) {
            let outcome = loop {
                match p.child.try_wait() {
                    Ok(Some(st)) if st.success() => break Ok(()),
                    Ok(Some(st)) => {
                        break Err(anyhow!(
                            "{} exited with {st} (log {})",
                            p.name,
                            p.log.display()
                        ))
                    }
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok(None) => {
                        kill(&mut p.child);
                        break Err(anyhow!(
                            "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM: killed (log {})",
                            p.name,
                            p.log.display()
                        ));
                    }
                    Err(e) => {
                        kill(&mut p.child);
                        break Err(anyhow!("waiting for {}: {e}", p.name));
                    }
                }
            };
            if let Err(e) = outcome {
                first_err.get_or_insert(e);
            }
        }
        for (name, task) in std::mem::take(&mut self.tasks) {
            let outcome = match task.await {
                Ok(r) => r.with_context(|| format!("{name} worker failed")),
                Err(e) => Err(anyhow!("{name} worker panicked: {e}")),
            };
            if let Err(e) = outcome {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The worker processes; dropping them kills and reaps every one still running (the error
/// paths: [`Workers::stop`] leaves none).
#[derive(Default)]
struct Procs(Vec<WorkerProc>);

impl std::ops::Deref for Procs {
    type Target = Vec<WorkerProc>;
    fn deref(&self) -> &Vec<WorkerProc> {
        &self.0
    }
}

impl std::ops::DerefMut for Procs {
    fn deref_mut(&mut self) -> &mut Vec<WorkerProc> {
        &mut self.0
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            tracing::warn!(worker = %p.name, pid = p.child.id(), "killing a worker process left running");
            kill(&mut p.child);
        }
    }
}

/// The first SIGINT or SIGTERM to this process, as an error. A run races its measurement
/// against it, then removes its environment: the measurement is dropped, and with it the
/// worker processes (killed and reaped).
pub async fn interrupted<T>() -> Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let which = match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    };
    eprintln!("bench: {which}: stopping the workers and removing the run's environment");
    bail!("interrupted by {which}")
}

/// SIGTERM to `pid` (a child not reaped yet, so the PID cannot be another process's).
fn terminate(pid: u32) -> Result<()> {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    if !st.success() {
        bail!("kill -TERM {pid}: {st}");
    }
    Ok(())
}

/// SIGKILL and reap, ignoring a child that already ended.
fn kill(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}
