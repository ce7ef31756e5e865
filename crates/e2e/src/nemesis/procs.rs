//! The worker processes of a nemesis run: two producers and two consumers in the same
//! groups, each with its own metrics port and log file, restarted whenever one dies, and
//! the signals the faults send them (`kill -9`, SIGSTOP/SIGCONT).

use crate::WorkerFlags;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `target/<profile>/<name>`, next to the running executable (a test binary in `deps/` or
/// a binary such as `nemesis`); an error instead of a panic when it is not built.
pub fn find_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut dir = exe
        .parent()
        .ok_or("the executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not built: run `cargo build --bins` (with the same profile) first",
            path.display()
        ))
    }
}

/// A free TCP port on 127.0.0.1 (for a worker's metrics endpoint).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn signal(pid: u32, sig: &str) -> std::io::Result<bool> {
    Ok(Command::new("kill")
        .args([sig, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success())
}

/// One worker instance (`producer-1`, `consumer-2`, …) and its current process.
pub struct Slot {
    pub name: String,
    pub binary: PathBuf,
    flags: WorkerFlags,
    child: Option<Child>,
    pub paused: bool,
    /// Killed by a fault and not restarted yet: the watchdog leaves it alone.
    down: bool,
    /// Log file of every process this slot ran.
    pub logs: Vec<PathBuf>,
    pub starts: usize,
}

impl Slot {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self, log_dir: &Path, run_id: &str) -> std::io::Result<()> {
        // Never leave a process behind untracked.
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let log = log_dir.join(format!(
            "stockpipe-test-nemesis-{run_id}-{}-{}.log",
            self.name,
            self.starts + 1
        ));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = self
            .flags
            .command(&self.binary)
            .map_err(std::io::Error::other)?
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        tracing::info!(slot = %self.name, pid = child.id(), log = %log.display(), "worker started");
        self.child = Some(child);
        self.logs.push(log);
        self.starts += 1;
        self.paused = false;
        self.down = false;
        Ok(())
    }
}

/// A worker to start: its name, binary and settings.
pub type WorkerSpec = (String, PathBuf, WorkerFlags);

/// The workers of a run.
pub struct Supervisor {
    pub slots: Vec<Slot>,
    log_dir: PathBuf,
    run_id: String,
    /// "slot: exit status (log)" of every process that ended without the harness killing it.
    pub unexpected_exits: Vec<String>,
}

impl Supervisor {
    /// `slots`: (name, binary, settings).
    pub fn start(slots: Vec<WorkerSpec>, run_id: &str) -> std::io::Result<Supervisor> {
        let mut s = Supervisor {
            slots: slots
                .into_iter()
                .map(|(name, binary, flags)| Slot {
                    name,
                    binary,
                    flags,
                    child: None,
                    paused: false,
                    down: false,
                    logs: Vec::new(),
                    starts: 0,
                })
                .collect(),
            log_dir: std::env::temp_dir(),
            run_id: run_id.to_owned(),
            unexpected_exits: Vec::new(),
        };
        for i in 0..s.slots.len() {
            s.respawn(i)?;
        }
        Ok(s)
    }

    /// Starts one more worker; returns its slot index.
    pub fn add(
        &mut self,
        name: &str,
        binary: PathBuf,
        flags: WorkerFlags,
    ) -> std::io::Result<usize> {
        self.slots.push(Slot {
            name: name.to_owned(),
            binary,
            flags,
            child: None,
            paused: false,
            down: false,
            logs: Vec::new(),
            starts: 0,
        });
        let i = self.slots.len() - 1;
        self.respawn(i)?;
        Ok(i)
    }

    pub fn respawn(&mut self, i: usize) -> std::io::Result<()> {
        let (dir, id) = (self.log_dir.clone(), self.run_id.clone());
        self.slots[i].spawn(&dir, &id)
    }

    /// Restarts every worker that exited on its own; returns their names.
    pub fn reap(&mut self) -> Vec<String> {
        let mut restarted = Vec::new();
        for i in 0..self.slots.len() {
            if self.slots[i].down {
                continue;
            }
            let status = match self.slots[i].child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(st))) => Some(st.to_string()),
                None => Some("no process (an earlier start failed)".to_owned()),
                _ => None,
            };
            if let Some(st) = status {
                let slot = &self.slots[i];
                let log = slot
                    .logs
                    .last()
                    .map(|l| l.display().to_string())
                    .unwrap_or_default();
                let what = format!("{}: exited with {st} (log {log})", slot.name);
                tracing::warn!(%what, "worker died; restarting it");
                self.unexpected_exits.push(what);
                self.slots[i].child = None;
                match self.respawn(i) {
                    Ok(()) => restarted.push(self.slots[i].name.clone()),
                    Err(e) => {
                        tracing::error!(slot = %self.slots[i].name, error = %e, "cannot restart worker")
                    }
                }
            }
        }
        restarted
    }

    /// `kill -9` of slot `i` (reaped here, not counted as unexpected); the slot stays
    /// down until [`Supervisor::respawn`].
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.slots[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.slots[i].paused = false;
        self.slots[i].down = true;
    }

    pub fn sigstop(&mut self, i: usize) -> std::io::Result<bool> {
        let Some(pid) = self.slots[i].pid() else {
            return Ok(false);
        };
        let ok = signal(pid, "-STOP")?;
        self.slots[i].paused = ok;
        Ok(ok)
    }

    pub fn sigcont(&mut self, i: usize) -> std::io::Result<bool> {
        let Some(pid) = self.slots[i].pid() else {
            return Ok(false);
        };
        let ok = signal(pid, "-CONT")?;
        self.slots[i].paused = false;
        Ok(ok)
    }

    /// Every worker runs and none is stopped.
    pub fn all_running(&mut self) -> bool {
        self.slots.iter_mut().all(|s| {
            !s.paused
                && s.child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        })
    }

    /// SIGTERM to every worker; returns the names of those that exited cleanly within
    /// `timeout` (the others are killed).
    pub async fn terminate_all(&mut self, timeout: Duration) -> (Vec<String>, Vec<String>) {
        for s in &mut self.slots {
            if let Some(pid) = s.pid() {
                if s.paused {
                    let _ = signal(pid, "-CONT");
                    s.paused = false;
                }
                let _ = signal(pid, "-TERM");
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut clean, mut unclean) = (Vec::new(), Vec::new());
        for s in &mut self.slots {
            let Some(mut c) = s.child.take() else {
                continue;
            };
            loop {
                match c.try_wait() {
                    Ok(Some(st)) => {
                        if st.success() {
                            clean.push(s.name.clone());
                        } else {
                            unclean.push(format!("{}: {st}", s.name));
                        }
                        break;
                    }
                    Ok(None) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        unclean.push(format!("{}: did not stop within {timeout:?}", s.name));
                        break;
                    }
                }
            }
        }
        (clean, unclean)
    }

    pub fn logs(&self) -> Vec<String> {
        self.slots
            .iter()
            .flat_map(|s| s.logs.iter().map(|l| l.display().to_string()))
            .collect()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(mut c) = s.child.take() {
                if s.paused {
                    let _ = signal(c.id(), "-CONT");
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
