//! The cluster layout's view for a benchmark (Redis Cluster, several Kafka brokers): which
//! Redis node is a master, and how the Redis work of a measured span spread over the
//! masters, from `INFO commandstats` of each master before and after the span. Each node
//! is read over a connection of its own (not the cluster client, which would route `INFO`
//! to one node of its choice), with the administrator's credentials and TLS files.

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use stock_common::config::{RedisArgs, SecretUrl};
use stock_common::redis_store;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub host: String,
    pub port: u16,
    pub master: bool,
    /// Flagged `fail`, `fail?`, `handshake` or `noaddr`: not counted as a live master.
    pub failing: bool,
    /// Slot ranges served (masters), e.g. `0-5460`.
    pub slots: Vec<String>,
}

/// Parses `CLUSTER NODES` (one node per line:
/// `id ip:port@bus[,hostname] flags master ping pong epoch link slot...`).
pub fn parse_cluster_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            let flags: Vec<&str> = f[2].split(',').collect();
            Some(NodeInfo {
                id: f[0].to_owned(),
                host: host.to_owned(),
                port,
                master: flags.contains(&"master"),
                failing: flags
                    .iter()
                    .any(|g| matches!(*g, "fail" | "fail?" | "handshake" | "noaddr")),
                slots: f[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .map(|s| (*s).to_owned())
                    .collect(),
            })
        })
        .collect()
}

/// Calls and microseconds of one command, from `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CmdStat {
    pub calls: u64,
    pub usec: u64,
}

/// Parses `INFO commandstats`: `cmdstat_<name>:calls=N,usec=N,usec_per_call=F,...` per
/// line (sub-commands as `cmdstat_client|setname`); other lines are skipped.
pub fn parse_commandstats(text: &str) -> BTreeMap<String, CmdStat> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        let mut s = CmdStat::default();
        let mut seen = false;
        for kv in fields.split(',') {
            match kv.split_once('=') {
                Some(("calls", v)) => {
                    s.calls = v.parse().unwrap_or(0);
                    seen = true;
                }
                Some(("usec", v)) => s.usec = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        if seen {
            out.insert(name.to_ascii_lowercase(), s);
        }
    }
    out
}

/// `after - before` per command; a counter that went down (the node restarted, or
/// `CONFIG RESETSTAT`) counts from zero.
pub fn stats_delta(
    before: &BTreeMap<String, CmdStat>,
    after: &BTreeMap<String, CmdStat>,
) -> BTreeMap<String, CmdStat> {
    after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).copied().unwrap_or_default();
            let d = if a.calls < b.calls || a.usec < b.usec {
                *a
            } else {
                CmdStat {
                    calls: a.calls - b.calls,
                    usec: a.usec - b.usec,
                }
            };
            (k.clone(), d)
        })
        .filter(|(_, d)| d.calls > 0)
        .collect()
}

/// One master's part of the Redis work of a span.
#[derive(Debug, Clone, Serialize)]
pub struct MasterShare {
    pub port: u16,
    /// Slot ranges it served at the start of the span.
    pub slots: String,
    pub evalsha_calls: u64,
    pub eval_calls: u64,
    pub other_calls: u64,
    pub calls: u64,
    pub usec: u64,
    /// Microseconds of EVALSHA and EVAL alone.
    pub script_usec: u64,
    /// Share of all masters' calls and microseconds.
    pub calls_share: f64,
    pub usec_share: f64,
    /// Calls of each other command (WAIT, MGET, INFO, ...).
    pub others: BTreeMap<String, u64>,
}

