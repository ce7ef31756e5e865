//! CPU time of each part of the stack over a measured span, from `/proc` (Linux): where the
//! box's cores go during a benchmark. Processes are grouped by name: `java` (Kafka),
//! `postgres` (every backend and helper), `redis-server`, and this process (the workers,
//! the load generator and the result collector). A PostgreSQL backend that exits during
//! the span takes its CPU time with it; the pools keep theirs open, so this is small.

use serde::Serialize;
use std::collections::BTreeMap;
use tokio::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds used so far by each group, at one instant.
#[derive(Debug, Clone)]
pub struct CpuSample {
    at: Instant,
    secs: BTreeMap<&'static str, f64>,
}

/// CPU seconds each group used over a span, and that as a share of every core's time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUse {
    pub span_secs: f64,
    pub cores: usize,
    pub secs: BTreeMap<&'static str, f64>,
}

impl CpuUse {
    /// "kafka 1.2 s (30%), postgres …" — share of all cores over the span.
    pub fn describe(&self) -> String {
        let total = self.span_secs * self.cores as f64;
        let mut parts: Vec<String> = self
            .secs
            .iter()
            .map(|(k, v)| format!("{k} {v:.1} s ({:.0}%)", 100.0 * v / total.max(1e-9)))
            .collect();
        let used: f64 = self.secs.values().sum();
        parts.push(format!("all {:.0}%", 100.0 * used / total.max(1e-9)));
        parts.join(", ")
    }
}

/// Which group a process belongs to, by its command name.
fn group(comm: &str, pid: u32, me: u32) -> Option<&'static str> {
    if pid == me {
        return Some("bench");
    }
    match comm {
        "java" => Some("kafka"),
        "postgres" => Some("postgres"),
        "redis-server" => Some("redis"),
        _ => None,
    }
}

/// utime + stime of one `/proc/<pid>/stat` line, in ticks.
fn ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: skip past it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub fn sample() -> CpuSample {
    let me = std::process::id();
    let mut secs: BTreeMap<&'static str, f64> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let Some(g) = group(comm.trim(), pid, me) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            if let Some(t) = ticks(&stat) {
                *secs.entry(g).or_default() += t as f64 / TICKS;
            }
        }
    }
    CpuSample {
        at: Instant::now(),
        secs,
    }
}

/// What each group used between two samples.
pub fn between(before: &CpuSample, after: &CpuSample) -> CpuUse {
    let secs = after
        .secs
        .iter()
        .map(|(k, v)| {
            (
                *k,
                (v - before.secs.get(k).copied().unwrap_or(0.0)).max(0.0),
            )
        })
        .collect();
    CpuUse {
        span_secs: after.at.duration_since(before.at).as_secs_f64(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_times_past_a_name_with_spaces() {
        let stat = "42 (my proc) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(ticks(stat), Some(300));
        assert_eq!(ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_seen() {
        let a = sample();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let b = sample();
        let u = between(&a, &b);
        assert!(u.secs.contains_key("bench"), "{u:?}");
        assert!(u.span_secs > 0.0);
    }
}
