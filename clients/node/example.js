// Leasehold from Node.js with Connect-ES: one lock taken, described, renewed
// and released over the Connect protocol on HTTP/1.1 (JSON), the same over
// gRPC-Web, and locks kept alive over KeepAlive streams on HTTP/2 (gRPC, and
// Connect streaming in JSON and protobuf), which the server releases when
// the stream ends.
//
//   npm ci && npm run generate
//   LEASEHOLD_URL=http://127.0.0.1:50051 node example.js
//
// LEASEHOLD_TOKEN, when set, is sent as the bearer token. Every step checks
// what it got and the script exits non-zero on the first surprise, so
// tests/node_client.rs runs it as a test.

import assert from "node:assert/strict";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import {
  createConnectTransport,
  createGrpcTransport,
  createGrpcWebTransport,
} from "@connectrpc/connect-node";
import { LockService } from "./gen/leasehold/v1/lock_pb.js";

const baseUrl = process.env.LEASEHOLD_URL ?? "http://127.0.0.1:50051";
const bearer = process.env.LEASEHOLD_TOKEN;
const prefix = process.env.LEASEHOLD_KEY_PREFIX ?? "node-example/";

// Adds the bearer token to every call, when there is one.
const auth = (next) => async (req) => {
  if (bearer) req.header.set("authorization", `Bearer ${bearer}`);
  return next(req);
};
const interceptors = [auth];

function step(what, detail = "") {
  console.log(`ok ${what}${detail ? ": " + detail : ""}`);
}

// Take, describe, renew and release one lock; what an HTTP/1.1 client does
// instead of KeepAlive: a TTL, and Renew well before it runs out.
async function leaseCycle(client, key, protocol) {
  const got = await client.acquire({ key, ttlMs: 30_000, owner: "node-example" });
  assert.equal(got.acquired, true, `${protocol}: acquired`);
  const { token, fencingToken } = got.lease;
  // int64 fields are bigint: a Number would lose precision past 2^53.
  assert.equal(typeof fencingToken, "bigint");
  step(`${protocol} acquire`, `fencing token ${fencingToken}`);

  const refused = await client.acquire({ key, ttlMs: 1_000 });
  assert.equal(refused.acquired, false);
  assert.ok(refused.retryAfterMs > 0);
  step(`${protocol} acquire refused`, `retry after ${refused.retryAfterMs} ms`);

  const held = await client.describe({ key });
  assert.equal(held.held, true);
  assert.equal(held.owner, "node-example");
  assert.equal(held.fencingToken, fencingToken);
  step(`${protocol} describe`, `held by ${held.owner}`);

  const renewed = await client.renew({ key, token, ttlMs: 60_000 });
  assert.equal(renewed.renewed, true);
  assert.equal(renewed.ttlMs, 60_000);
  step(`${protocol} renew`, `${renewed.ttlMs} ms`);

  const released = await client.release({ key, token });
  assert.equal(released.released, true);
  assert.equal((await client.describe({ key })).held, false);
  step(`${protocol} release`);
}

// A refused request is a ConnectError with the code and the details.
async function badTtl(client) {
  try {
    await client.acquire({ key: `${prefix}bad`, ttlMs: 50 });
    assert.fail("a 50 ms TTL was accepted");
  } catch (err) {
    const e = ConnectError.from(err);
    assert.equal(e.code, Code.InvalidArgument);
    assert.match(e.rawMessage, /^ttl_ms: /);
    const types = e.details.map((d) => ("desc" in d ? d.desc.typeName : d.type));
    assert.ok(types.includes("google.rpc.BadRequest"), `details: ${types}`);
    step("invalid argument", `${e.rawMessage} (details: ${types.join(", ")})`);
  }
}

// KeepAlive is a bidirectional stream: HTTP/2, over gRPC or Connect. Each message
// renews one lock and attaches it to the stream; ending the stream releases
// every lock still attached.
async function keepAlive(client, connect, key, protocol) {
  const got = await client.acquire({ key, ttlMs: 30_000, owner: "node-keepalive" });
  assert.equal(got.acquired, true);
  const { token } = got.lease;
  step(`${protocol} acquire`, key);

  let firstReply;
  const replied = new Promise((resolve) => (firstReply = resolve));
  async function* requests() {
    yield { key, token, ttlMs: 30_000 };
    await replied; // one renewal answered, then end the stream
  }
  let answers = 0;
  for await (const reply of client.keepAlive(requests())) {
    assert.equal(reply.key, key);
    assert.equal(reply.alive, true);
    answers += 1;
    step(`${protocol} keepalive renewed`, `${reply.ttlMs} ms`);
    firstReply();
  }
  assert.equal(answers, 1);
  // The stream has ended: the server released the lock at once, without
  // waiting for its 30 s TTL.
  const after = await connect.describe({ key });
  assert.equal(after.held, false, "released when the stream ended");
  step(`${protocol} keepalive ended`, "lock released");
}

const connect = createClient(
  LockService,
  createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors }),
);
const grpcWeb = createClient(
  LockService,
  createGrpcWebTransport({ baseUrl, httpVersion: "1.1", interceptors }),
);
const grpc = createClient(
  LockService,
  createGrpcTransport({ baseUrl, interceptors }),
);
// Connect streaming needs HTTP/2 for a bidirectional call.
const connectH2 = createClient(
  LockService,
  createConnectTransport({ baseUrl, httpVersion: "2", interceptors }),
);
const connectH2Binary = createClient(
  LockService,
  createConnectTransport({ baseUrl, httpVersion: "2", useBinaryFormat: true, interceptors }),
);

const run = Date.now().toString(36);
await leaseCycle(connect, `${prefix}connect-${run}`, "connect");
await leaseCycle(grpcWeb, `${prefix}grpc-web-${run}`, "grpc-web");
await badTtl(connect);
await keepAlive(grpc, connect, `${prefix}keepalive-grpc-${run}`, "grpc");
await keepAlive(connectH2, connect, `${prefix}keepalive-json-${run}`, "connect+json");
await keepAlive(connectH2Binary, connect, `${prefix}keepalive-proto-${run}`, "connect+proto");
console.log("all steps passed");
