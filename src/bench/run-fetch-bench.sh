#!/usr/bin/env bash
# Runs fetch-bench against a local nginx that this script starts (installing Debian's nginx if it
# is missing) and stops: one worker process, loopback only, a 13-byte and a 64 KiB body.
#   bazel run -c opt //src/bench:fetch-bench [-- [--cpus=any|one|both] fetch-bench options]
# Two passes by default: `any` lets nginx and the benchmark run on any CPU (as deployed); `one`
# puts both on CPU 0, so that a request costs the work of both processes plus a context switch
# rather than a wake-up across CPUs, which on a small VM can cost more than all the work and hide
# it. The heap measurement runs in the first pass only.
set -euo pipefail

cpus=both
args=()
for arg in "$@"; do
  if [[ $arg == --cpus=* ]]; then cpus=${arg#--cpus=}; else args+=("$arg"); fi
done
set -- "${args[@]}"
if [[ $cpus != any && $cpus != one && $cpus != both ]]; then
  echo "fetch-bench: --cpus must be any, one or both" >&2
  exit 2
fi

runfiles=${RUNFILES_DIR:-$0.runfiles}
source "$(dirname "$0")/nginx-upstream.sh" 2>/dev/null ||
  source "$(find -L "$runfiles" -name nginx-upstream.sh | head -1)"
bench=$(find_runfile fetch-bench-main)
for arg in "$@"; do
  if [[ $arg == --help ]]; then
    # Once, without starting nginx (each pass would print it).
    echo "fetch-bench: --cpus=any|one|both (default both: two passes); the rest goes to:"
    exec "$bench" --help
  fi
done
start_nginx_upstream

pass() {
  local which=$1
  shift
  if [[ $which == one ]]; then
    for pid in "$nginx_pid" $(pgrep -P "$nginx_pid"); do taskset -p -c 0 "$pid" >/dev/null; done
    echo -e "\n=== pass: nginx and the benchmark on CPU 0 ===" >&2
    taskset -c 0 "$bench" --port "$port" "$@"
  else
    echo -e "\n=== pass: nginx and the benchmark free to use any CPU ===" >&2
    "$bench" --port "$port" "$@"
  fi
}

case $cpus in
  any) pass any "$@" ;;
  one) pass one "$@" ;;
  both) pass any "$@"; pass one "$@" --idle 0 ;;
esac
