//! Development-only support of the stock pipeline (`publish = false`): what the end-to-end
//! tests, the benchmarks and the demo share. Nothing here ships in the workers or in
//! `stockctl`.
//!
//! # Layout
//! * [`harness`]: publish order events and collect results, as the order service would.
//! * [`stack`]: the services to run against, with the workers' and the administrator's
//!   credentials (plaintext or secure layout).
//! * [`rng`]: the seeded generator of demo, nemesis and benchmark loads.
//! * [`topics`]: deleting a run's topics; reading topics, watermarks and committed offsets
//!   from outside the pipeline.
//! * [`worker_args`]: worker settings built from the binaries' own clap definitions and
//!   defaults, with per-use overrides as flags; for workers in this process and for child
//!   processes alike.
//! * [`demo`]: both workers fed by a demo load, with a summary (the `demo` binary,
//!   `deploy/demo.sh`).

pub mod demo;
pub mod harness;
pub mod rng;
pub mod stack;
pub mod topics;
pub mod worker_args;
