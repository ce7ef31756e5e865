//! Worker settings for tests, benchmarks and the demo, built one way: as the flags a user
//! would type, parsed by the binaries' own clap definitions ([`ProducerArgs`],
//! [`ConsumerArgs`]). Whatever is not given is the real default, so a setting added to a
//! binary later reaches every test with no change here.
//!
//! No environment leaks in: in this process the flags are parsed with every environment
//! fallback of the definitions removed ([`WorkerFlags::producer`], [`WorkerFlags::consumer`]);
//! a child process gets the same flags with each of those variables removed from its
//! environment ([`WorkerFlags::command`]). A test's shell with `BATCH_SIZE` or
//! `RESERVATION_TTL` set runs the same workers as one without.

use clap::{CommandFactory, FromArgMatches, ValueEnum};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use stock_common::config::{BatchArgs, DatabaseArgs, KafkaArgs, RedisArgs, Topics};
use stock_consumer::ConsumerArgs;
use stock_producer::ProducerArgs;

/// Which worker binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worker {
    Producer,
    Consumer,
}

impl Worker {
    /// The binary's name (`producer`, `consumer`).
    pub fn binary(self) -> &'static str {
        match self {
            Worker::Producer => "producer",
            Worker::Consumer => "consumer",
        }
    }

    /// The binary's clap definition.
    fn definition(self) -> clap::Command {
        match self {
            Worker::Producer => ProducerArgs::command(),
            Worker::Consumer => ConsumerArgs::command(),
        }
    }

    /// The binary's clap definition without its environment fallbacks.
    fn command(self) -> clap::Command {
        self.definition().mut_args(|a| a.env(None))
    }

    /// Every environment variable the binary's settings fall back to.
    fn env_vars(self) -> Vec<String> {
        self.definition()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect()
    }
}

impl std::str::FromStr for Worker {
    type Err = String;
    /// A binary's name: `producer` or `consumer`.
    fn from_str(s: &str) -> Result<Worker, String> {
        match s {
            "producer" => Ok(Worker::Producer),
            "consumer" => Ok(Worker::Consumer),
            _ => Err(format!("no worker binary named {s:?}")),
        }
    }
}

/// Where a worker connects: a test's, benchmark's or demo's slice of the stack.
#[derive(Clone, Copy)]
pub struct Wiring<'a> {
    pub kafka: &'a KafkaArgs,
    pub topics: &'a Topics,
    /// For the producer.
    pub redis: &'a RedisArgs,
    /// For the consumer.
    pub db: &'a DatabaseArgs,
}

/// One worker's command line: `--flag value` pairs, later ones replacing earlier ones.
#[derive(Debug, Clone)]
pub struct WorkerFlags {
    worker: Worker,
    flags: Vec<(String, String)>,
}

impl WorkerFlags {
    /// `worker` on `wiring` in consumer group `group`, with its metrics endpoint off and (for
    /// the consumer) no migrations, as every harness here migrates before starting workers.
    /// Everything else is the binary's default; change it with [`WorkerFlags::set`].
    pub fn new(worker: Worker, wiring: Wiring<'_>, group: &str) -> WorkerFlags {
        let mut f = WorkerFlags {
            worker,
            flags: Vec::new(),
        };
        let k = wiring.kafka;
        f = f.set("--kafka-brokers", &k.brokers).set(
            "--kafka-security-protocol",
            k.security_protocol
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
        );
        f = f.set("--kafka-sasl-mechanism", &k.sasl_mechanism);
        f = f.set_some("--kafka-username", k.username.as_ref());
        f = f.set_path("--kafka-password-file", &k.password_file);
        f = f.set_path("--kafka-ca-file", &k.ca_file);
        f = f.set_path("--kafka-cert-file", &k.cert_file);
        f = f.set_path("--kafka-key-file", &k.key_file);
        if !k.options.is_empty() {
            f = f.set("--kafka-option", k.options.join(","));
        }
        f = f.set("--kafka-stall-timeout", duration(k.stall_timeout));
        let t = wiring.topics;
        f = f
            .set("--topic-orders", &t.orders)
            .set("--topic-deduct", &t.deduct)
            .set("--topic-compensate", &t.compensate)
            .set("--topic-results", &t.results)
            .set("--topic-dlq", &t.dlq)
            .set("--group", group)
            .set("--metrics-addr", "off");
        match worker {
            Worker::Producer => {
                let r = wiring.redis;
                f.set("--redis-url", r.url.expose())
                    .set("--order-memory", duration(r.order_memory))
                    .set("--orders-per-call", r.orders_per_call)
                    .set("--redis-connections", r.connections)
                    .set_some(
                        "--redis-cluster-nodes",
                        (!r.cluster_nodes.is_empty()).then(|| r.cluster_nodes.join(",")),
                    )
                    .set_some("--redis-username", r.username.as_ref())
                    .set_path("--redis-password-file", &r.password_file)
                    .set_path("--redis-ca-file", &r.ca_file)
                    .set_path("--redis-cert-file", &r.cert_file)
                    .set_path("--redis-key-file", &r.key_file)
            }
            Worker::Consumer => {
                let d = wiring.db;
                f.set("--database-url", d.url.expose())
                    .set("--database-max-connections", d.max_connections)
                    .set("--migrate", false)
                    .set_path("--database-password-file", &d.password_file)
                    .set_path("--database-ca-file", &d.ca_file)
                    .set_path("--database-cert-file", &d.cert_file)
                    .set_path("--database-key-file", &d.key_file)
            }
        }
    }

