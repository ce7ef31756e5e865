//! Rebuilds this crate when a migration is added, changed or removed: `sqlx::migrate!`
//! embeds `migrations/` at compile time, and without this an incremental build keeps the
//! list it saw first (a new migration would be missing from the binaries).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
