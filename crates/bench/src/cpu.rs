//! CPU time of each part of the stack over a measured span, from `/proc` (Linux): where the
//! box's cores go during a benchmark. Processes are grouped by name: `java` (Kafka),
//! `postgres` (every backend and helper), `redis-server`, and this process (the load
//! generator and the result collector, and the workers when they run in this process).
//! Worker processes this bench spawned are counted by PID ([`Proc`]), each on its own and
//! summed per kind (`producer`, `consumer`): never by name, so that another run's workers
//! on the box are not counted. A service's process also counts the CPU of its children that
//! have exited (`cutime` + `cstime`): an autovacuum worker or a backend that ends, a Redis
//! snapshot child. Without them a group's sum falls when such a child exits, and the span
//! that sees it shows too little, or nothing.
//!
//! [`PerOrder`] turns a span's seconds into CPU µs per order, with the pipeline's total:
//! Kafka + PostgreSQL + Redis + the worker processes, this process excluded.
//!
//! Each Redis server and Kafka broker is also counted on its own, by the port it serves
//! (`redis:7001`, `kafka:9292`): a Redis server's port from its process title
//! (`redis-server 127.0.0.1:7001 [cluster]`), a broker's from the `server.properties` named
//! on its command line (its advertised client listener). Every layout's nodes that run
//! are counted, in the groups too (an idle layout's nodes add their small idle CPU).

use serde::Serialize;
use std::collections::BTreeMap;
use tokio::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// A worker process to count on its own: its kind (`producer`, `consumer`), its name
/// (`producer-1`) and PID.
#[derive(Debug, Clone)]
pub struct Proc {
    pub kind: &'static str,
    pub name: String,
    pub pid: u32,
}

/// CPU seconds used so far by each group, at one instant.
#[derive(Debug, Clone)]
pub struct CpuSample {
    at: Instant,
    secs: BTreeMap<&'static str, f64>,
    nodes: BTreeMap<String, f64>,
    procs: BTreeMap<String, f64>,
}

/// CPU seconds each group used over a span, and that as a share of every core's time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUse {
    pub span_secs: f64,
    pub cores: usize,
    pub secs: BTreeMap<&'static str, f64>,
    /// CPU seconds of each Redis server and Kafka broker (`redis:<port>`, `kafka:<port>`).
    pub nodes: BTreeMap<String, f64>,
    /// CPU seconds of each worker process (`producer-1`, `consumer-1`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub procs: BTreeMap<String, f64>,
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

    /// CPU µs per order of each part, `orders` being the orders of the span.
    pub fn per_order(&self, orders: usize) -> PerOrder {
        PerOrder::of(&self.secs, &self.procs, orders)
    }
}

/// CPU µs per order of each part of the stack over a span (one JSON object).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PerOrder {
    /// The producer processes, summed; None when the workers ran in the bench process.
    pub producers: Option<f64>,
    /// The consumer processes, summed; None when the workers ran in the bench process.
    pub consumers: Option<f64>,
    /// This process: the load generator and the result collector (and the workers when
    /// they ran in it).
    pub bench: f64,
    pub postgres: f64,
    pub redis: f64,
    pub kafka: f64,
    /// Kafka + PostgreSQL + Redis + producers + consumers, the bench process excluded;
    /// None when the workers ran in the bench process (they cannot be told apart from it).
    pub pipeline: Option<f64>,
    /// Each worker process (`producer-1`, …).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub per_process: BTreeMap<String, f64>,
}

