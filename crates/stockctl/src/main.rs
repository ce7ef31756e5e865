use clap::{Parser, Subcommand};
use std::process::ExitCode;
use stock_common::config::{DatabaseArgs, KafkaArgs, LogArgs, RedisArgs, Topics};
use stock_common::redis_store::{RedisStore, Risk};
use stockctl::admin;

/// Operators' tool for the stock pipeline.
///
/// Exit status: 0 done; 1 `check` left a difference or `show` found no stock row; 2 error.
/// Stock that leaves is taken from Redis first and PostgreSQL second; stock that comes back
/// or is added goes into PostgreSQL first and Redis second (see `admin`).
#[derive(Parser)]
#[command(name = "stockctl", version)]
struct Cli {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply the database migrations (with the role that owns the schema), then give each
    /// `--grant` role what the consumer and the operators' commands need and no more: data
    /// manipulation on the tables, now and on tables later migrations add; no DDL.
    Migrate {
        /// A role to grant the workers' privileges to (repeat for several).
        #[arg(long = "grant", value_name = "ROLE")]
        grant: Vec<String>,
    },
    /// Create the pipeline's topics (skipping those that exist).
    CreateTopics {
        #[command(flatten)]
        topics: Topics,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Add QUANTITY units to an existing product: PostgreSQL, then Redis; once per request id.
    Restock {
        #[arg(long)]
        product: i64,
        #[arg(long)]
        quantity: i64,
        /// Retry a restock with the id it printed: it is applied once in both stores.
        /// A new UUID when not given.
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make a product's available stock exactly STOCK (reserved and sold kept): an increase
    /// goes into PostgreSQL then Redis, a decrease is taken from Redis then PostgreSQL.
    Set {
        #[arg(long)]
        product: i64,
        #[arg(long)]
        stock: i64,
        /// Change it even if the product has reservations or sales.
        #[arg(long)]
        force: bool,
        /// Retry a set with the id it printed: it is applied once in both stores.
        /// A new UUID when not given.
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Set, change or remove a product's per-customer limit: the most units one customer
    /// may hold in reserved and confirmed orders. PostgreSQL, then Redis; once per request
    /// id. Adding a limit to a product without one reloads Redis (`stockctl rebuild`:
    /// selling pauses for the load) so that every customer's count comes with it; lowering
    /// it never takes back what a customer holds.
    #[command(group = clap::ArgGroup::new("to").required(true).args(["per_customer", "none"]))]
    Limit {
        #[arg(long)]
        product: i64,
        /// The most units one customer may hold (0 refuses every order).
        #[arg(long)]
        per_customer: Option<i64>,
        /// Remove the limit (and every customer's count).
        #[arg(long)]
        none: bool,
        /// Retry a change with the id it printed: it is applied once in both stores.
        /// A new UUID when not given.
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// A product's stock in PostgreSQL and Redis, the orders holding reservations of it,
    /// and its per-customer limit with the customers nearest it.
    Show {
        #[arg(long)]
        product: i64,
        /// How many open reservations (and customers nearest the limit) to list.
        #[arg(long, default_value_t = 20)]
        orders: i64,
        #[arg(long)]
        json: bool,
    },
    /// A product's stock movements, newest first (one line per kind per batch, summing its
    /// orders of the product), or with `--order` one order's story from the ledger.
    #[command(group = clap::ArgGroup::new("what").required(true).args(["product", "order"]))]
    History {
        #[arg(long)]
        product: Option<i64>,
        #[arg(long)]
        order: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Stop selling, load Redis from PostgreSQL (stock, the records of held reservations,
    /// limits and customers' counts) in a new generation, resume selling. Safe while the
    /// workers run; waits for nothing.
    Rebuild {
        /// On a Redis Cluster, only the slots whose loaded marker is missing (a master that
        /// restarted empty): only they stop selling.
        #[arg(long, conflicts_with = "slots")]
        lost: bool,
        /// On a Redis Cluster, only these slots (`0-5460,10923`).
        #[arg(long, value_parser = parse_slots, conflicts_with = "master")]
        slots: Option<std::collections::BTreeSet<u16>>,
        /// On a Redis Cluster, only the slots the master at HOST:PORT serves: a replica
        /// promoted by a failover, which may lack writes its old master acknowledged.
        #[arg(long, value_parser = parse_master, conflicts_with = "lost")]
        master: Option<(String, u16)>,
    },
    /// Drift check (pipeline idle): every `stock:{p}` against `available`, every limit and
    /// customer's count against PostgreSQL's, and conservation; and Redis's settings that
    /// would lose decisions on a restart (no AOF; an ACL user `default` that may not run
    /// every command). Exit 1 when a difference is left unrepaired or such a setting found.
    Check {
        /// On any difference, rebuild Redis from PostgreSQL (the truth).
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = stock_common::config::parse();
    stock_common::telemetry::init(cli.log.format);
    let _failpoints = stock_common::failpoint::setup();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    use anyhow::Context;
    let pool = || stock_common::db::pool(&cli.db);
    let redis = || async {
        RedisStore::connect(&cli.redis)
            .await
            .with_context(|| format!("redis: cannot connect to {}", cli.redis.url))
    };
    match &cli.cmd {
        Cmd::Migrate { grant } => {
            let pool = pool()?;
            stock_common::db::migrate(&pool)
                .await
                .with_context(|| format!("migrating {}", cli.db.url))?;
            println!("migrations applied");
            for role in grant {
                stock_common::db::grant(&pool, role)
                    .await
                    .with_context(|| format!("granting {role} the workers' privileges"))?;
                println!("granted {role} the workers' privileges");
            }
        }
        Cmd::CreateTopics { topics, partitions } => {
            // A refused certificate or password is named at once, not after librdkafka's
            // own timeout.
            stock_common::kafka::check(&cli.kafka, std::time::Duration::from_secs(30)).await?;
            stock_common::kafka::create_topics(&cli.kafka, &topics.all(), *partitions).await?;
            println!("topics ready: {}", topics.all().join(", "));
        }
        Cmd::Restock {
            product,
            quantity,
            request_id,
            json,
        } => {
            let id = request_id_or_new(request_id.as_deref());
            let c = admin::restock(&pool()?, &redis().await?, *product, *quantity, &id).await?;
            print_change(&c, *json)?;
        }
        Cmd::Set {
            product,
            stock,
            force,
            request_id,
            json,
        } => {
            let id = request_id_or_new(request_id.as_deref());
            let (pool, store) = (pool()?, redis().await?);
            let c =
                admin::set_stock_with_request(&pool, &store, *product, *stock, *force, &id).await?;
            print_change(&c, *json)?;
        }
        Cmd::Limit {
            product,
            per_customer,
            none: _,
            request_id,
            json,
        } => {
            let id = request_id_or_new(request_id.as_deref());
            let (pool, store) = (pool()?, redis().await?);
            let c =
                stockctl::limits::set_limit(&pool, &store, *product, *per_customer, &id).await?;
            print_limit(&c, *json)?;
        }
        Cmd::Show {
            product,
            orders,
            json,
        } => {
            let r = admin::show(&pool()?, &redis().await?, *product, *orders).await?;
            print_show(&r, *json)?;
            return Ok(r.postgres.is_some());
        }
        Cmd::History {
            product,
            order,
            limit,
            json,
        } => {
            if let Some(order) = order {
                let story = admin::order_story(&pool()?, order).await?;
                print_story(order, story.as_ref(), *json)?;
                return Ok(story.is_some());
            }
            if let Some(product) = product {
                let h = admin::history(&pool()?, *product, *limit).await?;
                print_history(*product, &h, *json)?;
            }
        }
        Cmd::Rebuild {
            lost,
            slots,
            master,
        } => {
            use stockctl::rebuild::{rebuild, rebuild_slots, Slots};
            let (pool, store) = (pool()?, redis().await?);
            let which = match (lost, slots, master) {
                (true, ..) => Some(Slots::Lost),
                (false, Some(s), _) => Some(Slots::Named(s.clone())),
                (false, None, Some((h, p))) => Some(Slots::OfMaster(h.clone(), *p)),
                (false, None, None) => None,
            };
            let r = match which {
                Some(w) => rebuild_slots(&pool, &store, w).await?,
                None => rebuild(&pool, &store).await?,
            };
            if r.generation == 0 {
                println!("no slot lost: nothing rebuilt");
            } else if r.slots.is_empty() {
                println!(
                    "redis rebuilt: generation {}, {} products, {} held reservations (selling stopped for {} ms)",
                    r.generation, r.products, r.held, r.stopped_ms
                );
            } else {
                println!(
                    "redis slots {} rebuilt: generation {}, {} products, {} held reservations, \
                     {} holds of orders whose record was there given back (selling stopped there \
                     for {} ms)",
                    r.slots, r.generation, r.products, r.held, r.orphans, r.stopped_ms
                );
            }
        }
        Cmd::Check { repair, json } => {
            let r = admin::check_drift(&pool()?, &redis().await?, *repair).await?;
            print_check(&r, *repair, *json)?;
            return Ok(r.clean());
        }
    }
    Ok(true)
}

/// The given request id, or a new one announced on stderr before anything is done, so
/// that an interrupted command can be retried with it.
fn request_id_or_new(given: Option<&str>) -> String {
    match given {
        Some(id) => id.to_owned(),
        None => {
            let id = admin::new_request_id();
            eprintln!("request id {id} (to retry this change: --request-id {id})");
            id
        }
    }
}

fn step(s: admin::Step) -> &'static str {
    match s {
        admin::Step::Applied => "applied",
        admin::Step::Already => "already applied (same request id)",
        admin::Step::Unchanged => "unchanged",
        admin::Step::Unloaded => "not loaded",
        admin::Step::Loaded => "loaded by a rebuild",
        admin::Step::Expired => "not touched (request older than --order-memory)",
    }
}

fn print_change(c: &admin::StockChange, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(c)?);
    } else {
        println!(
            "product {}: {} {:+} (request {}): postgres {}, redis {}",
            c.product_id,
            c.kind,
            c.available_delta,
            c.request_id,
            step(c.postgres),
            step(c.redis)
        );
        println!(
            "now: available {}, reserved {}, sold {}, total_added {}",
            c.row.available, c.row.reserved, c.row.sold, c.row.total_added
        );
    }
    match c.redis {
        admin::Step::Unloaded => eprintln!(
            "note: Redis is not loaded; PostgreSQL has the change. Retry with the same \
             --request-id once Redis is loaded: it adds nothing twice"
        ),
        admin::Step::Expired => eprintln!(
            "note: this request is older than Redis remembers requests; Redis was left \
             alone. Run `stockctl check` when the pipeline is idle"
        ),
        _ => {}
    }
    Ok(())
}

fn print_limit(c: &stockctl::limits::LimitChange, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(c)?);
        return Ok(());
    }
    let show = |n: Option<i64>| n.map_or("none".to_owned(), |n| format!("{n} per customer"));
    println!(
        "product {}: limit {} -> {} (request {}): postgres {}, redis {}",
        c.product_id,
        show(c.previous),
        show(c.per_customer),
        c.request_id,
        step(c.postgres),
        step(c.redis)
    );
    if c.redis == admin::Step::Unloaded {
        eprintln!(
            "note: Redis is not loaded; PostgreSQL has the change and the next \
             `stockctl rebuild` loads it"
        );
    }
    Ok(())
}

fn print_history(product: i64, h: &[admin::Movement], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(h)?);
    } else if h.is_empty() {
        println!("product {product}: no stock movements");
    } else {
        println!(
            "{:<32} {:<18} {:>7} {:>9} {:>9} {:>9} {:>9}  ref (first order or request)",
            "at", "kind", "orders", "quantity", "avail", "reserved", "sold"
        );
        for m in h {
            println!(
                "{:<32} {:<18} {:>7} {:>9} {:>+9} {:>+9} {:>+9}  {}",
                m.at.to_rfc3339(),
                m.kind,
                m.orders,
                m.quantity,
                m.available_delta,
                m.reserved_delta,
                m.sold_delta,
                m.reference
            );
        }
    }
    Ok(())
}

