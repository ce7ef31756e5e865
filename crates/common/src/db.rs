//! PostgreSQL pool and the embedded migrations of `migrations/`.

use crate::config::DatabaseArgs;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

/// The migrations, compiled into every binary that may need to create the schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Opens a pool (connections are made lazily, so a database that is down is retried by
/// the caller's loop rather than failing start-up).
pub fn pool(args: &DatabaseArgs) -> Result<PgPool, sqlx::Error> {
    // A worker frozen inside a transaction (SIGSTOP, a long GC-like pause) must not hold
    // its stock row locks forever: PostgreSQL ends such a session after 10 s, its
    // transaction rolls back, and the worker's retry finds the ledger to be the judge.
    let opts = PgConnectOptions::from_str(args.url.expose())?
        .application_name("stockpipe")
        .options([("idle_in_transaction_session_timeout", "10000")]);
    Ok(PgPoolOptions::new()
        .max_connections(args.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
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