impl PerOrder {
    /// From CPU seconds per group and per worker process, over `orders` orders.
    pub fn of(
        secs: &BTreeMap<&'static str, f64>,
        procs: &BTreeMap<String, f64>,
        orders: usize,
    ) -> PerOrder {
        let us = |s: f64| 1e6 * s / orders.max(1) as f64;
        let get = |k: &str| us(secs.get(k).copied().unwrap_or(0.0));
        let workers = |k: &str| secs.get(k).map(|s| us(*s));
        let (producers, consumers) = (workers("producer"), workers("consumer"));
        let services = get("kafka") + get("postgres") + get("redis");
        PerOrder {
            producers,
            consumers,
            bench: get("bench"),
            postgres: get("postgres"),
            redis: get("redis"),
            kafka: get("kafka"),
            pipeline: match (producers, consumers) {
                (Some(p), Some(c)) => Some(services + p + c),
                _ => None,
            },
            per_process: procs.iter().map(|(k, s)| (k.clone(), us(*s))).collect(),
        }
    }

    /// "producer 12.3 / consumer 45.6 / bench 7.8", "-" for a figure not measured.
    pub fn describe_workers(&self) -> String {
        format!(
            "{} / {} / {:.1}",
            opt(self.producers),
            opt(self.consumers),
            self.bench
        )
    }

    pub fn describe_services(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1}",
            self.postgres, self.redis, self.kafka
        )
    }

    pub fn describe_pipeline(&self) -> String {
        match self.pipeline {
            Some(p) => format!("{p:.1}"),
            None => "- (workers in bench)".into(),
        }
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

/// Resident memory (VmRSS) of process `pid`, in bytes; None when it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    vm_rss(&status)
}

/// VmRSS of a `/proc/<pid>/status` text, in bytes.
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Whether process `pid` has ended (gone, or a zombie not reaped yet).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => state(&stat).is_none_or(|c| c == 'Z' || c == 'X'),
        Err(_) => true,
    }
}

/// The state letter (field 3) of a `/proc/<pid>/stat` line.
fn state(stat: &str) -> Option<char> {
    stat.get(stat.rfind(')')? + 2..)?.chars().next()
}

/// Which group a process belongs to, by its command name (and, for `java`, its command
/// line: only a broker is Kafka, not a command-line tool).
fn group(comm: &str, pid: u32, me: u32, cmdline: &dyn Fn() -> String) -> Option<&'static str> {
    if pid == me {
        return Some("bench");
    }
    match comm {
        "java" if cmdline().split(['\0', ' ']).any(|a| a == "kafka.Kafka") => Some("kafka"),
        "postgres" => Some("postgres"),
        "redis-server" => Some("redis"),
        _ => None,
    }
}

/// The node a process of `group` is, from its command line (NULs between arguments) and,
/// for a Kafka broker, the text of the properties file it names (`props`).
fn node_key(group: &str, cmdline: &str, props: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let args: Vec<&str> = cmdline
        .split(['\0', ' '])
        .filter(|a| !a.is_empty())
        .collect();
    match group {
        "redis" => {
            // The process title: `redis-server 127.0.0.1:6379`, `redis-server *:7001 [cluster]`.
            let port = args
                .iter()
                .skip(1)
                .find_map(|a| a.rsplit_once(':')?.1.parse::<u16>().ok())?;
            Some(format!("redis:{port}"))
        }
        "kafka" if args.contains(&"kafka.Kafka") => {
            let path = args.iter().rev().find(|a| a.ends_with(".properties"))?;
            let port = kafka_port(&props(path)?)?;
            Some(format!("kafka:{port}"))
        }
        _ => None,
    }
}

/// The client port of a broker's `server.properties`: the first advertised listener (or
/// the first listener that is not a controller's).
fn kafka_port(props: &str) -> Option<u16> {
    let get = |key: &str| {
        props.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    };
    let controllers = get("controller.listener.names").unwrap_or_default();
    let controllers: Vec<&str> = controllers.split(',').map(str::trim).collect();
    let listeners = get("advertised.listeners")
        .filter(|v| !v.is_empty())
        .or_else(|| get("listeners"))?;
    listeners.split(',').find_map(|l| {
        let (name, addr) = l.trim().split_once("://")?;
        if controllers.contains(&name) {
            return None;
        }
        addr.rsplit_once(':')?.1.parse().ok()
    })
}

