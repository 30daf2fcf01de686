#!/usr/bin/env bash
# Smoke test: the embedding sample runs to completion and reports one connection for all of its
# sequential requests, the refused concurrent request, and the pool's statistics.
set -euo pipefail
out=$("$1" 50 2>&1)
echo "$out"
grep -q "connections accepted by the server: 1; requests completed on the fetcher's connection: 50" <<<"$out"
grep -q "a concurrent request was refused: .*one request at a time" <<<"$out"
grep -q "50 parallel requests through a ConnectionPool" <<<"$out"
