//! The services a test, benchmark or demo runs against, with two sets of credentials: the
//! workers' (least privilege) and the administrator's (creating topics, databases and Redis
//! databases, migrating, granting, loading stock), read the way `deploy/env.sh` exports
//! them.
//!
//! The workers' settings are parsed by the binaries' own definitions ([`KafkaArgs`],
//! [`RedisArgs`], [`DatabaseArgs`]) from environment variables; the administrator's are
//! the same with `KAFKA_ADMIN_USERNAME`, `KAFKA_ADMIN_PASSWORD_FILE`,
//! `REDIS_ADMIN_USERNAME`, `REDIS_ADMIN_PASSWORD_FILE`, `DATABASE_ADMIN_URL` and
//! `DATABASE_ADMIN_PASSWORD_FILE` in place of the workers' (the workers' own when unset, as
//! on the plaintext layout). [`Stack::from_env`] reads this process's environment;
//! [`Stack::secure`] reads the file the secure layout writes (`$STACK_DIR/secure/env`), so
//! a test can reach that layout whatever its shell exports.

use clap::{CommandFactory, FromArgMatches, Parser};
use std::collections::HashMap;
use std::path::PathBuf;
use stock_common::config::{DatabaseArgs, KafkaArgs, RedisArgs, SecretUrl};

/// Both sets of credentials for the three services.
#[derive(Clone, Debug)]
pub struct Stack {
    /// Which layout (`STACK_LAYOUT`: `plain` or `secure`).
    pub layout: String,
    pub kafka: KafkaArgs,
    pub kafka_admin: KafkaArgs,
    pub redis: RedisArgs,
    pub redis_admin: RedisArgs,
    pub db: DatabaseArgs,
    pub db_admin: DatabaseArgs,
}

#[derive(Parser, Debug)]
struct Settings {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    db: DatabaseArgs,
}

impl Stack {
    /// The stack this process's environment points at (the plaintext layout's defaults
    /// for what is unset).
    pub fn from_env() -> Result<Stack, String> {
        Stack::from_vars(|k| std::env::var(k).ok())
    }

    /// The secure layout, from the file `deploy/stack-up.sh` writes for it
    /// (`$STACK_DIR/secure/env`, `KEY=VALUE` lines of file paths and addresses).
    pub fn secure() -> Result<Stack, String> {
        let vars = layout_vars("secure")?;
        Stack::from_vars(|k| vars.get(k).cloned())
    }

    /// The plaintext layout with the cluster layout's three Kafka brokers
    /// (`$STACK_DIR/cluster/env`): PostgreSQL and Redis as this process's environment
    /// says.
    pub fn kafka_cluster() -> Result<Stack, String> {
        let vars = layout_vars("cluster")?;
        let brokers = vars
            .get("KAFKA_BROKERS")
            .cloned()
            .ok_or("the cluster layout's env file names no KAFKA_BROKERS")?;
        let mut stack = Stack::from_vars(|k| match k {
            "KAFKA_BROKERS" => Some(brokers.clone()),
            _ => std::env::var(k).ok(),
        })?;
        stack.layout = "cluster-kafka".into();
        Ok(stack)
    }

    /// The whole cluster layout (`$STACK_DIR/cluster/env`): three Kafka brokers, the Redis
    /// Cluster (`REDIS_CLUSTER_NODES`), PostgreSQL as this process's environment says.
    pub fn cluster() -> Result<Stack, String> {
        let vars = layout_vars("cluster")?;
        for k in ["KAFKA_BROKERS", "REDIS_CLUSTER_NODES"] {
            if !vars.contains_key(k) {
                return Err(format!("the cluster layout's env file names no {k}"));
            }
        }
        let mut stack = Stack::from_vars(|k| match k {
            "KAFKA_BROKERS" | "REDIS_CLUSTER_NODES" | "REDIS_URL" => vars.get(k).cloned(),
            _ => std::env::var(k).ok(),
        })?;
        stack.layout = "cluster".into();
        Ok(stack)
    }

    /// Whether Redis is a cluster (no databases: tests share it, one at a time).
    pub fn redis_is_cluster(&self) -> bool {
        !self.redis.cluster_nodes.is_empty()
    }

    /// The stack described by the variables `get` returns, parsed by the binaries' own
    /// definitions (every environment fallback replaced by `get`).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Stack, String> {
        let parse = |get: &dyn Fn(&str) -> Option<String>| -> Result<Settings, String> {
            let cmd = Settings::command();
            let mut argv = vec!["stack".to_owned()];
            for arg in cmd.get_arguments() {
                let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
                    continue;
                };
                if let Some(v) = get(&env.to_string_lossy()) {
                    argv.push(format!("--{long}={v}"));
                }
            }
            let m = cmd
                .mut_args(|a| a.env(None))
                .try_get_matches_from(argv)
                .map_err(|e| e.to_string())?;
            Settings::from_arg_matches(&m).map_err(|e| e.to_string())
        };
        let workers = parse(&get)?;
        let (kafka_admin, redis_admin, db_admin) =
            admin(&workers.kafka, &workers.redis, &workers.db, &get)?;
        Ok(Stack {
            layout: get("STACK_LAYOUT").unwrap_or_else(|| "plain".into()),
            kafka: workers.kafka,
            kafka_admin,
            redis: workers.redis,
            redis_admin,
            db: workers.db,
            db_admin,
        })
    }

    /// Whether the workers connect with credentials of their own (the secure layout).
    pub fn has_worker_roles(&self) -> bool {
        self.db.url.expose() != self.db_admin.url.expose()
    }

    /// The workers' PostgreSQL role (the user of their URL).
    pub fn worker_db_role(&self) -> Option<String> {
        let u = url::Url::parse(self.db.url.expose()).ok()?;
        (!u.username().is_empty()).then(|| u.username().to_owned())
    }
}

