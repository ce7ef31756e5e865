//! A run's private slice of the local stack, as the end-to-end tests build theirs: a fresh
//! PostgreSQL database `bench_<id>` (migrated), a Redis database claimed among
//! [`REDIS_FIRST_DB`]`..` (flushed), topics prefixed `bench-<id>.`. Each part is removed by
//! its `cleanup`, which only logs what it could not undo, so that a run's own error is
//! the one reported.
//!
//! On a Redis Cluster (`REDIS_CLUSTER_NODES` set) there is one database, 0: the run takes
//! the whole cluster, empties every master (`FLUSHALL`) before it and again after it. Two
//! runs (or a run and the tests) on one cluster must take turns: run them under
//! `flock /tmp/stockpipe-cluster.lock`.

use anyhow::{anyhow, bail, Context, Result};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::time::Duration;
use stock_common::config::{DatabaseArgs, KafkaArgs, RedisArgs, Topics};
use stock_common::redis_store::RedisStore;
use stock_devkit::stack::{with_database, with_redis_db};

/// Where the stack is: the usual flags and environment variables of every binary. The
/// database URL names the database used to create (and drop) the run's own.
#[derive(clap::Args, Clone, Debug)]
pub struct Stack {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// The administrator's settings of a [`Stack`]: what creates and drops a run's database,
/// topics and Redis database ([`stock_devkit::stack::admin`]: the `*_ADMIN_*` variables of
/// `deploy/env.sh`, the workers' own settings where unset).
#[derive(Clone, Debug)]
pub struct Admin {
    pub kafka: KafkaArgs,
    pub redis: RedisArgs,
    pub db: DatabaseArgs,
}

impl Stack {
    pub fn admin(&self) -> Result<Admin> {
        let get = |k: &str| std::env::var(k).ok();
        let (kafka, redis, db) =
            stock_devkit::stack::admin(&self.kafka, &self.redis, &self.db, &get)
                .map_err(|e| anyhow!(e))?;
        Ok(Admin { kafka, redis, db })
    }
}

/// A fresh id for one run's resources.
pub fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// A database of the run's own, created and migrated; dropped by [`BenchDb::cleanup`].
pub struct BenchDb {
    /// The workers' settings for the run's database.
    pub args: DatabaseArgs,
    /// The administrator's pool on it.
    pub pool: PgPool,
    admin: DatabaseArgs,
    name: String,
}

impl BenchDb {
    /// Creates `bench_<id>` next to the database of `admin`, migrates it and grants the
    /// workers' role (the user of `workers`' URL, when it is not the administrator) what it
    /// needs. The pool holds at most `max_connections`.
    pub async fn create(
        workers: &DatabaseArgs,
        admin: &DatabaseArgs,
        id: &str,
        max_connections: u32,
    ) -> Result<Self> {
        let name = format!("bench_{id}");
        let mut conn = stock_common::db::options(admin)
            .context("database settings")?
            .connect()
            .await
            .with_context(|| {
                format!(
                    "connecting to {} (is the stack up? deploy/stack-up.sh)",
                    admin.url
                )
            })?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        conn.close().await.ok();
        let args = DatabaseArgs {
            max_connections,
            ..with_database(workers, &name).map_err(|e| anyhow!(e))?
        };
        let own = DatabaseArgs {
            max_connections,
            ..with_database(admin, &name).map_err(|e| anyhow!(e))?
        };
        let pool = stock_common::db::pool(&own).context("database pool")?;
        let db = BenchDb {
            args,
            pool,
            admin: admin.clone(),
            name,
        };
        let role = url::Url::parse(workers.url.expose())
            .ok()
            .map(|u| u.username().to_owned())
            .filter(|r| !r.is_empty() && workers.url.expose() != admin.url.expose());
        let prepared = async {
            stock_common::db::migrate(&db.pool)
                .await
                .context("migrating the bench database")?;
            if let Some(role) = role {
                stock_common::db::grant(&db.pool, &role)
                    .await
                    .with_context(|| format!("granting {role} the workers' privileges"))?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = prepared {
            db.cleanup().await;
            return Err(e);
        }
        Ok(db)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database. `WITH (FORCE)` ends the sessions still on it,
    /// but refuses when one of them is an autovacuum worker (common after a long run: "must
    /// be a member of the role whose process is being terminated"); a plain `DROP DATABASE`
    /// then stops the autovacuum worker itself, and is tried a few times.
    pub async fn cleanup(self) {
        self.pool.close().await;
        let dropped = async {
            let mut conn = stock_common::db::options(&self.admin)?.connect().await?;
            let mut result = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await
            .map(drop);
            for _ in 0..3 {
                if result.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                result = sqlx::query(&format!("DROP DATABASE IF EXISTS {}", self.name))
                    .execute(&mut conn)
                    .await
                    .map(drop);
            }
            result?;
            conn.close().await
        }
        .await;
        if let Err(e) = dropped {
            tracing::warn!(database = %self.name, error = %e, "could not drop the bench database");
        }
    }
}

/// First Redis database index handed to benchmarks (the end-to-end tests use 1 to 1000).
pub const REDIS_FIRST_DB: u32 = 1001;
/// How many Redis databases benchmarks rotate through (up to 1023 inclusive).
pub const REDIS_DBS: u32 = 23;
const REDIS_COUNTER: &str = "stockpipe:bench-db-counter";

fn claim_key(index: u32) -> String {
    format!("stockpipe:bench-claim:{index}")
}

/// A Redis database of the run's own: claimed (a key in the base database, so that two
/// concurrent runs never share one), flushed, released by [`RedisSlot::cleanup`]. On a
/// cluster ([`RedisSlot::cluster`]): database 0 of the whole cluster, emptied.
pub struct RedisSlot {
    /// The producer's settings for the run's database.
    pub args: RedisArgs,
    /// The administrator's store on it.
    pub store: RedisStore,
    pub index: u32,
    /// The connection holding the claim (one Redis); None on a cluster.
    base: Option<redis::aio::MultiplexedConnection>,
}

impl RedisSlot {
    /// The run's Redis: a claimed database of one Redis ([`RedisSlot::claim`]), or the
    /// whole cluster when `base` names cluster nodes ([`RedisSlot::cluster`]).
    pub async fn for_run(workers: &RedisArgs, base: &RedisArgs, id: &str) -> Result<Self> {
        if base.cluster_nodes.is_empty() {
            Self::claim(workers, base, id).await
        } else {
            Self::cluster(workers, base).await
        }
    }

    /// Whether this is a Redis Cluster (database 0, emptied for the run).
    pub fn is_cluster(&self) -> bool {
        self.base.is_none()
    }

    /// What the run uses, for its output: the database, or the emptied cluster.
    pub fn describe(&self) -> String {
        if self.is_cluster() {
            format!(
                "Redis Cluster ({} seed nodes), database 0: EMPTIED, FLUSHALL on every master before the run and after it",
                self.args.cluster_nodes.len()
            )
        } else {
            format!("Redis database {} (claimed, flushed)", self.index)
        }
    }

    /// The whole cluster of `base.cluster_nodes`, database 0, emptied: `FLUSHALL` on every
    /// master (the cluster client sends it to each), checked by `DBSIZE` (summed over the
    /// masters) being 0. `workers` are the producer's settings (the same cluster).
    pub async fn cluster(workers: &RedisArgs, base: &RedisArgs) -> Result<Self> {
        let store = RedisStore::connect(base).await.with_context(|| {
            format!(
                "connecting to the Redis Cluster {} (is the cluster layout up? STACK_LAYOUT=cluster bash deploy/stack-status.sh)",
                base.cluster_nodes.join(",")
            )
        })?;
        let slot = RedisSlot {
            args: workers.clone(),
            store,
            index: 0,
            base: None,
        };
        slot.flush()
            .await
            .context("emptying the Redis Cluster (FLUSHALL)")?;
        let keys: i64 = redis::cmd("DBSIZE")
            .query_async(&mut slot.store.connection())
            .await
            .context("DBSIZE of the Redis Cluster")?;
        if keys != 0 {
            bail!("the Redis Cluster still holds {keys} keys after FLUSHALL (another run or test writing to it? take /tmp/stockpipe-cluster.lock)");
        }
        eprintln!(
            "bench: Redis Cluster {}: every master emptied (FLUSHALL)",
            base.cluster_nodes.join(",")
        );
        Ok(slot)
    }

    /// Claims a database with the administrator's settings `base`; `workers` are the
    /// producer's. One Redis only: on a cluster, see [`RedisSlot::cluster`].
    pub async fn claim(workers: &RedisArgs, base: &RedisArgs, id: &str) -> Result<Self> {
        if !base.cluster_nodes.is_empty() {
            bail!("this bench runs on one Redis, not on a Redis Cluster: unset REDIS_CLUSTER_NODES (the plain layout: . deploy/env.sh)");
        }
        let client = stock_common::redis_store::client(base).context("Redis settings")?;
        let mut conn = stock_common::redis_store::raw_connection(&client)
            .await
            .with_context(|| {
                format!(
                    "connecting to {} (is the stack up? deploy/stack-up.sh)",
                    base.url
                )
            })?;
        let mut index = None;
        for _ in 0..REDIS_DBS {
            let n: u64 = redis::cmd("INCR")
                .arg(REDIS_COUNTER)
                .query_async(&mut conn)
                .await
                .context("picking a Redis database")?;
            let candidate = REDIS_FIRST_DB + (n % u64::from(REDIS_DBS)) as u32;
            let won: Option<String> = redis::cmd("SET")
                .arg(claim_key(candidate))
                .arg(id)
                .arg("NX")
                .arg("EX")
                .arg(86_400)
                .query_async(&mut conn)
                .await
                .context("claiming a Redis database")?;
            if won.is_some() {
                index = Some(candidate);
                break;
            }
        }
        let Some(index) = index else {
            bail!("every bench Redis database is claimed by another run (keys stockpipe:bench-claim:*)");
        };
        let args = with_redis_db(workers, i64::from(index)).map_err(|e| anyhow!(e))?;
        let own = with_redis_db(base, i64::from(index)).map_err(|e| anyhow!(e))?;
        let store = RedisStore::connect(&own)
            .await
            .with_context(|| format!("connecting to Redis database {index}"))?;
        let slot = RedisSlot {
            args,
            store,
            index,
            base: Some(conn),
        };
        if let Err(e) = slot.flush().await {
            slot.cleanup().await;
            return Err(e).with_context(|| format!("flushing Redis database {index}"));
        }
        Ok(slot)
    }

    /// `FLUSHDB ASYNC`: the database is empty at once and freed in the background (a
    /// synchronous flush of a run's 100k order records can outlast the client's timeout).
    /// On a cluster `FLUSHALL ASYNC`, sent to every master.
    pub async fn flush(&self) -> Result<(), redis::RedisError> {
        let cmd = if self.is_cluster() {
            "FLUSHALL"
        } else {
            "FLUSHDB"
        };
        redis::cmd(cmd)
            .arg("ASYNC")
            .query_async::<()>(&mut self.store.connection())
            .await
    }

    /// Flushes the database and releases the claim (on a cluster: empties it).
    pub async fn cleanup(self) {
        if let Err(e) = self.flush().await {
            tracing::warn!(index = self.index, error = %e, "could not flush the bench Redis database");
        }
        let Some(mut base) = self.base else {
            return;
        };
        let released: Result<(), _> = redis::cmd("DEL")
            .arg(claim_key(self.index))
            .query_async(&mut base)
            .await;
        if let Err(e) = released {
            tracing::warn!(index = self.index, error = %e, "could not release the Redis database claim");
        }
    }
}

/// The pipeline's five topics, prefixed `bench-<id>.`; deleted by [`BenchTopics::cleanup`].
pub struct BenchTopics {
    pub topics: Topics,
    pub partitions: i32,
    kafka: KafkaArgs,
}

/// The topic settings that keep about `retention` of a topic's messages on the broker:
/// `retention.ms`, and segments rolled every half of it (`segment.ms`), since the broker
/// deletes whole closed segments only. A topic then holds at most about 1.5 x
/// `retention` plus the broker's check interval (`log.retention.check.interval.ms`).
pub fn retention_config(retention: Duration) -> [(&'static str, String); 2] {
    let ms = retention.as_millis().max(1);
    [
        ("retention.ms", ms.to_string()),
        ("segment.ms", (ms / 2).max(1).to_string()),
    ]
}

impl BenchTopics {
    /// Creates the run's topics; with `retention`, they keep only about that long of
    /// messages ([`retention_config`]) instead of the broker's default (a week).
    pub async fn create(
        kafka: &KafkaArgs,
        id: &str,
        partitions: i32,
        retention: Option<Duration>,
    ) -> Result<Self> {
        let topics = Topics::prefixed(&format!("bench-{id}."));
        let config = retention.map(retention_config);
        let config: Vec<(&str, &str)> = config
            .iter()
            .flatten()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        stock_common::kafka::create_topics_with(kafka, &topics.all(), partitions, &config)
            .await
            .with_context(|| {
                format!(
                    "creating topics on {} (is the stack up? deploy/stack-up.sh)",
                    kafka.brokers
                )
            })?;
        Ok(BenchTopics {
            topics,
            partitions,
            kafka: kafka.clone(),
        })
    }

    pub async fn cleanup(self) {
        if let Err(e) = stock_devkit::topics::delete_topics(&self.kafka, &self.topics.all()).await {
            tracing::warn!(error = %e, "could not delete the bench topics");
        }
    }
}

/// Everything the pipeline needs, for one run.
pub struct PipelineEnv {
    pub id: String,
    pub kafka: KafkaArgs,
    pub topics: BenchTopics,
    pub db: BenchDb,
    pub redis: RedisSlot,
}

impl PipelineEnv {
    /// A run's topics, database and Redis database; `retention` bounds the topics' messages
    /// kept ([`BenchTopics::create`]).
    pub async fn create(
        stack: &Stack,
        partitions: i32,
        retention: Option<Duration>,
    ) -> Result<Self> {
        let id = run_id();
        let admin = stack.admin()?;
        let topics = BenchTopics::create(&admin.kafka, &id, partitions, retention).await?;
        let db = match BenchDb::create(&stack.db, &admin.db, &id, stack.db.max_connections).await {
            Ok(db) => db,
            Err(e) => {
                topics.cleanup().await;
                return Err(e);
            }
        };
        let redis = match RedisSlot::for_run(&stack.redis, &admin.redis, &id).await {
            Ok(r) => r,
            Err(e) => {
                topics.cleanup().await;
                db.cleanup().await;
                return Err(e);
            }
        };
        Ok(PipelineEnv {
            id,
            kafka: stack.kafka.clone(),
            topics,
            db,
            redis,
        })
    }

    pub fn topics(&self) -> &Topics {
        &self.topics.topics
    }

    pub fn partitions(&self) -> i32 {
        self.topics.partitions
    }

    pub async fn cleanup(self) {
        self.redis.cleanup().await;
        self.db.cleanup().await;
        self.topics.cleanup().await;
    }
}
