// A Node.js client of order-gateway, with stubs loaded at run time from protos/ (no
// code generation): restock a product, place an order, follow the event stream, and
// decode the gateway's rich errors (google.rpc.Status in grpc-status-details-bin).
//
//   node client.js [HOST:PORT]
//
// Environment: ORDER_GATEWAY_TOKEN (a bearer token, when the gateway has authentication
// on), ORDER_GATEWAY_CA (a PEM file: connect with TLS, trusting that CA).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const REPO = path.resolve(__dirname, '..', '..');
const INCLUDE_DIRS = [path.join(REPO, 'protos'), path.join(REPO, 'third_party', 'googleapis')];
const DEADLINE_MS = 10_000;
// The codes the gateway documents as safe to retry with the same command_id (docs/clients.md,
// "Retry rules"): after DEADLINE_EXCEEDED or INTERNAL the command may or may not have
// committed, and the same command_id makes the retry settle it exactly once.
const RETRYABLE = new Set([
  grpc.status.UNAVAILABLE,
  grpc.status.ABORTED,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.INTERNAL,
  grpc.status.RESOURCE_EXHAUSTED,
]);

/** Whether a failed command may be sent again unchanged. */
function retryable(error) {
  if (!RETRYABLE.has(error.code)) return false;
  // RESOURCE_EXHAUSTED for the request's own size: the same request is refused again.
  return !(error.code === grpc.status.RESOURCE_EXHAUSTED && /larger than max/.test(error.details));
}

// Service stubs. keepCase: field names as in the .proto files; longs as strings, because
// positions are uint64 and JavaScript numbers lose precision past 2^53.
const definition = protoLoader.loadSync(
  [
    'orders/v1/order_command_service.proto',
    'orders/v1/inventory_command_service.proto',
    'orders/v1/event_stream_service.proto',
  ],
  { includeDirs: INCLUDE_DIRS, keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const ordersV1 = grpc.loadPackageDefinition(definition).orders.v1;

// Error details are decoded with protobufjs (the library proto-loader is built on): a
// packageDefinition describes services, but decoding an arbitrary Any needs a Root.
const rpcTypes = new protobuf.Root();
rpcTypes.resolvePath = (_origin, target) =>
  INCLUDE_DIRS.map((dir) => path.join(dir, target)).find((file) => fs.existsSync(file)) || target;
rpcTypes.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpcTypes.lookupType('google.rpc.Status');

/** The google.rpc.Status of a failed call, with each detail decoded, or null. */
function richStatus(error) {
  const [bytes] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!bytes) return null;
  const status = Status.decode(bytes);
  return {
    code: status.code,
    message: status.message,
    details: status.details.map((any) => {
      const typeName = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
      const type = rpcTypes.lookupType(typeName);
      return { type: typeName, value: type.toObject(type.decode(any.value), { longs: String }) };
    }),
  };
}

function describe(detail) {
  const { type, value } = detail;
  switch (type) {
    case 'google.rpc.BadRequest':
      return value.field_violations.map((v) => `BadRequest ${v.field}: ${v.description}`);
    case 'google.rpc.ErrorInfo':
      return [`ErrorInfo ${value.reason} (${value.domain}) ${JSON.stringify(value.metadata || {})}`];
    case 'google.rpc.PreconditionFailure':
      return value.violations.map((v) => `PreconditionFailure ${v.type} ${v.subject}: ${v.description}`);
    default:
      return [`${type} ${JSON.stringify(value)}`];
  }
}

function metadata(correlationId) {
  const md = new grpc.Metadata();
  if (process.env.ORDER_GATEWAY_TOKEN) md.set('authorization', `Bearer ${process.env.ORDER_GATEWAY_TOKEN}`);
  if (correlationId) md.set('x-correlation-id', correlationId);
  return md;
}

/** Run a command RPC; resolve with the committed events it streams back. */
function command(method, request, correlationId) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = method(request, metadata(correlationId), { deadline: Date.now() + DEADLINE_MS });
    call.on('data', (response) => events.push(response.event));
    call.on('error', reject);
    call.on('end', () => resolve(events));
  });
}

/**
 * A command with the gateway's retry rule: a fixed command_id makes retries idempotent
 * (a command that did commit streams the same events again, and appends nothing).
 */