/// The administrator's settings: the workers' with the credentials of `KAFKA_ADMIN_USERNAME`,
/// `KAFKA_ADMIN_PASSWORD_FILE`, `REDIS_ADMIN_USERNAME`, `REDIS_ADMIN_PASSWORD_FILE`,
/// `DATABASE_ADMIN_URL` and `DATABASE_ADMIN_PASSWORD_FILE` (as `get` returns them) in place
/// of theirs, where given.
pub fn admin(
    kafka: &KafkaArgs,
    redis: &RedisArgs,
    db: &DatabaseArgs,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<(KafkaArgs, RedisArgs, DatabaseArgs), String> {
    let mut k = kafka.clone();
    let mut r = redis.clone();
    let mut d = db.clone();
    if let Some(u) = get("KAFKA_ADMIN_USERNAME") {
        k.username = Some(u);
    }
    if let Some(f) = get("KAFKA_ADMIN_PASSWORD_FILE") {
        k.password_file = Some(f.into());
    }
    if let Some(u) = get("REDIS_ADMIN_USERNAME") {
        r.username = Some(u);
    }
    if let Some(f) = get("REDIS_ADMIN_PASSWORD_FILE") {
        r.password_file = Some(f.into());
    }
    if let Some(u) = get("DATABASE_ADMIN_URL") {
        d.url = u.parse().map_err(|e| format!("DATABASE_ADMIN_URL: {e}"))?;
    }
    if let Some(f) = get("DATABASE_ADMIN_PASSWORD_FILE") {
        d.password_file = Some(f.into());
    }
    Ok((k, r, d))
}

/// `args` with the database of its URL replaced by `name`.
pub fn with_database(args: &DatabaseArgs, name: &str) -> Result<DatabaseArgs, String> {
    let mut url = url::Url::parse(args.url.expose()).map_err(|e| e.to_string())?;
    url.set_path(name);
    Ok(DatabaseArgs {
        url: url.as_str().parse::<SecretUrl>()?,
        ..args.clone()
    })
}

/// `args` with the Redis database of its URL replaced by `index`.
pub fn with_redis_db(args: &RedisArgs, index: i64) -> Result<RedisArgs, String> {
    let mut url = url::Url::parse(args.url.expose()).map_err(|e| e.to_string())?;
    url.set_path(&format!("/{index}"));
    Ok(RedisArgs {
        url: url.as_str().parse::<SecretUrl>()?,
        ..args.clone()
    })
}

/// The `KEY=VALUE` lines `deploy/stack-up.sh` writes for `layout` (`$STACK_DIR/<layout>/env`).
fn layout_vars(layout: &str) -> Result<HashMap<String, String>, String> {
    let dir = std::env::var("STACK_DIR").unwrap_or_else(|_| "/var/tmp/stockpipe".into());
    let path = PathBuf::from(dir).join(layout).join("env");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "reading {path:?} ({e}): is the {layout} layout up? \
             STACK_LAYOUT={layout} bash deploy/stack-up.sh"
        )
    })?;
    Ok(text
        .lines()
        .map(|l| l.trim().trim_start_matches("export "))
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), unquote(v.trim()).to_owned()))
        .collect())
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_credentials_replace_the_workers_where_given() {
        let vars: HashMap<&str, &str> = [
            ("KAFKA_BROKERS", "localhost:9192"),
            ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl"),
            ("KAFKA_USERNAME", "stockpipe"),
            ("KAFKA_PASSWORD_FILE", "/s/kw"),
            ("KAFKA_ADMIN_USERNAME", "admin"),
            ("KAFKA_ADMIN_PASSWORD_FILE", "/s/ka"),
            ("DATABASE_URL", "postgres://c@localhost:5433/stock"),
            ("DATABASE_ADMIN_URL", "postgres://m@localhost:5433/stock"),
            ("REDIS_URL", "rediss://localhost:6380/0"),
            ("REDIS_CA_FILE", "/t/ca.crt"),
        ]
        .into_iter()
        .collect();
        let s = Stack::from_vars(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(s.kafka.username.as_deref(), Some("stockpipe"));
        assert_eq!(s.kafka_admin.username.as_deref(), Some("admin"));
        assert_eq!(s.kafka_admin.password_file, Some("/s/ka".into()));
        assert_eq!(s.kafka_admin.brokers, "localhost:9192");
        assert_eq!(s.redis_admin.ca_file, Some("/t/ca.crt".into()));
        assert_eq!(s.worker_db_role().as_deref(), Some("c"));
        assert!(s.has_worker_roles());
        let plain = Stack::from_vars(|_| None).unwrap();
        assert!(!plain.has_worker_roles());
        assert_eq!(plain.layout, "plain");
    }
}
