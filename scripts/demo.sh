#!/usr/bin/env bash
# make demo: build the agent, then run the demo driver (tests/src/bin/demo.rs), which starts
# throwaway servers from .deps/, runs the agent against them and checks what it restores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p syncbridge-agent -p syncbridge-tests --bin syncbridge-agent --bin demo
exec target/debug/demo "$@"
