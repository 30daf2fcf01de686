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

bench=$(dirname "$0")/fetch-bench-main
[[ -x $bench ]] || bench=$(find "${RUNFILES_DIR:-$0.runfiles}" -name fetch-bench-main -type f | head -1)

if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
  echo "fetch-bench: installing nginx (Debian package)" >&2
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends nginx >&2
fi
nginx=$(command -v nginx || echo /usr/sbin/nginx)

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
head -c 65536 /dev/zero | tr '\0' 'x' > "$dir/big"
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  open_file_cache max=16;
  tcp_nodelay on;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_body_temp_path $dir;
  proxy_temp_path $dir;
  fastcgi_temp_path $dir;
  uwsgi_temp_path $dir;
  scgi_temp_path $dir;
  server {
    listen 127.0.0.1:$port;
    location = /small { default_type text/plain; return 200 "Hello, world!"; }
    location = /big { alias $dir/big; default_type text/plain; }
  }
}
CONF
ulimit -n 65536 2>/dev/null || ulimit -n 4096 2>/dev/null || true
"$nginx" -c "$dir/nginx.conf" -e "$dir/error.log" &
nginx_pid=$!
cleanup() { kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.05
done
echo "upstream: $("$nginx" -v 2>&1), 1 worker, 127.0.0.1:$port" >&2

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
