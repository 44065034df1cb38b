#!/usr/bin/env bash
# Reproduce the pipeline in CI and summarise what moved, as Markdown.
#
#   scripts/ci_repro.sh [BASE_REV [TARGET...]]
#
# BASE_REV (default: $CI_BASE_REV, else HEAD): the revision params/metrics are compared against.
# TARGET: stages to reproduce (with their upstream), passed to `dvc repro`; default: all.
# Environment:
#   DVC_CACHE_DIR   a DVC cache kept between CI runs (restored/saved by the CI's cache action); set as
#                   this checkout's local cache dir (.dvc/config.local, untracked).
#   CI_SUMMARY      file the Markdown summary is appended to (e.g. $GITHUB_STEP_SUMMARY); always
#                   printed to stdout too.
#   CI_REPRO_LOG    where the full `dvc repro` log goes (default: a temp file).
#   PREFECT_API_URL if set, the stages report to that Prefect server; otherwise this script starts one
#                   local server for all stages (one ~18 s start-up instead of one per stage).
#                   CI_PREFECT_SERVER=0 disables that (each stage then starts an ephemeral server).
# Exit status: that of `dvc repro` (the summary is written either way).
set -uo pipefail
cd "$(dirname "$0")/.."

base="${1:-${CI_BASE_REV:-HEAD}}"
targets=("${@:2}")
log="${CI_REPRO_LOG:-$(mktemp -t dvc-repro.XXXXXX)}"
summary="$(mktemp -t ci-summary.XXXXXX)"
server_pid=""
cleanup() {
    # the server runs in its own process group: stop it with its uvicorn child
    if [ -n "$server_pid" ]; then kill -- -"$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; fi
    rm -f "$summary"
}
trap cleanup EXIT

command -v dvc >/dev/null || { echo "ci_repro: dvc not found (activate the project's venv)" >&2; exit 127; }

export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-90}"
export DO_NOT_TRACK="${DO_NOT_TRACK:-1}"

if [ -n "${DVC_CACHE_DIR:-}" ]; then
    mkdir -p "$DVC_CACHE_DIR"
    dvc cache dir --local "$DVC_CACHE_DIR"
fi

start_prefect_server() {
    local port
    port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    setsid prefect server start --host 127.0.0.1 --port "$port" >"${log}.prefect" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 180); do
        if python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:${port}/api/health', timeout=2)" 2>/dev/null; then
            export PREFECT_API_URL="http://127.0.0.1:${port}/api"
            return 0
        fi
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.5
    done
    echo "ci_repro: Prefect server did not start (see ${log}.prefect); stages use ephemeral servers" >&2
    kill -- -"$server_pid" 2>/dev/null
    server_pid=""
}
# Outputs recorded in dvc.lock come back from the cache (missing objects are fine: repro makes them).
dvc checkout --allow-missing >/dev/null 2>&1 || true

# A server only pays off when some stage will run (`dvc status -q` exits non-zero then).
if [ -z "${PREFECT_API_URL:-}" ] && [ "${CI_PREFECT_SERVER:-1}" != 0 ] && ! dvc status -q "${targets[@]}" >/dev/null 2>&1; then
    start_prefect_server
fi

start=$(date +%s)
dvc repro "${targets[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
elapsed=$(( $(date +%s) - start ))

stage_list() {  # stage names captured by the sed regex $1 in the log, as `a`, `b`
    sed -n "s/$1.*/\`\1\`/p" "$log" | paste -sd, - | sed 's/,/, /g'
}
ran="$(stage_list "^Running stage '\([^']*\)'")"
restored="$(stage_list "^Stage '\([^']*\)' is cached")"

{
    echo "## dvc repro"
    echo
    if [ "$status" -ne 0 ]; then echo "**dvc repro failed (exit $status)** — see the log."; echo; fi
    if [ "$status" -eq 0 ]; then none="none (everything up to date)"; else none="none"; fi
    echo "- stages run: ${ran:-$none}"
    echo "- restored from the run cache: ${restored:-none}"
    echo "- time: ${elapsed} s"
    echo
    echo "## Params diff vs \`$base\`"
    echo
    out="$(dvc params diff "$base" --md 2>/dev/null)"
    if [ -n "$(printf '%s' "$out" | sed -n '3p')" ]; then printf '%s\n' "$out"; else echo "_no parameter changed_"; fi
    echo
    echo "## Metrics diff vs \`$base\`"
    echo
    out="$(dvc metrics diff "$base" --md 2>/dev/null)"
    if [ -n "$(printf '%s' "$out" | sed -n '3p')" ]; then printf '%s\n' "$out"; else echo "_no metric changed_"; fi
} >"$summary"

echo
cat "$summary"
if [ -n "${CI_SUMMARY:-}" ]; then cat "$summary" >>"$CI_SUMMARY"; fi
exit "$status"
