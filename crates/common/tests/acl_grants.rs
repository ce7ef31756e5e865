//! Every command the Lua scripts call is granted to the producer's least-privilege Redis
//! user (`deploy/redis-users.acl`): scripts run with the caller's ACL, so a command
//! missing there fails every script that calls it on the secure layout, and with it every
//! batch (session 12: `HSETNX`, found only by the secure layout's end-to-end tests).

use std::collections::BTreeSet;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("the workspace root")
}

/// The commands granted to `stockpipe-producer`, lower case (`+get` → `get`).
fn producer_grants() -> BTreeSet<String> {
    let acl = std::fs::read_to_string(repo().join("deploy/redis-users.acl")).expect("acl");
    let line = acl
        .lines()
        .find(|l| l.starts_with("user stockpipe-producer "))
        .expect("the producer's user line");
    line.split_whitespace()
        .filter_map(|w| w.strip_prefix('+'))
        .map(str::to_ascii_lowercase)
        .collect()
}

/// The commands `redis.call('X', ...)` of every script, lower case; also `call('X', ...)`,
/// the local that `lua/prelude.lua` (first in every script) makes of `redis.call`.
fn script_commands() -> BTreeSet<String> {
    let dir = repo().join("crates/common/src/lua");
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("lua dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("lua") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("script");
        let mut parts = text.split("call(");
        let mut before = parts.next().unwrap_or_default();
        for part in parts {
            // `redis.call(` or `call(` alone, not the end of a longer name (`pcall(`).
            let named = before
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            before = part;
            if named {
                continue;
            }
            let Some(rest) = part.trim_start().strip_prefix('\'') else {
                panic!("{}: redis.call without a literal command", path.display());
            };
            let name: String = rest.chars().take_while(|c| *c != '\'').collect();
            found.insert(name.to_ascii_lowercase());
        }
    }
    found
}

#[test]
fn every_command_a_script_calls_is_granted_to_the_producer() {
    let granted = producer_grants();
    let called = script_commands();
    assert!(called.len() > 10, "scripts read: {called:?}");
    let missing: Vec<&String> = called.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "the scripts call {missing:?}, which deploy/redis-users.acl does not grant to stockpipe-producer"
    );
}
