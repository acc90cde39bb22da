#!/usr/bin/env bash
# One nightly batch run of the pipeline; meant for cron or a systemd timer (docs/nightly.md).
#   scripts/nightly.sh [PROFILE] [more snakemake arguments...]     PROFILE defaults to profiles/slurm
# Two runs never overlap: a run that finds logs/nightly/.lock held, or the folder's Snakemake
# lock held by a live run (a manual `snakemake ...`), exits at once with status 75. A Snakemake
# lock that no live process holds (left by a killed run) is released first; NIGHTLY_UNLOCK=never
# reports it and exits 75 instead (set it when runs on other hosts share this folder).
# Each night logs to logs/nightly/<date-time>.log; the exit status is snakemake's.
set -uo pipefail
cd "$(dirname "$0")/.."
profile="${1:-profiles/slurm}"
shift $(( $# > 0 ? 1 : 0 ))
snakemake="${SNAKEMAKE:-.venv/bin/snakemake}"
unet_core="${UNET_CORE:-.venv/bin/unet-core}"
unlock="${NIGHTLY_UNLOCK:-stale}"
if [[ "$unlock" != stale && "$unlock" != never ]]; then
    echo "NIGHTLY_UNLOCK must be 'stale' (the default) or 'never', got '$unlock'" >&2
    exit 2
fi
mkdir -p logs/nightly
log="logs/nightly/$(date +%Y-%m-%dT%H%M%S).log"

exec 9>logs/nightly/.lock
if ! flock --nonblock 9; then
    echo "$(date -Is) a nightly run is still going (logs/nightly/.lock is held); not starting another" >&2
    exit 75
fi

# Snakemake's own lock: never break the lock of a live run (unet_core.snakemake_lock).
lock_state="$("$unet_core" snakemake-lock . 2>&1)"
lock_status=$?
case "$lock_status" in
    0) ;;
    3) if [[ "$unlock" == never ]]; then
           echo "$(date -Is) $lock_state; not unlocking (NIGHTLY_UNLOCK=never): check that no run is alive," \
                "then 'snakemake --unlock'" >&2
           exit 75
       fi ;;
    75) echo "$(date -Is) $lock_state; not starting beside it (the next night runs what is left)" >&2
        exit 75 ;;
    *) echo "$(date -Is) cannot check the Snakemake lock: $lock_state" >&2
       exit "$lock_status" ;;
esac

{
    echo "$(date -Is) nightly run: profile $profile, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [[ "$lock_status" == 3 ]]; then
        # Left behind by a killed run (power cut, scancel of the head job): release it, after
        # looking once more (a manual run may have unlocked and started meanwhile).
        lock_state="$("$unet_core" snakemake-lock . 2>&1)"
        if [[ $? == 3 ]]; then
            echo "$(date -Is) $lock_state; releasing it (snakemake --unlock)"
            "$snakemake" --profile "$profile" --unlock "$@"
        else
            echo "$(date -Is) the stale lock changed meanwhile: $lock_state"
        fi
    fi
    "$snakemake" --profile "$profile" "$@"
    status=$?
    echo "$(date -Is) nightly run finished with status $status (report: results/report/index.html)"
    exit "$status"
} >"$log" 2>&1
