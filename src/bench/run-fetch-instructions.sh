#!/usr/bin/env bash
# Counts the instructions each fetch-bench mode executes per request, under Callgrind, against a
# local nginx (see nginx-upstream.sh), and prints the ratios the timed benchmark prints, as counts.
#   bazel run -c opt //src/bench:fetch-instructions [-- --modes=abdef --requests=N --one-cpu]
# Instruction counts depend far less on the machine's load than time does, so they show what a
# change costs when a timed run's noise (a few percent) hides it. A count is the difference between
# a run of 3N requests and one of N, divided by 2N, so that start-up and connection set-up cancel
# out; it still moves by up to 2,000 per request between runs (how often a read finds the socket
# empty, and how many event-loop turns a request takes, depend on timing and so on the load).
# Installs valgrind and nginx (Debian packages) if they are missing.
set -euo pipefail

modes=abcdefgh
requests=1000
pin=0
pinned=()
for arg in "$@"; do
  case $arg in
    --modes=*) modes=${arg#--modes=} ;;
    --requests=*) requests=${arg#--requests=} ;;
    --one-cpu) pin=1 ;;
    *) echo "fetch-instructions: unknown option $arg (use --modes=LETTERS, --requests=N," \
           "--one-cpu)" >&2
       exit 2 ;;
  esac
done
if [[ ! $modes =~ ^[a-h]+$ || ! $requests =~ ^[1-9][0-9]*$ ]]; then
  echo "fetch-instructions: --modes takes letters a to h, --requests a positive number" >&2
  exit 2
fi

runfiles=${RUNFILES_DIR:-$0.runfiles}
source "$(dirname "$0")/nginx-upstream.sh" 2>/dev/null ||
  source "$(find -L "$runfiles" -name nginx-upstream.sh | head -1)"
bench=$(find_runfile fetch-bench-main)
ensure_package valgrind valgrind
start_nginx_upstream
if [[ $pin == 1 ]]; then
  # --one-cpu: nginx and the counted process on CPU 0. Free to use both CPUs, the count of reads
  # that find the socket empty (and of event-loop turns) depends on who runs when, which moves
  # the counts by up to 2,000 per request with the machine's load; pinned on a quiet machine, the
  # sequential modes' counts repeat within a few dozen (not under load, nor at 32 in flight).
  for pid in "$nginx_pid" $(pgrep -P "$nginx_pid"); do taskset -p -c 0 "$pid" >/dev/null; done
  pinned=(taskset -c 0)
fi
out=$(mktemp -d "$upstream_dir/callgrind.XXXXXX")  # removed with it on exit

count() {
  # Instructions Callgrind counted for one run of mode $1 with $2 requests.
  "${pinned[@]}" valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bench" \
      --port "$port" --modes "$1" --rounds 1 --requests "$2" --small-only --idle 0 \
      >/dev/null 2>"$out/log" ||
    { cat "$out/log" >&2; echo "fetch-instructions: mode $1 failed" >&2; exit 1; }
  awk '/^(summary|totals):/ { print $2; exit }' "$out/cg"
}

declare -A names=(
  [a]="kj client, one connection" [b]="StreamFetcher, one connection"
  [c]="new connection per request" [d]="ConnectionPool, 32 in flight"
  [e]="kj pooled client, 32 in flight" [f]="kj client per request, one conn"
  [g]="kj client per request, 32 conns" [h]="kj client per conn, 32 conns")
declare -A perRequest
echo "instructions per request, /small (runs of $requests and $((3 * requests)) requests):"
for (( i = 0; i < ${#modes}; i++ )); do
  m=${modes:i:1}
  n=$requests
  # fetch-bench-main runs a quarter as many requests in mode c.
  [[ $m == c ]] && n=$((requests * 4))
  low=$(count "$m" "$n")
  high=$(count "$m" $((3 * n)))
  perRequest[$m]=$(( (high - low) / (2 * requests) ))
  printf '  (%s) %-36s %8d\n' "$m" "${names[$m]}" "${perRequest[$m]}"
done

echo "ratios read like the timed benchmark's: the second mode's count over the first's (below 1,"
echo "the first mode costs more instructions per request):"
ratio() {
  local label=$1 x=$2 y=$3
  [[ -n ${perRequest[$x]:-} && -n ${perRequest[$y]:-} ]] || return 0
  awk -v a="${perRequest[$y]}" -v b="${perRequest[$x]}" -v l="$label" \
      'BEGIN { printf "  ratio %-46s %.3f\n", l, a / b }'
}
ratio "b/a (StreamFetcher vs raw kj client)" b a
ratio "b/c (reuse vs new connection)" b c
ratio "d/e (ConnectionPool vs kj pool)" d e
ratio "f/a (kj client per request, sequential)" f a
ratio "b/f (StreamFetcher vs kj client per request)" b f
ratio "g/h (kj client per request, 32 in flight)" g h
ratio "d/g (ConnectionPool vs g)" d g
ratio "h/e (32 fixed connections vs kj pool)" h e
