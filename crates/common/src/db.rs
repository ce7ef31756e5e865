//! PostgreSQL pool and the embedded migrations of `migrations/`, the connection settings
//! ([`options`]: TLS, password), the start-up check that fails fast on a setting that
//! cannot work ([`check`]), and the least-privilege grants of a worker role ([`grant`]).

use crate::config::{ConfigError, DatabaseArgs};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;
use std::time::Duration;

/// The migrations, compiled into every binary that may need to create the schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Opens a pool (connections are made lazily, so a database that is down is retried by
/// the caller's loop rather than failing start-up).
pub fn pool(args: &DatabaseArgs) -> Result<PgPool, sqlx::Error> {
    let opts = options(args)?;
    Ok(PgPoolOptions::new()
        .max_connections(args.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// The connection options of `args`. TLS: the URL's `sslmode` (or `PGSSLMODE`) when
/// given; otherwise `verify-full` when a CA file is set or the server is on another host,
/// and `prefer` for one on this host (loopback or a socket). The CA file, the client
/// certificate and key, and the password of the settings (`DATABASE_PASSWORD` or the
/// password file; the URL's own password when neither is set) are added.
pub fn options(args: &DatabaseArgs) -> Result<PgConnectOptions, sqlx::Error> {
    let config = |e: ConfigError| sqlx::Error::Configuration(Box::new(e));
    let url = args.url.expose();
    // A worker frozen inside a transaction (SIGSTOP, a long GC-like pause) must not hold
    // its stock row locks forever: PostgreSQL ends such a session after 10 s, its
    // transaction rolls back, and the worker's retry finds the ledger to be the judge.
    //
    // No sequential scan where an index can answer: a statement's plan is cached on its
    // connection (sqlx prepares every statement), and one made while a table was small or
    // had no statistics scanned the whole ledger once per batch for as long as the
    // connection lived (issue 12). Every statement run per batch has an index path
    // (`pg_store::sql`, checked by stock-e2e's `tests/batch_plans.rs`), so its cost does not
    // grow with the tables, whatever the planner believed. Reads of whole tables (reports,
    // the rebuild's snapshot) still scan when no index serves them.
    //
    // No JIT: a plan that still scans (its cost raised by `enable_seqscan = off` past
    // `jit_above_cost`) was compiled by LLVM at every run, 5 ms each and 100 ms the first
    // time, on a one-row table (found by `bench apply --batch-size 2`). Short OLTP
    // statements never gain from JIT.
    let mut opts = PgConnectOptions::from_str(url)?
        .application_name("stockpipe")
        .options([
            ("idle_in_transaction_session_timeout", "10000"),
            ("enable_seqscan", "off"),
            ("jit", "off"),
        ]);
    let mode_given = std::env::var_os("PGSSLMODE").is_some()
        || url::Url::parse(url).is_ok_and(|u| {
            u.query_pairs()
                .any(|(k, _)| k == "sslmode" || k == "ssl-mode")
        });
    let tls = args.tls();
    tls.check("postgres").map_err(config)?;
    if !mode_given {
        let host = opts.get_host();
        let local = host.starts_with('/')
            || host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if tls.ca.is_some() || !local {
            opts = opts.ssl_mode(PgSslMode::VerifyFull);
        }
    }
    if let Some(ca) = &tls.ca {
        opts = opts.ssl_root_cert(ca);
    }
    if let Some((cert, key)) = tls.client_pair("postgres").map_err(config)? {
        opts = opts.ssl_client_cert(cert).ssl_client_key(key);
    }
    if let Some(password) = args.password().map_err(config)? {
        opts = opts.password(password.expose());
    }
    Ok(opts)
}

/// Connects once, at start-up, so that a setting that cannot work stops the worker at
/// once with the cause: a refused certificate or host name, a wrong password, a
/// connection refused by `pg_hba.conf`, an unknown database. A server that is not
/// reachable yet is waited for (up to `patience`), with a warning per attempt.
pub async fn check(args: &DatabaseArgs, patience: Duration) -> Result<(), StartupError> {
    let opts = options(args).map_err(|e| StartupError::new(args, e))?;
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match opts.connect().await {
            Ok(conn) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Err(e) if is_unreachable(&e) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(database = %args.url, error = %e, "postgres not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(StartupError::new(args, e)),
        }
    }
}

/// Why the database cannot be used at start-up; the text names the server (its URL,
/// password masked) and the cause.
#[derive(Debug, thiserror::Error)]
#[error("postgres: cannot connect to {url}: {source}")]
pub struct StartupError {
    url: String,
    #[source]
    source: sqlx::Error,
}

impl StartupError {
    fn new(args: &DatabaseArgs, source: sqlx::Error) -> Self {
        StartupError {
            url: args.url.redacted(),
            source,
        }
    }
}

/// A server that is down or restarting, as opposed to one that refuses us.
fn is_unreachable(err: &sqlx::Error) -> bool {
    use std::io::ErrorKind as K;
    match err {
        // sqlx reports a refused certificate as an I/O error too (`InvalidData`): only the
        // kinds of a server that is down, restarting or not reachable are waited for.
        sqlx::Error::Io(e) => matches!(
            e.kind(),
            K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::NotConnected
                | K::TimedOut
                | K::UnexpectedEof
                | K::BrokenPipe
                | K::AddrNotAvailable
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::Interrupted
        ),
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            code.starts_with("57P") || code.starts_with("53")
        }
        _ => false,
    }
}

/// Grants `role` what the consumer and the operators' commands need, and no more: data
/// manipulation on the tables of the schema (read-only on the migrations' own table), the
/// sequences, and the same on tables later migrations create (default privileges of the
/// role that runs the migrations). Run by that role after [`migrate`]
/// (`stockctl migrate --grant <role>`); the role creates, alters or drops nothing.
pub async fn grant(pool: &PgPool, role: &str) -> Result<(), sqlx::Error> {
    let valid = !role.is_empty()
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(sqlx::Error::Configuration(
            format!("role name {role:?}: letters, digits, '_' and '-' only").into(),
        ));
    }
    let r = format!("\"{role}\"");
    let statements = [
        format!("GRANT USAGE ON SCHEMA public TO {r}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {r}"),
        format!("REVOKE INSERT, UPDATE, DELETE ON _sqlx_migrations FROM {r}"),
        format!("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {r}"),
        format!(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public \
             GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}"
        ),
        format!(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public \
             GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {r}"
        ),
    ];
    let mut tx = pool.begin().await?;
    for sql in &statements {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether a database error is worth retrying: connection trouble, deadlocks,
/// serialization failures, the server shutting down. Everything else is permanent.
pub fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 40001 serialization_failure, 40P01 deadlock_detected, class 08 connection
            // exceptions, 57P0x operator intervention (shutdown), 53xxx insufficient resources,
            // 25P03 idle-in-transaction timeout (this worker was frozen mid-transaction).
            code == "40001"
                || code == "25P03"
                || code == "40P01"
                || code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
        }
        _ => false,
    }
}
