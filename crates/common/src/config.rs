//! Command-line and environment settings shared by every binary. Each setting is a flag
//! with an environment-variable fallback; the defaults match the local stack of `deploy/`.
//! Connection strings are held in [`SecretUrl`], which never prints its password, and are
//! parsed by [`SecretUrlParser`], whose errors never print the value (clap's own would:
//! `invalid value '<the URL>'`), and hidden from `--help` when they come from the
//! environment.

use clap::Args;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A connection URL that may carry a password. `Debug` and `Display` show it with the
/// password replaced by `***`, so it can go into a log line as it is.
#[derive(Clone)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The full URL, password included: only for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password (and any `password=` query parameter) masked.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                }
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let masked = k.eq_ignore_ascii_case("password");
                        (
                            k.into_owned(),
                            if masked {
                                "***".to_owned()
                            } else {
                                v.into_owned()
                            },
                        )
                    })
                    .collect();
                if !pairs.is_empty() {
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                u.to_string()
            }
            Err(_) => "<unparseable url>".to_owned(),
        }
    }
}

impl FromStr for SecretUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
        Ok(SecretUrl(s.to_owned()))
    }
}

/// clap's parser for [`SecretUrl`] settings. A rejected URL is not echoed: the error
/// names the setting (flag and environment variable) and what is wrong with the value
/// (`url`'s reasons are fixed phrases such as "invalid port number"), because the value
/// may carry a password and the error goes to a terminal or a log.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecretUrlParser;

impl clap::builder::TypedValueParser for SecretUrlParser {
    type Value = SecretUrl;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<SecretUrl, clap::Error> {
        let refuse = |why: &str| {
            let setting = match arg {
                Some(a) => match a.get_env() {
                    Some(env) => format!("'{a}' (env {})", env.to_string_lossy()),
                    None => format!("'{a}'"),
                },
                None => "a URL setting".to_owned(),
            };
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "invalid value for {setting}: {why} (the value is not shown: it may hold a password)\n"
                ),
            )
            .with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| refuse("not UTF-8"))?;
        text.parse().map_err(|e: String| refuse(&e))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Kafka connection.
#[derive(Args, Clone, Debug)]
pub struct KafkaArgs {
    /// Bootstrap brokers, comma separated.
    #[arg(
        long = "kafka-brokers",
        env = "KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Extra librdkafka settings for every client, `key=value`, comma separated. Hidden
    /// from `--help` when taken from the environment: they may hold `sasl.password`.
    #[arg(
        long = "kafka-option",
        env = "KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub options: Vec<String>,
}

/// Topic names (contract defaults).
#[derive(Args, Clone, Debug)]
pub struct Topics {
    /// Order events from the order service.
    #[arg(long = "topic-orders", env = "TOPIC_ORDERS", default_value = "orders")]
    pub orders: String,
    /// Deduct commands, producer to consumer.
    #[arg(
        long = "topic-deduct",
        env = "TOPIC_DEDUCT",
        default_value = "stock.deduct"
    )]
    pub deduct: String,
    /// Compensations, consumer to producer.
    #[arg(
        long = "topic-compensate",
        env = "TOPIC_COMPENSATE",
        default_value = "stock.compensate"
    )]
    pub compensate: String,
    /// Results for the order service.
    #[arg(
        long = "topic-results",
        env = "TOPIC_RESULTS",
        default_value = "stock.results"
    )]
    pub results: String,
    /// Dead letters.
    #[arg(long = "topic-dlq", env = "TOPIC_DLQ", default_value = "stock.dlq")]
    pub dlq: String,
}

impl Topics {
    /// The default names with `prefix` in front of each (tests give each run its own).
    pub fn prefixed(prefix: &str) -> Self {
        Topics {
            orders: format!("{prefix}orders"),
            deduct: format!("{prefix}stock.deduct"),
            compensate: format!("{prefix}stock.compensate"),
            results: format!("{prefix}stock.results"),
            dlq: format!("{prefix}stock.dlq"),
        }
    }

    pub fn all(&self) -> [&str; 5] {
        [
            &self.orders,
            &self.deduct,
            &self.compensate,
            &self.results,
            &self.dlq,
        ]
    }
}