fn print_story(order: &str, story: Option<&admin::OrderStory>, json: bool) -> anyhow::Result<()> {
    match (story, json) {
        (Some(s), true) => println!("{}", serde_json::to_string(s)?),
        (None, true) => println!("null"),
        (None, false) => println!("order {order:?}: not in the ledger (never decided)"),
        (Some(s), false) => {
            println!("order {:?}: {}", s.order_id, s.status);
            println!("  items: {}", s.items);
            println!("  decided at: {}", s.created_at.to_rfc3339());
            if let Some(r) = &s.reject_reason {
                match s.reject_product {
                    Some(p) => println!("  rejected: {r} (product {p})"),
                    None => println!("  rejected: {r}"),
                }
            }
            if let Some(until) = s.reserved_until {
                println!("  reserved until: {}", until.to_rfc3339());
            }
            if let Some(at) = s.settled_at {
                println!(
                    "  settled at: {} by {}{}",
                    at.to_rfc3339(),
                    s.settled_by.as_deref().unwrap_or("?"),
                    s.release_reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

fn print_show(r: &admin::ProductReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!("product {}", r.product_id);
    match &r.postgres {
        Some(row) => println!(
            "  postgres: available {}, reserved {}, sold {}, total_added {}",
            row.available, row.reserved, row.sold, row.total_added
        ),
        None => println!("  postgres: no stock row"),
    }
    println!(
        "  redis:    {}{}",
        match (&r.redis, &r.redis_corrupt) {
            (Some(v), _) => v.to_string(),
            (None, Some(raw)) => format!("{raw:?} (not an integer: `stockctl check --repair`)"),
            (None, None) => "no key".into(),
        },
        if r.redis_loaded {
            ""
        } else {
            " (redis not loaded: run `stockctl rebuild`)"
        }
    );
    let o = &r.open_reservations;
    println!(
        "  open reservations: {} orders, {} units",
        o.orders, o.quantity
    );
    for x in &o.first {
        println!(
            "    {}  {}  until {}",
            x.order_id,
            x.quantity,
            x.reserved_until
                .map(|t| t.to_rfc3339())
                .unwrap_or("-".into())
        );
    }
    if o.orders > o.first.len() as i64 {
        println!("    … {} more", o.orders - o.first.len() as i64);
    }
    let l = &r.limit;
    match (l.per_customer, l.redis) {
        (None, None) => println!("  limit: none"),
        (pg, redis) => {
            let show = |n: Option<i64>| n.map_or("none".to_owned(), |n| n.to_string());
            println!(
                "  limit per customer: postgres {}, redis {}; {} customers hold units",
                show(pg),
                show(redis),
                l.customers
            );
            for (customer, units) in &l.nearest {
                println!("    {customer}  {units}");
            }
        }
    }
    Ok(())
}

fn print_check(r: &admin::DriftReport, repair: bool, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let show = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or("missing".into());
    for d in &r.drift {
        if r.repaired.contains(d) {
            println!(
                "product {}: redis {} -> {} (repaired from postgres)",
                d.product_id,
                show(d.redis),
                d.postgres
            );
        } else {
            println!(
                "product {}: redis {}, postgres {}",
                d.product_id,
                show(d.redis),
                d.postgres
            );
        }
    }
    for v in &r.violations {
        println!("product {}: {}", v.product_id, v.what);
    }
    for d in &r.limits {
        let fixed = if r.limits_repaired {
            " (repaired from postgres)"
        } else {
            ""
        };
        println!("product {}: {}{fixed}", d.product_id, d.what);
    }
    for risk in &r.redis_risks {
        match risk {
            Risk::Danger(what) => println!("redis setting: {what}"),
            Risk::Note(what) => println!("redis setting (note): {what}"),
            Risk::Unknown(what) => println!("redis settings not checked: {what}"),
        }
    }
    if !r.redis_loaded {
        println!("redis not loaded: run `stockctl rebuild` (nothing repaired)");
    } else if repair && r.repaired.len() < r.drift.len() {
        println!(
            "{} keys changed while checking and were left alone: check again",
            r.drift.len() - r.repaired.len()
        );
    }
    if r.clean() {
        if r.drift.is_empty() && r.limits.is_empty() {
            println!(
                "ok: {} products, redis equals available, every product conserved, \
                 limits and customers' counts equal",
                r.products
            );
        } else {
            println!("ok after repair: {} keys set", r.repaired.len());
        }
    }
    Ok(())
}

fn parse_slots(text: &str) -> Result<std::collections::BTreeSet<u16>, String> {
    stock_common::redis_store::slots::parse_ranges(text)
}

fn parse_master(text: &str) -> Result<(String, u16), String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?}: HOST:PORT expected"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port"))?;
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
