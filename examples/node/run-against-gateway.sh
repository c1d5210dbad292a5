#!/usr/bin/env bash
# Runs the Node.js example client against a real gateway and checks what it prints:
# starts `order-gateway serve` (memory store, a port the OS picks), installs the client's
# locked dependencies (npm ci), runs client.js, and stops the gateway with SIGTERM.
# Needs node >= 18, npm, and the repository's .venv (scripts/setup-dev).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
gateway=""
cleanup() {
  if [ -n "$gateway" ]; then
    kill -TERM "$gateway" 2>/dev/null || true
    wait "$gateway" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

cd "$root"
# Created before the gateway starts: the background job opens it a moment later, and the
# port search below must not find it missing.
: >"$work/gateway.log"
"$python" -m server.cli serve --listen 127.0.0.1:0 --store memory:// 2>"$work/gateway.log" &
gateway=$!
port=""
for _ in $(seq 300); do
  port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$work/gateway.log")
  [ -n "$port" ] && break
  if ! kill -0 "$gateway" 2>/dev/null; then
    echo "the gateway exited:" >&2
    cat "$work/gateway.log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$port" ]; then
  echo "the gateway did not report its port within 30 s:" >&2
  cat "$work/gateway.log" >&2
  exit 1
fi

(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
timeout 60 node "$here/client.js" "127.0.0.1:$port" | tee "$work/client.out"

failed=0
expect() {
  if ! grep -Eq -- "$1" "$work/client.out"; then
    echo "run-against-gateway: missing from the client's output: $1" >&2
    failed=1
  fi
}
expect '^restocked node-demo-[0-9a-f]+: available 10 '
expect '^order [0-9a-f-]{36} placed: OrderCreated@[0-9]+, StockReserved@[0-9]+ .*correlation node-demo-checkout'
expect '^subscription delivered: [0-9]+ ProductRestocked, [0-9]+ OrderCreated, [0-9]+ StockReserved$'
expect '^invalid order: INVALID_ARGUMENT: '
expect '^  BadRequest customer_id: '
expect '^  BadRequest items\[0\]\.quantity: '
expect '^too large an order: FAILED_PRECONDITION: '
expect '^  ErrorInfo INSUFFICIENT_INVENTORY \(order-gateway\)'
expect '^  PreconditionFailure STOCK product-node-demo-[0-9a-f]+: requested 1000, available 8$'
expect '^done$'
if [ "$failed" -ne 0 ]; then
  echo "gateway log:" >&2
  cat "$work/gateway.log" >&2
  exit 1
fi
echo "run-against-gateway: the Node.js client works against the gateway"
