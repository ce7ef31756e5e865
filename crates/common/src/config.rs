//! Command-line and environment settings shared by every binary. Each setting is a flag
//! with an environment-variable fallback; the defaults match the local stack of `deploy/`.
//! Connection strings are held in [`SecretUrl`], which never prints its password, and are
//! parsed by [`SecretUrlParser`], whose errors never print the value (clap's own would:
//! `invalid value '<the URL>'`), and hidden from `--help` when they come from the
//! environment.
//!
//! Passwords are never settings of the command line (any user of the host can read it in
//! the process list): each service reads its password from `<SERVICE>_PASSWORD` or from the
//! file named by `<SERVICE>_PASSWORD_FILE` / `--<service>-password-file` ([`password`]),
//! and holds it as a [`Secret`]. TLS is set per service with a CA bundle (the system's
//! roots when unset) and an optional client certificate and key ([`TlsFiles`]); the
//! clients are built by their owners (`kafka`, `redis_store`, `db`).

use clap::Args;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// A password or another secret, from the environment or a file. `Debug` and `Display`
/// print `***`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The secret itself: only for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How long a worker waits at start-up for a service that is not reachable yet
/// (`kafka::check`, `db::check`); a service that refuses it stops it at once.
pub const STARTUP_PATIENCE: Duration = Duration::from_secs(60);

/// The environment variables that hold passwords themselves (their `_FILE` forms are
/// ordinary settings). A harness that runs workers with settings of its own clears them.
pub const SECRET_ENV_VARS: [&str; 3] = ["KAFKA_PASSWORD", "REDIS_PASSWORD", "DATABASE_PASSWORD"];

/// A setting that cannot be used. Its text names the service and the cause, and never
/// holds a secret (a password file's path is shown, its content is not).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{service}: cannot read {what} {path:?}: {source}")]
    File {
        service: &'static str,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{service}: {why}")]
    Invalid { service: &'static str, why: String },
}

impl ConfigError {
    pub fn invalid(service: &'static str, why: impl Into<String>) -> Self {
        ConfigError::Invalid {
            service,
            why: why.into(),
        }
    }
}

/// The password of `service` (`kafka`, `redis`, `postgres`): the content of `file` (one
/// trailing newline dropped, as `echo` writes it) or the environment variable `var`; none
/// when neither is set. Both at once is refused, rather than guessing which one is meant.
pub fn password(
    service: &'static str,
    var: &str,
    file: Option<&Path>,
) -> Result<Option<Secret>, ConfigError> {
    let from_env = std::env::var(var).ok().filter(|v| !v.is_empty());
    match (file, from_env) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            service,
            format!("both {var} and a password file are set: keep one"),
        )),
        (None, v) => Ok(v.map(Secret)),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                service,
                what: "the password file",
                path: path.to_owned(),
                source,
            })?;
            let text = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            if text.is_empty() {
                return Err(ConfigError::invalid(
                    service,
                    format!("the password file {path:?} is empty"),
                ));
            }
            Ok(Some(Secret(text.to_owned())))
        }
    }
}