/// Splits each master's deltas into script calls and the rest, with shares of the total.
pub fn shares(per_master: &[(u16, String, BTreeMap<String, CmdStat>)]) -> Vec<MasterShare> {
    let mut out: Vec<MasterShare> = per_master
        .iter()
        .map(|(port, slots, d)| {
            let get = |k: &str| d.get(k).copied().unwrap_or_default();
            let (evalsha, eval) = (get("evalsha"), get("eval"));
            let others: BTreeMap<String, u64> = d
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "evalsha" | "eval"))
                .map(|(k, s)| (k.clone(), s.calls))
                .collect();
            MasterShare {
                port: *port,
                slots: slots.clone(),
                evalsha_calls: evalsha.calls,
                eval_calls: eval.calls,
                other_calls: others.values().sum(),
                calls: d.values().map(|s| s.calls).sum(),
                usec: d.values().map(|s| s.usec).sum(),
                script_usec: evalsha.usec + eval.usec,
                calls_share: 0.0,
                usec_share: 0.0,
                others,
            }
        })
        .collect();
    let calls: u64 = out.iter().map(|m| m.calls).sum();
    let usec: u64 = out.iter().map(|m| m.usec).sum();
    for m in &mut out {
        m.calls_share = m.calls as f64 / calls.max(1) as f64;
        m.usec_share = m.usec as f64 / usec.max(1) as f64;
    }
    out
}

