#!/usr/bin/env bash
# The whole test suite: brings the local stack up (idempotent), checks formatting and lints,
# builds the worker binaries (the crash tests run them as processes), runs every test.
#   bash deploy/test.sh [extra cargo test args]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
bash deploy/stack-up.sh
# shellcheck source=deploy/env.sh
. deploy/env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins --quiet
cargo test --workspace "$@"