/// The settings of a binary, parsed from its command line and environment as clap does,
/// with one more rule: a password given on the command line is refused (any user of the
/// host can read a process's arguments). Exits with clap's usage error otherwise.
pub fn parse<T: clap::Parser>() -> T {
    let mut cmd = T::command();
    let matches = cmd.get_matches_mut();
    if let Err(why) = refuse_command_line_passwords(&matches) {
        cmd.error(clap::error::ErrorKind::ValueValidation, why)
            .exit();
    }
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

/// Refuses a URL setting that carries a password and came from the command line; the
/// same URL in its environment variable is fine.
pub fn refuse_command_line_passwords(matches: &clap::ArgMatches) -> Result<(), String> {
    for (id, flag, var) in [
        ("redis_url", "--redis-url", "REDIS"),
        ("database_url", "--database-url", "DATABASE"),
    ] {
        if !matches.ids().any(|i| i.as_str() == id) {
            continue;
        }
        let from_command_line =
            matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        let has_password = matches
            .get_one::<SecretUrl>(id)
            .and_then(|u| url::Url::parse(u.expose()).ok())
            .is_some_and(|u| {
                u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password")
            });
        if from_command_line && has_password {
            return Err(format!(
                "{flag} carries a password on the command line, where any user of this host \
                 can read it: give the URL in {var}_URL, or the password in {var}_PASSWORD or \
                 {var}_PASSWORD_FILE (the value is not shown)"
            ));
        }
    }
    Ok(())
}

/// TLS files of one service's client: the CA bundle that verifies the server (the system's
/// roots when unset) and, for mutual TLS, a client certificate and its key (PEM).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Whether any file is set (a TLS setting on a plaintext connection is a mistake).
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The client certificate and key: both or neither.
    pub fn client_pair(
        &self,
        service: &'static str,
    ) -> Result<Option<(&Path, &Path)>, ConfigError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some((c, k))),
            (None, None) => Ok(None),
            _ => Err(ConfigError::invalid(
                service,
                "a client certificate needs its key and a key its certificate: set both or neither",
            )),
        }
    }

    /// Reads one of the files, naming the service and the file in the error.
    pub fn read(
        service: &'static str,
        what: &'static str,
        path: &Path,
    ) -> Result<Vec<u8>, ConfigError> {
        std::fs::read(path).map_err(|source| ConfigError::File {
            service,
            what,
            path: path.to_owned(),
            source,
        })
    }

    /// Checks that every file set can be read (a worker fails at start, not at its
    /// first connection).
    pub fn check(&self, service: &'static str) -> Result<(), ConfigError> {
        self.client_pair(service)?;
        for (what, path) in [
            ("the CA file", &self.ca),
            ("the client certificate", &self.cert),
            ("the client key", &self.key),
        ] {
            if let Some(p) = path {
                Self::read(service, what, p)?;
            }
        }
        Ok(())
    }
}

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
    /// `plaintext`, `ssl` (TLS) or `sasl-ssl` (TLS and SASL authentication, e.g. SCRAM).
    #[arg(
        long = "kafka-security-protocol",
        env = "KAFKA_SECURITY_PROTOCOL",
        default_value = "plaintext",
        ignore_case = true
    )]
    pub security_protocol: KafkaSecurity,
    /// SASL mechanism for `sasl-ssl`.
    #[arg(
        long = "kafka-sasl-mechanism",
        env = "KAFKA_SASL_MECHANISM",
        default_value = "SCRAM-SHA-512"
    )]
    pub sasl_mechanism: String,
    /// SASL user name for `sasl-ssl`.
    #[arg(id = "kafka_username", long = "kafka-username", env = "KAFKA_USERNAME")]
    pub username: Option<String>,
    /// File holding the SASL password (a mounted secret). Or set KAFKA_PASSWORD; never on
    /// the command line.
    #[arg(
        id = "kafka_password_file",
        long = "kafka-password-file",
        env = "KAFKA_PASSWORD_FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) that verifies the brokers' certificates; the system's roots when unset.
    #[arg(id = "kafka_ca_file", long = "kafka-ca-file", env = "KAFKA_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        id = "kafka_cert_file",
        long = "kafka-cert-file",
        env = "KAFKA_CERT_FILE"
    )]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(id = "kafka_key_file", long = "kafka-key-file", env = "KAFKA_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Extra librdkafka settings for every client, `key=value`, comma separated. Settings
    /// holding a password are refused here (use KAFKA_PASSWORD or KAFKA_PASSWORD_FILE).
    #[arg(
        long = "kafka-option",
        env = "KAFKA_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub options: Vec<String>,
    /// How long a worker waits for delivery reports before asking a new client whether
    /// the brokers answer: if they do, its own client is stalled (a librdkafka client that
    /// never reconnects after a broker restart, see DESIGN) and the worker exits so that
    /// its supervisor restarts it; if they do not, Kafka is down and it goes on waiting.
    /// Keep it above `socket.timeout.ms` (60 s) plus the reconnect backoff (10 s), which
    /// librdkafka needs to heal on its own.
    #[arg(
        long = "kafka-stall-timeout",
        env = "KAFKA_STALL_TIMEOUT",
        default_value = "120s",
        value_parser = parse_duration
    )]
    pub stall_timeout: Duration,
}

