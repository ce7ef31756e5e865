#!/usr/bin/env bash
# The main job: bring the local stack up, then run both workers against a demo load of
# order events and print a summary (outcomes, stock in PostgreSQL and Redis, invariants).
#   bash deploy/demo.sh [demo flags, e.g. --orders 50000]
#   STACK_LAYOUT=secure bash deploy/demo.sh [...]   the same on the secure layout (TLS, ACL users)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
bash deploy/stack-up.sh
# shellcheck source=deploy/env.sh
. deploy/env.sh
export RUST_LOG="${RUST_LOG:-warn}"
# The demo is a binary of the dev-only crate stock-devkit (it ships in no release artefact).
cargo run --release --quiet -p stock-devkit --bin demo -- "$@"
