//! The volume's own durable-write latency, measured beside a run: a thread writes 4 KiB
//! at the end of a file of its own and waits for `fdatasync`, every [`EVERY`]. Redis
//! (`appendfsync always`) and PostgreSQL (each commit) wait for the same call on the same
//! volume before they answer, so a window whose probe waited 300 ms cannot have a p99
//! publish-to-outcome under it: the probe is the limit the run's latency is held against,
//! measured in the same run (on a shared machine the disk's stalls come and go).
//!
//! The file is truncated every [`ROTATE`] writes (it stays under a megabyte) and removed
//! when the probe is dropped.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One write and `fdatasync` this often: 200 KiB/s, nothing beside the pipeline's writes.
pub const EVERY: Duration = Duration::from_millis(20);
/// Writes between truncations.
const ROTATE: u32 = 200;
const BLOCK: [u8; 4096] = [0x5a; 4096];

/// A running probe; [`DiskProbe::take_window`] hands over what it measured so far.
pub struct DiskProbe {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<u32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskProbe {
    /// Starts probing the volume of `dir` (a file `.disk-probe-<pid>` in it).
    pub fn start(dir: &Path) -> Result<DiskProbe> {
        let path = dir.join(format!(".disk-probe-{}", std::process::id()));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("disk probe file {}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::Builder::new()
            .name("disk-probe".into())
            .spawn({
                let (stop, samples) = (stop.clone(), samples.clone());
                move || probe(file, &stop, &samples)
            })
            .context("disk probe thread")?;
        Ok(DiskProbe {
            path,
            stop,
            samples,
            thread: Some(thread),
        })
    }

    /// The waits (µs) of every write since the last call.
    pub fn take_window(&self) -> Vec<u32> {
        std::mem::take(&mut *lock(&self.samples))
    }
}

impl Drop for DiskProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock(s: &Mutex<Vec<u32>>) -> std::sync::MutexGuard<'_, Vec<u32>> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn probe(mut file: File, stop: &AtomicBool, samples: &Mutex<Vec<u32>>) {
    let mut written = 0u32;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let done = file.write_all(&BLOCK).and_then(|_| file.sync_data());
        let waited = t0.elapsed();
        if let Err(e) = done {
            tracing::warn!(error = %e, "disk probe: write failed; probe stopped");
            return;
        }
        lock(samples).push(u32::try_from(waited.as_micros()).unwrap_or(u32::MAX));
        written += 1;
        if written.is_multiple_of(ROTATE) {
            if let Err(e) = file.set_len(0).and_then(|_| file.seek(SeekFrom::Start(0))) {
                tracing::warn!(error = %e, "disk probe: truncate failed; probe stopped");
                return;
            }
        }
        // A stalled write is followed by the next one at once: the probe samples time,
        // not writes, as evenly as the disk lets it.
        next += EVERY;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_measures_its_writes_and_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("disk-probe-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let probe = DiskProbe::start(&dir).expect("probe");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        while seen.len() < 5 && Instant::now() < deadline {
            std::thread::sleep(EVERY);
            seen.extend(probe.take_window());
        }
        assert!(seen.len() >= 5, "five synced writes within 10 s: {seen:?}");
        assert!(seen.iter().all(|&us| us > 0), "{seen:?}");
        drop(probe);
        let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").collect();
        assert!(left.is_empty(), "the probe's file is removed: {left:?}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
