#!/usr/bin/env bash
# Start the local PostgreSQL and Redis servers (bound to 127.0.0.1) if they are not running.
# The production-profile tests need both; this machine kind installs them but a restart stops them.
set -euo pipefail
cmd=${1:-ensure}
[ "$cmd" = ensure ] || { echo "usage: $0 ensure" >&2; exit 2; }

if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -q; then
  echo "starting PostgreSQL on 127.0.0.1:5432"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  echo "starting Redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
pg_isready -h 127.0.0.1 -q && echo "postgres: up" || echo "postgres: DOWN (production-profile tests will fail)"
redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && echo "redis: up" || echo "redis: DOWN (production-profile tests will fail)"