/// Sums each node's seconds: `(node, seconds)` of every process counted as a node.
fn by_node(procs: impl IntoIterator<Item = (String, f64)>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (k, s) in procs {
        *out.entry(k).or_default() += s;
    }
    out
}

/// utime + stime of one `/proc/<pid>/stat` line, in ticks.
fn ticks(stat: &str) -> Option<u64> {
    stat_fields(stat, 2)
}

/// utime + stime + cutime + cstime (the process and its children that have exited and
/// were waited for), in ticks.
fn ticks_with_children(stat: &str) -> Option<u64> {
    stat_fields(stat, 4)
}

/// The sum of `n` fields of a `/proc/<pid>/stat` line from utime (field 14) on.
fn stat_fields(stat: &str, n: usize) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: skip past it.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime, stime, cutime and cstime are fields 14 to 17.
    (11..11 + n).try_fold(0u64, |sum, i| Some(sum + f.get(i)?.parse::<u64>().ok()?))
}

/// CPU seconds so far of every group (no worker process counted on its own).
pub fn sample() -> CpuSample {
    sample_with(&[])
}

/// CPU seconds so far of every group, and of each of `workers` (by PID) in its kind.
pub fn sample_with(workers: &[Proc]) -> CpuSample {
    let me = std::process::id();
    let mut secs: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut procs = BTreeMap::new();
    for w in workers {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", w.pid)).unwrap_or_default();
        // A worker gone already counts as nothing (its kind is still shown).
        let s = ticks(&stat).map_or(0.0, |t| t as f64 / TICKS);
        *secs.entry(w.kind).or_default() += s;
        procs.insert(w.name.clone(), s);
    }
    let mut nodes = Vec::new();
    let props = |p: &str| std::fs::read_to_string(p).ok();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if workers.iter().any(|w| w.pid == pid) {
                continue;
            }
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let cmdline = || std::fs::read_to_string(e.path().join("cmdline")).unwrap_or_default();
            let Some(g) = group(comm.trim(), pid, me, &cmdline) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // This process's exited children are the workers it ran: counted on their own.
            let t = if g == "bench" {
                ticks(&stat)
            } else {
                ticks_with_children(&stat)
            };
            let Some(t) = t else {
                continue;
            };
            let s = t as f64 / TICKS;
            *secs.entry(g).or_default() += s;
            if g == "redis" || g == "kafka" {
                if let Some(k) = node_key(g, &cmdline(), &props) {
                    nodes.push((k, s));
                }
            }
        }
    }
    CpuSample {
        at: Instant::now(),
        secs,
        nodes: by_node(nodes),
        procs,
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
    let diff = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
        a.iter()
            .map(|(k, v)| (k.clone(), (v - b.get(k).copied().unwrap_or(0.0)).max(0.0)))
            .collect()
    };
    CpuUse {
        span_secs: after.at.duration_since(before.at).as_secs_f64(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        secs,
        nodes: diff(&after.nodes, &before.nodes),
        procs: diff(&after.procs, &before.procs),
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
        let parent = "42 (postgres) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 700 25 20 0 1 0";
        assert_eq!(ticks_with_children(parent), Some(1025));
        assert_eq!(ticks_with_children(stat), Some(300));
    }

    #[test]
    fn only_a_broker_is_kafka() {
        let me = std::process::id();
        let broker = || "java\0-Xmx1g\0kafka.Kafka\0/s/server.properties\0".to_owned();
        let tool = || "java\0-cp\0x\0org.apache.kafka.tools.TopicCommand\0".to_owned();
        assert_eq!(group("java", 1, me, &broker), Some("kafka"));
        assert_eq!(group("java", 1, me, &tool), None);
        assert_eq!(group("postgres", 1, me, &tool), Some("postgres"));
        assert_eq!(group("anything", me, me, &tool), Some("bench"));
    }

    #[test]
    fn redis_servers_by_port() {
        let none = |_: &str| None;
        let key = |c: &str| node_key("redis", c, &none);
        assert_eq!(
            key("redis-server 127.0.0.1:7001 [cluster]\0\0\0\0").as_deref(),
            Some("redis:7001")
        );
        assert_eq!(key("redis-server *:6379").as_deref(), Some("redis:6379"));
        assert_eq!(
            key("/usr/bin/redis-server\0/etc/redis.conf\0").as_deref(),
            None,
            "no port in the title"
        );
        assert_eq!(node_key("postgres", "postgres: walwriter", &none), None);
    }

    const PROPS: &str = "\
# generated
node.id=2
controller.listener.names=CONTROLLER
listeners=CONTROLLER://127.0.0.1:9394,PLAINTEXT://127.0.0.1:9293
advertised.listeners=PLAINTEXT://127.0.0.1:9293
";

    #[test]
    fn kafka_brokers_by_port() {
        assert_eq!(kafka_port(PROPS), Some(9293));
        let no_adv = PROPS.replace("advertised.listeners=PLAINTEXT://127.0.0.1:9293\n", "");
        assert_eq!(
            kafka_port(&no_adv),
            Some(9293),
            "controller listener skipped"
        );
        assert_eq!(kafka_port("node.id=1\n"), None);
        let props =
            |p: &str| (p == "/s/cluster/kafka/2/server.properties").then(|| PROPS.to_owned());
        let java = "java\0-Xmx384m\0-cp\0/s/kafka/libs/*\0kafka.Kafka\0/s/cluster/kafka/2/server.properties\0";
        assert_eq!(
            node_key("kafka", java, &props).as_deref(),
            Some("kafka:9293")
        );
        // A Java tool is not a broker; a broker whose file cannot be read is not counted.
        let tool = "java\0-cp\0x\0org.apache.kafka.tools.TopicCommand\0--describe\0";
        assert_eq!(node_key("kafka", tool, &props), None);
        let other = java.replace("/2/", "/3/");
        assert_eq!(node_key("kafka", &other, &props), None);
    }

    #[test]
    fn pids_of_one_node_are_summed() {
        let n = by_node([
            ("redis:7001".to_owned(), 1.5),
            ("kafka:9292".to_owned(), 2.0),
            ("redis:7001".to_owned(), 0.5),
        ]);
        assert_eq!(n.get("redis:7001"), Some(&2.0));
        assert_eq!(n.get("kafka:9292"), Some(&2.0));
        assert_eq!(n.len(), 2);
    }

    #[test]
    fn per_order_pipeline_excludes_the_bench() {
        let secs: BTreeMap<&'static str, f64> = [
            ("bench", 5.0),
            ("postgres", 2.0),
            ("redis", 1.0),
            ("kafka", 1.0),
            ("producer", 0.5),
            ("consumer", 1.5),
        ]
        .into();
        let procs: BTreeMap<String, f64> = [("producer-1".to_owned(), 0.5)].into();
        let p = PerOrder::of(&secs, &procs, 1_000_000);
        assert_eq!(p.pipeline, Some(6.0));
        assert_eq!(
            (p.producers, p.consumers, p.bench),
            (Some(0.5), Some(1.5), 5.0)
        );
        assert_eq!(p.per_process.get("producer-1"), Some(&0.5));
        // Workers inside the bench: no pipeline total.
        let in_bench: BTreeMap<&'static str, f64> = [("bench", 7.0), ("postgres", 2.0)].into();
        let p = PerOrder::of(&in_bench, &BTreeMap::new(), 1_000_000);
        assert_eq!((p.producers, p.pipeline), (None, None));
        assert_eq!(p.describe_pipeline(), "- (workers in bench)");
    }

    #[test]
    fn reads_rss_and_state() {
        let status = "Name:\tproducer\nVmPeak:\t  9000 kB\nVmRSS:\t   1234 kB\nThreads: 9\n";
        assert_eq!(vm_rss(status), Some(1234 * 1024));
        assert_eq!(vm_rss("Name: x\n"), None);
        assert_eq!(state("42 (a b) Z 1 2"), Some('Z'));
        assert!(!exited(std::process::id()));
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
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