async function withRetries(method, request, correlationId, attempts = 4) {
  const idempotent = { command_id: crypto.randomUUID(), ...request };
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await command(method, idempotent, correlationId);
    } catch (error) {
      if (!retryable(error) || attempt >= attempts) throw error;
      await new Promise((done) => setTimeout(done, 100 * 2 ** attempt * Math.random()));
    }
  }
}

/** Read a Subscribe stream until an event at `untilPosition` arrived; returns the events. */
function follow(client, afterPosition, untilPosition) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = client.Subscribe({ after_position: afterPosition }, metadata());
    const timer = setTimeout(() => {
      call.cancel();
      reject(new Error(`no event at position ${untilPosition} within ${DEADLINE_MS} ms`));
    }, DEADLINE_MS);
    call.on('data', (response) => {
      if (response.message !== 'event') return; // a Checkpoint: progress only
      events.push(response.event);
      if (BigInt(response.event.position) >= BigInt(untilPosition)) {
        clearTimeout(timer);
        call.cancel(); // a subscription never ends by itself
        resolve(events);
      }
    });
    call.on('error', (error) => {
      if (error.code !== grpc.status.CANCELLED) {
        clearTimeout(timer);
        reject(error);
      }
    });
  });
}

/** Run a call that must fail; print its status and decoded details. */
async function showRichError(label, promise) {
  try {
    await promise;
  } catch (error) {
    const status = richStatus(error);
    console.log(`${label}: ${grpc.status[error.code]}: ${error.details}`);
    for (const detail of status ? status.details : []) {
      for (const line of describe(detail)) console.log(`  ${line}`);
    }
    return;
  }
  throw new Error(`${label}: the call succeeded`);
}

async function main() {
  const target = process.argv[2] || '127.0.0.1:50051';
  const credentials = process.env.ORDER_GATEWAY_CA
    ? grpc.credentials.createSsl(fs.readFileSync(process.env.ORDER_GATEWAY_CA))
    : grpc.credentials.createInsecure();
  const inventory = new ordersV1.InventoryCommandService(target, credentials);
  const orders = new ordersV1.OrderCommandService(target, credentials);
  const events = new ordersV1.EventStreamService(target, credentials);
  const productId = `node-demo-${crypto.randomBytes(4).toString('hex')}`;

  const [restocked] = await withRetries(inventory.RestockProduct.bind(inventory), {
    product_id: productId,
    quantity: 10,
  });
  console.log(
    `restocked ${productId}: available ${restocked.product_restocked.available_after} ` +
      `(position ${restocked.position})`,
  );

  const order = {
    customer_id: crypto.randomUUID(),
    items: [{ product_id: productId, quantity: 2, unit_price: { currency_code: 'EUR', units: 12, nanos: 500_000_000 } }],
    shipping_address: { recipient: 'Ada Lovelace', line1: '1 Analytical St', city: 'London', country_code: 'GB' },
  };
  const placed = await withRetries(orders.CreateOrder.bind(orders), order, 'node-demo-checkout');
  const orderId = placed[0].order_created.order_id;
  console.log(
    `order ${orderId} placed: ${placed.map((e) => `${e.event_type}@${e.position}`).join(', ')} ` +
      `(total ${placed[0].order_created.total.units} ${placed[0].order_created.total.currency_code}, ` +
      `correlation ${placed[0].correlation_id})`,
  );

  // Everything after the position before the restock: the restock and the order's events.
  const last = placed[placed.length - 1].position;
  const streamed = await follow(events, (BigInt(restocked.position) - 1n).toString(), last);
  const ours = streamed.filter((e) => e.stream_id === `product-${productId}` || e.stream_id === `order-${orderId}`);
  console.log(`subscription delivered: ${ours.map((e) => `${e.position} ${e.event_type}`).join(', ')}`);

  await showRichError(
    'invalid order',
    command(orders.CreateOrder.bind(orders), {
      ...order,
      customer_id: 'not-a-uuid',
      items: [{ ...order.items[0], quantity: 0 }],
    }),
  );
  await showRichError(
    'too large an order',
    command(orders.CreateOrder.bind(orders), { ...order, items: [{ ...order.items[0], quantity: 1000 }] }),
  );

  for (const client of [inventory, orders, events]) client.close();
  console.log('done');
}

main().catch((error) => {
  console.error(`failed: ${error.stack || error}`);
  process.exit(1);
});