/// Redis connection.
#[derive(Args, Clone, Debug)]
pub struct RedisArgs {
    /// Redis URL, e.g. `redis://:password@127.0.0.1:6379/0`.
    #[arg(
        id = "redis_url",
        long = "redis-url",
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0",
        value_parser = SecretUrlParser,
        hide_env_values = true
    )]
    pub url: SecretUrl,
    /// How long the producer remembers an order id (and its decision) in Redis. Must be
    /// longer than the retention of the `orders` topic, or a replay from older offsets
    /// could deduct again.
    #[arg(long = "order-memory", env = "ORDER_MEMORY", default_value = "8d", value_parser = parse_duration)]
    pub order_memory: Duration,
    /// Orders the producer decides per call of the reserve script (1 to 500). One call
    /// costs about 30 µs of Redis time on its own; more orders per call share it, but one
    /// call keeps Redis busy for its whole run (about 10 µs per order).
    #[arg(long = "orders-per-call", env = "REDIS_ORDERS_PER_CALL", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=500))]
    pub orders_per_call: u16,
}

/// PostgreSQL connection.
#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. `postgres://user:password@127.0.0.1:5432/stock`.
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "DATABASE_URL",
        default_value = "postgres://stock:stock@127.0.0.1:5432/stock",
        value_parser = SecretUrlParser,
        hide_env_values = true
    )]
    pub url: SecretUrl,
    /// Connections in the pool.
    #[arg(
        long = "database-max-connections",
        env = "DATABASE_MAX_CONNECTIONS",
        default_value_t = 8
    )]
    pub max_connections: u32,
}

/// How messages are gathered into batches.
#[derive(Args, Clone, Debug)]
pub struct BatchArgs {
    /// Most messages in one batch.
    #[arg(long = "batch-size", env = "BATCH_SIZE", default_value_t = 2000)]
    pub batch_size: usize,
    /// How long to wait for a batch to fill once its first message is in.
    #[arg(long = "batch-linger", env = "BATCH_LINGER", default_value = "5ms", value_parser = parse_duration)]
    pub linger: Duration,
    /// Batches that may wait for their delivery reports while the next one is processed
    /// (1: one batch at a time).
    #[arg(long = "pipeline-depth", env = "PIPELINE_DEPTH", default_value_t = 2)]
    pub pipeline_depth: usize,
}

/// Log output.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// `text` (human-readable) or `json`. Levels come from `RUST_LOG` (default `info`).
    #[arg(long = "log-format", env = "LOG_FORMAT", default_value = "text")]
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `250ms`, `5s`, `15m`, `2h`, `8d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 500ms, 5s, 15m"))?;
    let secs = |k: u64| Duration::from_secs(n.saturating_mul(k));
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m, h or d")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_print() {
        let u: SecretUrl = "postgres://stock:hunter2@db:5432/stock?sslmode=disable"
            .parse()
            .unwrap();
        assert!(!format!("{u:?} {u}").contains("hunter2"));
        assert!(u.redacted().contains("stock:***@db"));
        let r: SecretUrl = "redis://:s3cret@127.0.0.1:6379/0".parse().unwrap();
        assert!(!r.redacted().contains("s3cret"));
        let q: SecretUrl = "postgres://db/stock?user=a&password=zzz".parse().unwrap();
        assert!(!q.redacted().contains("zzz"));
        assert_eq!(
            u.expose(),
            "postgres://stock:hunter2@db:5432/stock?sslmode=disable"
        );
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        redis: RedisArgs,
    }

    #[test]
    fn malformed_urls_are_refused_without_their_value() {
        use clap::Parser;
        for args in [
            ["t", "--database-url", "postgres://u:s3cret@host:badport/db"],
            ["t", "--redis-url", "redis://:s3cret@host:99999999/0"],
            ["t", "--database-url", "s3cret"],
        ] {
            let e = Cli::try_parse_from(args).expect_err("refused");
            let text = e.render().to_string();
            assert!(!text.contains("s3cret"), "{text}");
            assert!(text.contains(args[1]), "names the flag: {text}");
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        }
        let ok = Cli::try_parse_from(["t", "--database-url", "postgres://u:s3cret@h:5432/db"])
            .expect("a good URL");
        assert_eq!(ok.db.url.expose(), "postgres://u:s3cret@h:5432/db");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("8d"), Ok(Duration::from_secs(8 * 86_400)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
