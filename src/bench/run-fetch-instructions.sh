#!/usr/bin/env bash
# Counts the instructions each fetch-bench mode executes per request, under Callgrind, against a
# local nginx (see nginx-upstream.sh), and prints the ratios the timed benchmark prints, as counts.
#   bazel run -c opt //src/bench:fetch-instructions [-- --modes=abdef --requests=N]
# Unlike time, instruction counts do not depend on the machine's load, so they show what a change
# costs when a timed run's noise (a few percent) hides it. A count is the difference between a run
# of 3N requests and one of N, divided by 2N, so that start-up and connection set-up cancel out;
# it still moves by a few hundred per request between runs (how often a read finds the socket
# empty depends on timing). Installs valgrind and nginx (Debian packages) if they are missing.
set -euo pipefail

modes=abcdefgh
requests=1000
for arg in "$@"; do
  case $arg in
    --modes=*) modes=${arg#--modes=} ;;
    --requests=*) requests=${arg#--requests=} ;;
    *) echo "fetch-instructions: unknown option $arg (use --modes=LETTERS, --requests=N)" >&2
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
out=$(mktemp -d)

count() {
  # Instructions Callgrind counted for one run of mode $1 with $2 requests.
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$bench" --port "$port" --modes "$1" \
      --rounds 1 --requests "$2" --small-only --idle 0 >/dev/null 2>"$out/log" ||
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
ratio "b/f (StreamFetcher vs kj client per request)" b f
ratio "d/e (ConnectionPool vs kj pool)" d e
ratio "d/g (ConnectionPool vs g)" d g
ratio "g/h (kj client per request, 32 in flight)" g h