    /// Sets `flag` when `value` is given.
    fn set_some(self, flag: &str, value: Option<impl ToString>) -> WorkerFlags {
        match value {
            Some(v) => self.set(flag, v),
            None => self,
        }
    }

    /// Sets `flag` to a file's path when one is given.
    fn set_path(self, flag: &str, path: &Option<std::path::PathBuf>) -> WorkerFlags {
        self.set_some(flag, path.as_ref().map(|p| p.display()))
    }

    /// Sets `flag` (e.g. `--batch-size`) to `value`, replacing an earlier value.
    pub fn set(mut self, flag: &str, value: impl ToString) -> WorkerFlags {
        self.flags.retain(|(k, _)| k != flag);
        self.flags.push((flag.to_owned(), value.to_string()));
        self
    }

    /// The batch settings as flags.
    pub fn batch(self, batch: &BatchArgs) -> WorkerFlags {
        self.set("--batch-size", batch.batch_size)
            .set("--batch-linger", duration(batch.linger))
            .set("--pipeline-depth", batch.pipeline_depth)
    }

    pub fn worker(&self) -> Worker {
        self.worker
    }

    /// The command line after the binary's name.
    pub fn args(&self) -> Vec<String> {
        self.flags
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect()
    }

    fn matches(&self) -> Result<clap::ArgMatches, clap::Error> {
        let argv = std::iter::once(self.worker.binary().to_owned()).chain(self.args());
        self.worker.command().try_get_matches_from(argv)
    }

    /// The producer's settings, parsed from these flags by its own definition.
    pub fn producer(&self) -> Result<ProducerArgs, clap::Error> {
        assert_eq!(self.worker, Worker::Producer, "flags of another worker");
        ProducerArgs::from_arg_matches(&self.matches()?)
    }

    /// The consumer's settings, parsed from these flags by its own definition.
    pub fn consumer(&self) -> Result<ConsumerArgs, clap::Error> {
        assert_eq!(self.worker, Worker::Consumer, "flags of another worker");
        ConsumerArgs::from_arg_matches(&self.matches()?)
    }

    /// `binary` with these flags, and without any of the environment variables the worker's
    /// settings fall back to. Settings whose environment values the definitions hide
    /// (`hide_env_values`: the URLs, `--kafka-option`, which may hold passwords) go in their
    /// environment variable instead, as the README tells users, so that no password shows
    /// in a process list. The flags are checked first (parsed here), so a mistake fails in
    /// the caller rather than as a child's exit status.
    pub fn command(&self, binary: &Path) -> Result<Command, clap::Error> {
        self.matches()?;
        let definition = self.worker.definition();
        let mut cmd = Command::new(binary);
        for var in self.worker.env_vars() {
            cmd.env_remove(var);
        }
        // Passwords are no settings of the definitions: a child reads its own from the
        // files named by its flags, never the caller's.
        for var in stock_common::config::SECRET_ENV_VARS {
            cmd.env_remove(var);
        }
        for (flag, value) in &self.flags {
            let secret_env = definition
                .get_arguments()
                .find(|a| {
                    a.get_long()
                        .is_some_and(|l| flag.strip_prefix("--") == Some(l))
                })
                .filter(|a| a.is_hide_env_values_set())
                .and_then(|a| a.get_env());
            match secret_env {
                Some(var) => cmd.env(var, value),
                None => cmd.arg(flag).arg(value),
            };
        }
        Ok(cmd)
    }
}

