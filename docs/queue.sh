#!/usr/bin/env bash
# Run reference jobs from a file (one `docs/run_reference.sh ...` line each), N at a time, a log per job.
# usage: docs/queue.sh JOBS_FILE [N]
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
grep -v '^\s*#' "$1" | grep -v '^\s*$' | xargs -P "${2:-2}" -I{} bash -c 'set -- {}; log="logs/$2-seed$3.log"; echo "start $2-seed$3"; {} > "$log" 2>&1; echo "done $2-seed$3 rc=$?"'
