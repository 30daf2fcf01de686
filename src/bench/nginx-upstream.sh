# Sourced by the benchmark scripts here: a local nginx upstream, and Debian packages they need.
#   ensure_package COMMAND PACKAGE   installs the Debian package if COMMAND is not found
#   start_nginx_upstream             starts nginx on 127.0.0.1; sets $port, $nginx_pid and an EXIT
#                                    trap that stops it (one worker, loopback only, `/small` a
#                                    13-byte body nginx returns itself, `/big` a 64 KiB file)

ensure_package() {
  local command=$1 package=$2
  command -v "$command" >/dev/null && return
  [[ -x /usr/sbin/$command || -x /usr/bin/$command ]] && return
  echo "$(basename "$0"): installing $package (Debian package)" >&2
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$package" >&2
}

start_nginx_upstream() {
  ensure_package nginx nginx
  local nginx
  nginx=$(command -v nginx || echo /usr/sbin/nginx)
  upstream_dir=$(mktemp -d)
  port=$(python3 -c \
      'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  # The heap measurement holds 1,000 idle connections: raise the soft descriptor limit to the hard
  # one, and give nginx as many connections as that limit allows (up to 8,192).
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  local connections
  connections=$(ulimit -n)
  [[ $connections == unlimited || $connections -gt 8192 ]] && connections=8192
  head -c 65536 /dev/zero | tr '\0' 'x' > "$upstream_dir/big"
  cat > "$upstream_dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $upstream_dir/nginx.pid;
error_log $upstream_dir/error.log warn;
events { worker_connections $connections; }
http {
  access_log off;
  open_file_cache max=16;
  tcp_nodelay on;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_body_temp_path $upstream_dir;
  proxy_temp_path $upstream_dir;
  fastcgi_temp_path $upstream_dir;
  uwsgi_temp_path $upstream_dir;
  scgi_temp_path $upstream_dir;
  server {
    listen 127.0.0.1:$port;
    location = /small { default_type text/plain; return 200 "Hello, world!"; }
    location = /big { alias $upstream_dir/big; default_type text/plain; }
  }
}
CONF
  "$nginx" -c "$upstream_dir/nginx.conf" -e "$upstream_dir/error.log" &
  nginx_pid=$!
  trap 'kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true
        rm -rf "$upstream_dir"' EXIT
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  echo "upstream: $("$nginx" -v 2>&1), 1 worker, 127.0.0.1:$port" >&2
}

find_runfile() {
  # The path of a file this script's target carries (a data dependency), by name.
  local here
  here=$(dirname "$0")/$1
  if [[ -e $here ]]; then echo "$here"; return; fi
  find -L "${RUNFILES_DIR:-$0.runfiles}" -name "$1" \( -type f -o -type l \) | head -1
}