/// "7001 34% / 7002 33% / ..." of calls (or microseconds with `usec`).
pub fn describe_shares(masters: &[MasterShare], usec: bool) -> String {
    masters
        .iter()
        .map(|m| {
            let (n, share) = if usec {
                (m.usec, m.usec_share)
            } else {
                (m.calls, m.calls_share)
            };
            format!("{} {} ({:.0}%)", m.port, n, 100.0 * share)
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// What a bench run on the cluster layout adds to its figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterFigures {
    /// Every master was emptied (`FLUSHALL`) before the run, and again after it.
    pub emptied: bool,
    /// Redis nodes at the start of the span: port and role (`master` / `replica`).
    pub redis_nodes: Vec<(u16, &'static str)>,
    /// Kafka brokers' client ports (from the bootstrap list).
    pub kafka_ports: Vec<u16>,
    /// Each master's share of the Redis work of the measured span.
    pub masters: Vec<MasterShare>,
}

/// The client ports of a `host:port,host:port` bootstrap list.
pub fn broker_ports(brokers: &str) -> Vec<u16> {
    brokers
        .split(',')
        .filter_map(|b| b.trim().rsplit_once(':')?.1.parse().ok())
        .collect()
}

/// Reads every node of a Redis Cluster, one connection each.
pub struct ClusterProbe {
    args: RedisArgs,
    /// `redis` or `rediss`, from the seed URLs.
    scheme: String,
    nodes: Vec<NodeInfo>,
    conns: BTreeMap<u16, redis::aio::MultiplexedConnection>,
}

/// `INFO commandstats` of each master at one instant.
pub struct StatsSample {
    per_master: Vec<(u16, String, BTreeMap<String, CmdStat>)>,
}

impl ClusterProbe {
    /// Connects to the seeds of `admin.cluster_nodes`, reads `CLUSTER NODES` from the
    /// first that answers, then connects to every node it lists.
    pub async fn connect(admin: &RedisArgs) -> Result<Self> {
        let scheme = admin
            .cluster_nodes
            .first()
            .and_then(|u| u.split_once("://"))
            .map_or("redis", |(s, _)| s)
            .to_owned();
        let mut probe = ClusterProbe {
            args: admin.clone(),
            scheme,
            nodes: Vec::new(),
            conns: BTreeMap::new(),
        };
        let mut last_err = anyhow!("no cluster node given");
        for seed in &admin.cluster_nodes {
            match probe.view_from(seed).await {
                Ok(nodes) if !nodes.is_empty() => {
                    probe.nodes = nodes;
                    break;
                }
                Ok(_) => last_err = anyhow!("{seed}: empty CLUSTER NODES"),
                Err(e) => last_err = e,
            }
        }
        if probe.nodes.is_empty() {
            return Err(last_err.context("reading CLUSTER NODES"));
        }
        let nodes = probe.nodes.clone();
        for n in nodes.iter().filter(|n| !n.failing) {
            let url = format!("{}://{}:{}/0", probe.scheme, n.host, n.port);
            let conn = probe.connect_one(&url).await?;
            probe.conns.insert(n.port, conn);
        }
        Ok(probe)
    }

    async fn connect_one(&self, url: &str) -> Result<redis::aio::MultiplexedConnection> {
        let args = RedisArgs {
            url: url
                .parse::<SecretUrl>()
                .map_err(|e| anyhow!("node URL {url}: {e}"))?,
            cluster_nodes: Vec::new(),
            ..self.args.clone()
        };
        let client = redis_store::client(&args).with_context(|| format!("client for {url}"))?;
        redis_store::raw_connection(&client)
            .await
            .with_context(|| format!("connecting to {url}"))
    }

    async fn view_from(&self, seed: &str) -> Result<Vec<NodeInfo>> {
        let url = if seed.trim_end_matches('/').matches('/').count() > 2 {
            seed.to_owned()
        } else {
            format!("{}/0", seed.trim_end_matches('/'))
        };
        let mut conn = self.connect_one(&url).await?;
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .with_context(|| format!("CLUSTER NODES on {seed}"))?;
        Ok(parse_cluster_nodes(&text))
    }

    /// Live nodes, by port, with their role.
    pub fn roles(&self) -> Vec<(u16, &'static str)> {
        let mut v: Vec<(u16, &'static str)> = self
            .nodes
            .iter()
            .filter(|n| !n.failing)
            .map(|n| (n.port, if n.master { "master" } else { "replica" }))
            .collect();
        v.sort_unstable();
        v
    }

    fn masters(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.iter().filter(|n| n.master && !n.failing)
    }

    /// `INFO commandstats` of every live master.
    pub async fn sample(&self) -> Result<StatsSample> {
        let mut per_master = Vec::new();
        for m in self.masters() {
            let mut conn = self
                .conns
                .get(&m.port)
                .cloned()
                .ok_or_else(|| anyhow!("no connection to master {}", m.port))?;
            let text: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn)
                .await
                .with_context(|| format!("INFO commandstats on {}", m.port))?;
            per_master.push((m.port, m.slots.join(","), parse_commandstats(&text)));
        }
        Ok(StatsSample { per_master })
    }
}

/// Each master's share of the work between two samples (masters of `before`).
pub fn between(before: &StatsSample, after: &StatsSample) -> Vec<MasterShare> {
    let deltas: Vec<(u16, String, BTreeMap<String, CmdStat>)> = before
        .per_master
        .iter()
        .map(|(port, slots, b)| {
            let a = after
                .per_master
                .iter()
                .find(|(p, _, _)| p == port)
                .map(|(_, _, a)| stats_delta(b, a))
                .unwrap_or_default();
            (*port, slots.clone(), a)
        })
        .collect();
    shares(&deltas)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:7004@17004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:7002@17002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:7003@17003 master - 0 1426238318243 3 connected 10923-16383 [123->-abc]
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:7001@17001,host1 myself,master - 0 0 1 connected 0-5460
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:7005@17005 master,fail - 1426238316232 0 5 disconnected
";

    #[test]
    fn parses_cluster_nodes() {
        let n = parse_cluster_nodes(NODES);
        assert_eq!(n.len(), 5);
        let by_port = |p: u16| n.iter().find(|x| x.port == p).cloned();
        let m1 = by_port(7001).unwrap_or_else(|| panic!("7001 in {n:?}"));
        assert!(m1.master && !m1.failing);
        assert_eq!(m1.host, "127.0.0.1");
        assert_eq!(m1.slots, vec!["0-5460"]);
        let r = by_port(7004).unwrap_or_else(|| panic!("7004 in {n:?}"));
        assert!(!r.master && r.slots.is_empty());
        let m3 = by_port(7003).unwrap_or_else(|| panic!("7003 in {n:?}"));
        assert_eq!(m3.slots, vec!["10923-16383"], "migrating markers left out");
        let dead = by_port(7005).unwrap_or_else(|| panic!("7005 in {n:?}"));
        assert!(dead.master && dead.failing);
        assert!(parse_cluster_nodes("garbage\n\n").is_empty());
    }

    const STATS: &str = "# Commandstats\r
cmdstat_evalsha:calls=1200,usec=360000,usec_per_call=300.00,rejected_calls=0,failed_calls=2\r
cmdstat_eval:calls=3,usec=900,usec_per_call=300.00,rejected_calls=0,failed_calls=0\r
cmdstat_wait:calls=40,usec=80,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r
cmdstat_client|setname:calls=2,usec=4,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r
cmdstat_info:calls=5,usec=500,usec_per_call=100.00,rejected_calls=0,failed_calls=0\r
";

    #[test]
    fn parses_commandstats() {
        let s = parse_commandstats(STATS);
        assert_eq!(s.len(), 5);
        assert_eq!(
            s.get("evalsha"),
            Some(&CmdStat {
                calls: 1200,
                usec: 360_000
            })
        );
        assert_eq!(s.get("client|setname").map(|c| c.calls), Some(2));
        assert!(parse_commandstats("# Commandstats\r\n").is_empty());
        assert!(parse_commandstats("cmdstat_x:nonsense").is_empty());
    }

    #[test]
    fn deltas_and_shares() {
        let before = parse_commandstats(STATS);
        let mut after = before.clone();
        after.insert(
            "evalsha".into(),
            CmdStat {
                calls: 1500,
                usec: 450_000,
            },
        );
        after.insert(
            "wait".into(),
            CmdStat {
                calls: 50,
                usec: 100,
            },
        );
        let d = stats_delta(&before, &after);
        assert_eq!(
            d.get("evalsha"),
            Some(&CmdStat {
                calls: 300,
                usec: 90_000
            })
        );
        assert_eq!(d.len(), 2, "unchanged commands are left out: {d:?}");
        // A restarted node counts from zero.
        let mut reset = BTreeMap::new();
        reset.insert("evalsha".to_owned(), CmdStat { calls: 7, usec: 70 });
        assert_eq!(
            stats_delta(&before, &reset).get("evalsha").map(|c| c.calls),
            Some(7)
        );

        let mut other = BTreeMap::new();
        other.insert(
            "evalsha".to_owned(),
            CmdStat {
                calls: 100,
                usec: 10_000,
            },
        );
        let s = shares(&[
            (7001, "0-5460".into(), d),
            (7002, "5461-10922".into(), other),
        ]);
        assert_eq!(s[0].evalsha_calls, 300);
        assert_eq!(s[0].other_calls, 10);
        assert_eq!(s[0].calls, 310);
        assert_eq!(s[0].usec, 90_020);
        assert_eq!(s[0].script_usec, 90_000);
        assert!((s[0].calls_share - 310.0 / 410.0).abs() < 1e-9);
        assert!((s[0].usec_share + s[1].usec_share - 1.0).abs() < 1e-9);
        assert_eq!(s[1].others.len(), 0);
        assert_eq!(
            describe_shares(&s, false),
            "7001 310 (76%) / 7002 100 (24%)"
        );
        // No work at all: shares are zero, not NaN.
        let idle = shares(&[(7001, String::new(), BTreeMap::new())]);
        assert_eq!(idle[0].calls_share, 0.0);
    }

    #[test]
    fn broker_ports_of_a_bootstrap_list() {
        assert_eq!(
            broker_ports("127.0.0.1:9292, 127.0.0.1:9293,localhost:9294"),
            vec![9292, 9293, 9294]
        );
        assert_eq!(broker_ports("nohost"), Vec::<u16>::new());
    }
}
