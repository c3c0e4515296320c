#!/usr/bin/env bash
# The README walkthrough, end to end: run -> paused -> approve -> resume -> show.
# Everything lands in ./demo-run (journal and refund ledger); nothing leaves the machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
rm -rf demo-run && mkdir demo-run
export TETHER_DB="$PWD/demo-run/tether.db" REFUND_LEDGER="$PWD/demo-run/ledger.sqlite"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step tether run "$here" --input '{"order_id": "A-1001", "reason": "kettle arrived broken"}' \
     --model "script:$here/proposals.json"
run_id=$(tether runs --json | python -c 'import json,sys; print(json.load(sys.stdin)[0]["run_id"])')
step tether approvals
ticket=$(tether approvals --json | python -c 'import json,sys; print(json.load(sys.stdin)[0]["ticket_id"])')
step tether approve "$ticket" --reason "photo of the broken kettle checks out"
step tether resume "$run_id"
step tether show "$run_id"