/// The TLS files and the password of a service's settings (fields `ca_file`, `cert_file`,
/// `key_file`, `password_file`), read the same way for every service.
macro_rules! credentials {
    ($settings:ty, $service:literal, $password_var:literal) => {
        impl $settings {
            /// The CA bundle and client certificate of these settings.
            pub fn tls(&self) -> TlsFiles {
                TlsFiles {
                    ca: self.ca_file.clone(),
                    cert: self.cert_file.clone(),
                    key: self.key_file.clone(),
                }
            }

            #[doc = concat!("The password: ", $password_var, " or the password file.")]
            pub fn password(&self) -> Result<Option<Secret>, ConfigError> {
                password($service, $password_var, self.password_file.as_deref())
            }
        }
    };
}

credentials!(KafkaArgs, "kafka", "KAFKA_PASSWORD");
credentials!(RedisArgs, "redis", "REDIS_PASSWORD");
// A password in the URL is used when neither is set (`db::options`).
credentials!(DatabaseArgs, "postgres", "DATABASE_PASSWORD");

/// How the Kafka clients reach the brokers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KafkaSecurity {
    #[default]
    Plaintext,
    Ssl,
    #[value(alias = "sasl_ssl")]
    SaslSsl,
}

impl KafkaArgs {
    /// Plaintext brokers at `brokers`, every other setting its default.
    pub fn plaintext(brokers: &str) -> Self {
        KafkaArgs {
            brokers: brokers.to_owned(),
            security_protocol: KafkaSecurity::Plaintext,
            sasl_mechanism: "SCRAM-SHA-512".to_owned(),
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            options: Vec::new(),
            stall_timeout: Duration::from_secs(120),
        }
    }
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
    /// Redis URL: `redis://host:6379/0`, or `rediss://host:6380/0` for TLS (verified
    /// against the CA file, or the system's roots).
    #[arg(
        id = "redis_url",
        long = "redis-url",
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0",
        value_parser = SecretUrlParser,
        hide_env_values = true
    )]
    pub url: SecretUrl,
    /// Redis Cluster: the seed nodes' URLs, comma-separated (`redis://10.0.0.1:7001,...`).
    /// When set, Redis is a cluster reached through them (its database is 0) and
    /// `--redis-url` is not used; the username, password and TLS files apply to every node.
    #[arg(
        id = "redis_cluster_nodes",
        long = "redis-cluster-nodes",
        env = "REDIS_CLUSTER_NODES",
        value_delimiter = ','
    )]
    pub cluster_nodes: Vec<String>,
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
    /// Connections to one Redis that the producer spreads each batch's reserve calls over
    /// (1 to 32; a cluster is reached through its own connections). Redis reads at most
    /// 16 KB from a connection per turn of its event loop, and with `appendfsync always`
    /// each turn that wrote ends with one fsync before anyone is answered: on one
    /// connection a batch of 5,000 orders (about 700 KB of script calls) waited for about
    /// 50 fsyncs, on 8 for about 6 (docs/perf/issue12-session23.txt). Calls on different
    /// connections may run interleaved: orders of one batch are then decided in no set
    /// order, as orders of different partitions already are; each order still once.
    #[arg(long = "redis-connections", env = "REDIS_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u8).range(1..=32))]
    pub connections: u8,
    /// ACL user name (`AUTH user password`).
    #[arg(id = "redis_username", long = "redis-username", env = "REDIS_USERNAME")]
    pub username: Option<String>,
    /// File holding the password (a mounted secret). Or set REDIS_PASSWORD; never on the
    /// command line.
    #[arg(
        id = "redis_password_file",
        long = "redis-password-file",
        env = "REDIS_PASSWORD_FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) that verifies the server's certificate (`rediss://` only); the
    /// system's roots when unset.
    #[arg(id = "redis_ca_file", long = "redis-ca-file", env = "REDIS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        id = "redis_cert_file",
        long = "redis-cert-file",
        env = "REDIS_CERT_FILE"
    )]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(id = "redis_key_file", long = "redis-key-file", env = "REDIS_KEY_FILE")]
    pub key_file: Option<PathBuf>,
}

