#!/usr/bin/env bash
# One nightly batch run of the pipeline; meant for cron or a systemd timer (docs/nightly.md).
#   scripts/nightly.sh [PROFILE] [more snakemake arguments...]     PROFILE defaults to profiles/slurm
# Two runs never overlap: a run that finds the lock held exits at once with status 75.
# Each night logs to logs/nightly/<date-time>.log; the exit status is snakemake's.
set -uo pipefail
cd "$(dirname "$0")/.."
profile="${1:-profiles/slurm}"
shift $(( $# > 0 ? 1 : 0 ))
snakemake="${SNAKEMAKE:-.venv/bin/snakemake}"
mkdir -p logs/nightly
log="logs/nightly/$(date +%Y-%m-%dT%H%M%S).log"

exec 9>logs/nightly/.lock
if ! flock --nonblock 9; then
    echo "$(date -Is) a nightly run is still going (logs/nightly/.lock is held); not starting another" >&2
    exit 75
fi

{
    echo "$(date -Is) nightly run: profile $profile, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    # We hold the lock, so no other run is alive: release Snakemake's own lock that a killed
    # run (power cut, scancel of the head job) may have left behind.
    "$snakemake" --profile "$profile" --unlock "$@"
    "$snakemake" --profile "$profile" "$@"
    status=$?
    echo "$(date -Is) nightly run finished with status $status (report: results/report/index.html)"
    exit "$status"
} >"$log" 2>&1