/// The producer's defaults, as the binary has them with no flag and no environment.
pub fn producer_defaults() -> ProducerArgs {
    let m = Worker::Producer
        .command()
        .try_get_matches_from(["producer"])
        .expect("the producer needs no flag");
    ProducerArgs::from_arg_matches(&m).expect("the producer's defaults")
}

/// A duration as a flag value (`parse_duration`'s finest unit is the millisecond).
pub fn duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use stock_common::config::SecretUrl;

    fn wiring_parts() -> (KafkaArgs, Topics, RedisArgs, DatabaseArgs) {
        (
            KafkaArgs {
                options: vec!["a=b".into(), "c=d".into()],
                ..KafkaArgs::plaintext("k:1")
            },
            Topics::prefixed("x."),
            RedisArgs {
                order_memory: Duration::from_secs(60),
                orders_per_call: 7,
                connections: 3,
                ..RedisArgs::at(SecretUrl::from_str("redis://r:1/3").unwrap())
            },
            DatabaseArgs {
                max_connections: 3,
                ..DatabaseArgs::at(SecretUrl::from_str("postgres://u:p@d:1/db").unwrap())
            },
        )
    }

    #[test]
    fn binaries_clis_are_well_formed() {
        ProducerArgs::command().debug_assert();
        ConsumerArgs::command().debug_assert();
    }

    #[test]
    fn flags_carry_the_wiring_and_the_rest_is_the_default() {
        let (kafka, topics, redis, db) = wiring_parts();
        let w = Wiring {
            kafka: &kafka,
            topics: &topics,
            redis: &redis,
            db: &db,
        };
        let p = WorkerFlags::new(Worker::Producer, w, "g1")
            .set("--batch-size", 500)
            .producer()
            .unwrap();
        let defaults = producer_defaults();
        assert_eq!(p.kafka.brokers, "k:1");
        assert_eq!(p.kafka.options, ["a=b", "c=d"]);
        assert_eq!(p.topics.dlq, "x.stock.dlq");
        assert_eq!(p.redis.url.expose(), "redis://r:1/3");
        assert_eq!(p.redis.order_memory, Duration::from_secs(60));
        assert_eq!(p.redis.orders_per_call, 7);
        assert_eq!(p.redis.connections, 3);
        assert_eq!(p.group, "g1");
        assert_eq!(p.metrics.addr.as_deref(), Some("off"));
        assert_eq!(p.batch.batch_size, 500);
        assert_eq!(p.batch.linger, defaults.batch.linger);
        assert_eq!(p.sold_out_marker, defaults.sold_out_marker);

        let c = WorkerFlags::new(Worker::Consumer, w, "g2")
            .set("--reservation-ttl", "2s")
            .consumer()
            .unwrap();
        assert_eq!(c.db.url.expose(), "postgres://u:p@d:1/db");
        assert_eq!(c.db.max_connections, 3);
        assert_eq!(c.reservation_ttl, Duration::from_secs(2));
        assert!(!c.migrate);
        assert_eq!(c.group, "g2");
    }

    #[test]
    fn a_wrong_flag_is_refused() {
        let (kafka, topics, redis, db) = wiring_parts();
        let w = Wiring {
            kafka: &kafka,
            topics: &topics,
            redis: &redis,
            db: &db,
        };
        let f = WorkerFlags::new(Worker::Producer, w, "g").set("--reservation-ttl", "1s");
        assert!(f.producer().is_err());
        assert!(f.command(Path::new("/bin/true")).is_err());
        let cmd = WorkerFlags::new(Worker::Consumer, w, "g")
            .command(Path::new("/bin/true"))
            .unwrap();
        let envs: Vec<(String, Option<String>)> = cmd
            .get_envs()
            .map(|(k, v)| {
                let text = |s: &std::ffi::OsStr| s.to_string_lossy().into_owned();
                (text(k), v.map(text))
            })
            .collect();
        for var in [
            "BATCH_SIZE",
            "RESERVATION_TTL",
            "CONSUMER_GROUP",
            "KAFKA_BROKERS",
        ] {
            assert!(
                envs.contains(&(var.into(), None)),
                "{var} removed: {envs:?}"
            );
        }
        // Secrets go in the environment, never on the command line.
        let url = Some("postgres://u:p@d:1/db".to_owned());
        assert!(envs.contains(&("DATABASE_URL".into(), url)), "{envs:?}");
        assert!(envs.contains(&("KAFKA_OPTIONS".into(), Some("a=b,c=d".into()))));
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert!(!args.iter().any(|a| a.contains("u:p@")), "{args:?}");
        assert!(args.iter().any(|a| a == "--batch-size") || args.iter().any(|a| a == "--group"));
    }
}
