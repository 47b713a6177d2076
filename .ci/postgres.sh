# shellcheck shell=bash
# A throwaway PostgreSQL 15 cluster for the label-store tests (sourced by .ci/run).
#
#   source .ci/postgres.sh
#   start_test_postgres            # exports RLHF_JAX_TEST_POSTGRES_URL
#   ...                            # tests
#   stop_test_postgres             # .ci/run calls it from its EXIT trap
#
# The cluster runs as the `postgres` user (initdb refuses root) in a temporary directory,
# listens only on 127.0.0.1 at a free port, and trusts local connections: it holds nothing
# but test databases and lives as long as the test run.
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
# Tests need no durability across power cuts; benchmarks should set RLHF_JAX_PG_OPTS="".
RLHF_JAX_PG_OPTS=${RLHF_JAX_PG_OPTS--c fsync=off}
RLHF_JAX_PG_DIR=""

start_test_postgres() {
  if [ ! -x "$PG_BIN/initdb" ]; then
    echo "start_test_postgres: $PG_BIN/initdb not found (install postgresql-15)" >&2
    return 1
  fi
  RLHF_JAX_PG_DIR=$(mktemp -d /tmp/rlhf_jax_pg.XXXXXX)
  chown postgres:postgres "$RLHF_JAX_PG_DIR"
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  runuser -u postgres -- "$PG_BIN/initdb" -D "$RLHF_JAX_PG_DIR/data" -U postgres -A trust \
    --no-sync -E UTF8 >"$RLHF_JAX_PG_DIR/initdb.log" 2>&1 || {
    cat "$RLHF_JAX_PG_DIR/initdb.log" >&2
    return 1
  }
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$RLHF_JAX_PG_DIR/data" -l "$RLHF_JAX_PG_DIR/server.log" \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $RLHF_JAX_PG_DIR -c max_connections=200 $RLHF_JAX_PG_OPTS" \
    -w -t 60 start >/dev/null || {
    cat "$RLHF_JAX_PG_DIR/server.log" >&2
    return 1
  }
  export RLHF_JAX_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
  echo "test PostgreSQL 15 cluster on 127.0.0.1:$port ($RLHF_JAX_PG_DIR)"
}

stop_test_postgres() {
  if [ -n "$RLHF_JAX_PG_DIR" ] && [ -d "$RLHF_JAX_PG_DIR/data" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$RLHF_JAX_PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$RLHF_JAX_PG_DIR"
  fi
  RLHF_JAX_PG_DIR=""
}