impl RedisArgs {
    /// Redis at `url` without credentials or TLS files, every other setting its default.
    pub fn at(url: SecretUrl) -> Self {
        RedisArgs {
            url,
            cluster_nodes: Vec::new(),
            order_memory: Duration::from_secs(8 * 86_400),
            orders_per_call: 100,
            connections: 8,
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// PostgreSQL connection.
#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. `postgres://user@db.example.com:5432/stock?sslmode=verify-full`.
    /// Without `sslmode`, a server on another host is reached with `verify-full` and one on
    /// this host (loopback or socket) with `prefer`.
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
    /// File holding the password (a mounted secret). Or set DATABASE_PASSWORD; never on
    /// the command line.
    #[arg(
        id = "database_password_file",
        long = "database-password-file",
        env = "DATABASE_PASSWORD_FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) that verifies the server's certificate (with it, `sslmode` defaults
    /// to `verify-full`); the system's roots when unset.
    #[arg(
        id = "database_ca_file",
        long = "database-ca-file",
        env = "DATABASE_CA_FILE"
    )]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        id = "database_cert_file",
        long = "database-cert-file",
        env = "DATABASE_CERT_FILE"
    )]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(
        id = "database_key_file",
        long = "database-key-file",
        env = "DATABASE_KEY_FILE"
    )]
    pub key_file: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The database at `url` without TLS files, every other setting its default.
    pub fn at(url: SecretUrl) -> Self {
        DatabaseArgs {
            url,
            max_connections: 8,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// The workers' `--batch-size` by default, and `bench e2e`'s. A batch holds what has
/// arrived (no linger), so the cap binds only with a backlog; there, the per-batch and
/// per-product-per-batch costs (a transaction, a row lock and an update per product, a
/// produce request per partition) weigh on more orders: 5,000 against 2,000 read 53,964
/// against 45,695 orders/s and a pipeline of 27.3 against 32.6 µs/order (issue 12,
/// `bench e2e --orders 300000 --mode stream --workers 2`, medians of 3 alternating,
/// docs/perf/issue12-session21.txt).
pub const DEFAULT_BATCH_SIZE: usize = 5000;

/// How messages are gathered into batches.
#[derive(Args, Clone, Debug)]
pub struct BatchArgs {
    /// Most messages in one batch.
    #[arg(long = "batch-size", env = "BATCH_SIZE", default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: usize,
    /// How long to wait for a batch to fill once its first message is in. 0 (the default):
    /// no wait, a batch takes what has arrived; under load that is a full batch anyway
    /// (messages arrive while the previous batch runs), and with few orders in flight no
    /// order waits for others (issue 12: one order in flight p50 24.5 → 13.4 ms, and no
    /// loss of throughput or CPU per order at 100,000 orders, docs/perf/issue12-linger.txt).
    #[arg(long = "batch-linger", env = "BATCH_LINGER", default_value = "0ms", value_parser = parse_duration)]
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
    fn passwords_on_the_command_line_are_refused() {
        use clap::{CommandFactory, FromArgMatches};
        let m = Cli::command()
            .try_get_matches_from(["t", "--database-url", "postgres://u:s3cret@h:5432/db"])
            .unwrap();
        let why = refuse_command_line_passwords(&m).expect_err("refused");
        assert!(
            why.contains("--database-url") && !why.contains("s3cret"),
            "{why}"
        );
        let m = Cli::command()
            .try_get_matches_from(["t", "--redis-url", "redis://:s3cret@h:6379/0"])
            .unwrap();
        assert!(refuse_command_line_passwords(&m).is_err());
        // Without a password, or by default, the command line is fine.
        let m = Cli::command()
            .try_get_matches_from(["t", "--database-url", "postgres://u@h:5432/db"])
            .unwrap();
        assert!(refuse_command_line_passwords(&m).is_ok());
        assert!(Cli::from_arg_matches(&m).is_ok());
        let m = Cli::command().try_get_matches_from(["t"]).unwrap();
        assert!(refuse_command_line_passwords(&m).is_ok());
    }

    #[test]
    fn passwords_come_from_a_file_or_the_environment() {
        let dir = std::env::temp_dir().join(format!("stockpipe-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "hunter2\n").unwrap();
        let var = "STOCKPIPE_TEST_PASSWORD_UNSET";
        let p = password("redis", var, Some(&f)).unwrap().unwrap();
        assert_eq!(p.expose(), "hunter2");
        assert_eq!(format!("{p} {p:?}"), "*** ***");
        assert!(password("redis", var, None).unwrap().is_none());
        std::fs::write(&f, "").unwrap();
        let e = password("redis", var, Some(&f)).unwrap_err().to_string();
        assert!(e.starts_with("redis:") && e.contains("empty"), "{e}");
        let e = password("redis", var, Some(&dir.join("missing")))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("redis:") && e.contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
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
