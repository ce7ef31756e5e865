//! Failpoints: the crash windows of `docs/DESIGN.md` made executable. Each window has a
//! named point in the code ([`failpoint!`]) where a test can make the worker crash, stall
//! or panic, then restart it and check the guarantees (`crates/e2e/tests/failpoints.rs`).
//!
//! # Only in test builds
//! Everything here is compiled in only with this crate's `failpoints` feature (which enables
//! the `fail` crate's). Without it [`failpoint!`] expands to no code and [`setup`] does
//! nothing, so `cargo build --release -p stock-producer -p stock-consumer` carries none of
//! it. The test build has it: `stock-e2e` enables `stock-common/failpoints`, and cargo
//! (resolver 2) unifies a package's features over every package selected for one build,
//! so `cargo build --workspace --bins` (what `deploy/test.sh` runs) builds the worker
//! binaries with failpoints, dormant unless `FAILPOINTS` names them.
//!
//! # Configuration
//! A worker reads `FAILPOINTS` once at start ([`setup`]), in the fail crate's syntax:
//! `FAILPOINTS='consumer.after_step=1*return'`, several separated by `;`. Actions:
//! * `return`: **crash** — abort the process on the spot, as `kill -9` would stop it: no
//!   destructor runs, the Kafka producer's queue is not flushed, no offset is committed.
//!   A line `failpoint <name>: crash` goes to stderr first, so a test can tell where.
//! * `sleep(ms)`, `delay(ms)`, `pause`, `panic`, `print`, `yield`: the fail crate's. A stall
//!   holds up the task that reaches the point, not the runtime: [`failpoint!`] expands to an
//!   `.await`, and an armed point is evaluated on the blocking pool ([`eval`]).
//!
//! # The points
//! | name | window |
//! |---|---|
//! | `<worker>.after_step` | the batch's Redis scripts ran / PostgreSQL transaction committed; nothing published |
//! | `<worker>.after_publish` | every delivery report of the batch is in; its offsets not stored |
//! | `<worker>.after_store` | the batch's offsets stored; not committed (auto-commit runs every second) |
//! | `consumer.expiry.after_release` | the sweeper's release transaction committed; nothing announced |
//! | `consumer.expiry.after_announce` | the release's result and compensation delivered; `announced` still false |
//! | `producer.before_step` | a batch read, no script run |
//! | `producer.mid_redis` | some of a batch's round trips of reserve scripts answered |
//! | `consumer.before_commit` | the batch's transaction done, not committed |
//! | `consumer.expiry.before_commit` | the sweeper's release done, not committed |
//! | `rebuild.after_stop` | `stockctl rebuild`: loaded marker deleted, generation not advanced |
//! | `rebuild.after_fence` | `stockctl rebuild`: generation advanced (`loading`), Redis not loaded |
//! | `<worker>.delivery_hang` | a batch's output enqueued; with `return` its delivery reports never come (a stalled client: the worker must exit on `--kafka-stall-timeout`) |
//!
//! `<worker>` is `producer` or `consumer` ([`crate::batch_loop::BatchStep::name`]).

/// Marks a crash window named by `$name` (an expression giving a `&str` or `String`).
///
/// With the `failpoints` feature it evaluates the failpoint (see the module docs); it
/// expands to an `.await`, so it marks points in async code only. Without it, the name is
/// type-checked in a closure that is never called: no code, no string, no registry look-up
/// in the binary, and both builds compile the same source.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        $crate::failpoint::eval(&$name).await
    };
}

/// Marks a crash window named by `$name` (an expression giving a `&str` or `String`).
///
/// With the `failpoints` feature it evaluates the failpoint (see the module docs); it
/// expands to an `.await`, so it marks points in async code only. Without it, the name is
/// type-checked in a closure that is never called: no code, no string, no registry look-up
/// in the binary, and both builds compile the same source.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {{
        let _ = || $name;
    }};
}

/// Marks a point where a test makes the task hang for ever (a wait that never ends) with
/// `return`: `<worker>.delivery_hang`, the delivery reports of a stalled Kafka client.
/// Without the `failpoints` feature, no code. Expands to an `.await`.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! failpoint_hang {
    ($name:expr) => {
        $crate::failpoint::hang(&$name).await
    };
}

/// Marks a point where a test makes the task hang for ever (a wait that never ends) with
/// `return`: `<worker>.delivery_hang`, the delivery reports of a stalled Kafka client.
/// Without the `failpoints` feature, no code. Expands to an `.await`.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! failpoint_hang {
    ($name:expr) => {{
        let _ = || $name;
    }};
}

/// Evaluates failpoint `name` as a hang: armed with `return`, never returns (the task
/// stays pending); other actions are the fail crate's. Called through [`failpoint_hang!`].
#[cfg(feature = "failpoints")]
pub async fn hang(name: &str) {
    if fail::eval(name, |_| ()).is_some() {
        tracing::warn!(failpoint = name, "hanging here for ever");
        std::future::pending::<()>().await;
    }
}

/// Evaluates failpoint `name`: `return` crashes the process, other actions are the fail
/// crate's. Called through [`failpoint!`].
///
/// An armed point is evaluated on Tokio's blocking pool while the task waits for it: a
/// stall (`sleep`, `pause`, `delay`) holds up the task at that point and nothing else. The
/// workers run a single-threaded runtime, which a stall on its thread would stop whole
/// (`/metrics`, timers, the expiry sweeper). A `panic` is resumed in the task.
#[cfg(feature = "failpoints")]
pub async fn eval(name: &str) {
    if !fail::list().iter().any(|(armed, _)| armed == name) {
        return;
    }
    let name = name.to_owned();
    let evaluated = tokio::task::spawn_blocking(move || {
        fail::eval(&name, |_| crash(&name));
    })
    .await;
    if let Err(e) = evaluated {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// Ends the process at once, like `kill -9`: no unwinding, no destructors, no flush.
#[cfg(feature = "failpoints")]
fn crash(name: &str) -> ! {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "failpoint {name}: crash");
    std::process::abort()
}

/// This process's failpoint configuration; keep it for the life of the process.
#[must_use = "the failpoints are disarmed when the scenario is dropped"]
pub struct Scenario {
    #[cfg(feature = "failpoints")]
    _scenario: fail::FailScenario<'static>,
}

/// Arms the failpoints named in `FAILPOINTS` (with the feature; nothing without it). Call
/// once at start, after logging is set up. Panics on a malformed `FAILPOINTS`: a test
/// asked for a crash window that it would not get.
pub fn setup() -> Scenario {
    #[cfg(feature = "failpoints")]
    {
        let scenario = fail::FailScenario::setup();
        tracing::info!(armed = ?fail::list(), "failpoints compiled in");
        Scenario {
            _scenario: scenario,
        }
    }
    #[cfg(not(feature = "failpoints"))]
    Scenario {}
}
