// A Node client of the Omni service (@grpc/grpc-js, with the proto loaded by
// @grpc/proto-loader at test time). Publishes tag events to a few rooms while
// a Watch follows them, kills the processing job (`omni run`) with SIGKILL
// half-way and starts it again, then checks per room: contiguous versions, no
// duplicate, the final watched view equal to GetSnapshot and to Redis, and
// GetDeltas for the tail.
//
// usage: node check.js <proto dir> <service addr> <omni binary> <topology> <redis url> <key prefix> <app id>
'use strict';
const { spawn, execFileSync } = require('child_process');
const fs = require('fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [protoDir, addr, omni, topology, redisUrl, keyPrefix, app] = process.argv.slice(2);
const ROOMS = Array.from({ length: 6 }, (_, i) => `app/${app}/room/r${i}`);
const EVENTS = 240;

function fail(message) {
  console.log(`node client: FAIL: ${message}`);
  process.exit(1);
}

const definition = protoLoader.loadSync('omni/v1/service.proto', {
  keepCase: true,
  longs: Number,
  defaults: true,
  oneofs: true,
  includeDirs: [protoDir],
});
const omniV1 = grpc.loadPackageDefinition(definition).omni.v1;
const client = new omniV1.Omni(addr, grpc.credentials.createInsecure());

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 30000 }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

function startJob() {
  const log = fs.openSync(`${topology}.run-${process.hrtime.bigint()}.log`, 'w');
  return spawn(omni, ['run', '--topology', topology], { stdio: ['ignore', log, log] });
}

function stopJob(job, signal) {
  return new Promise((resolve) => {
    job.once('exit', resolve);
    job.kill(signal);
  });
}

// The watched rooms, each checked to follow on from its previous event.
const rooms = new Map();
let watchError = null;

function apply(event) {
  const kind = event.event;
  if (kind === 'snapshot' || kind === 'resynchronised') {
    const snap = event[kind];
    const room = rooms.get(snap.path) || { version: 0, modules: {} };
    if (snap.version < room.version) throw new Error(`${snap.path}: ${kind} at ${snap.version} after ${room.version}`);
    room.version = snap.version;
    room.modules = Object.fromEntries(Object.entries(snap.modules).map(([k, v]) => [k, JSON.parse(v)]));
    rooms.set(snap.path, room);
  } else {
    const change = event.change;
    const room = rooms.get(change.path) || { version: 0, modules: {} };
    if (change.version !== room.version + 1) {
      throw new Error(`${change.path}: change ${change.version} after version ${room.version}`);
    }
    room.version = change.version;
    if (change.module === 'room') room.modules = {};
    else room.modules[change.module] = JSON.parse(change.state_json);
    rooms.set(change.path, room);
  }
}

function redisHash(room) {
  const out = execFileSync('redis-cli', ['-u', redisUrl, 'HGETALL', `${keyPrefix}:room:{${room}}`], { encoding: 'utf8' });
  const lines = out.split('\n').filter((l, i, all) => i < all.length - 1 || l !== '');
  const hash = {};
  for (let i = 0; i + 1 < lines.length; i += 2) hash[lines[i]] = lines[i + 1];
  return hash;
}

// JSON equality that ignores key order.
function same(a, b) {
  const canon = (v) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canon(v[k])]))
      : v;
  return JSON.stringify(canon(a)) === JSON.stringify(canon(b));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  let job = startJob();
  const watch = client.watch({ pattern: `app/${app}/room/*` });
  watch.on('data', (event) => {
    try {
      apply(event);
    } catch (error) {
      watchError = error.message;
    }
  });
  watch.on('error', (error) => {
    if (error.code !== grpc.status.CANCELLED) watchError = `watch failed: ${error.code} ${error.details}`;
  });
  const counts = new Map(ROOMS.map((r) => [r, 0]));
  for (let i = 0; i < EVENTS; i++) {
    const room = ROOMS[i % ROOMS.length];
    const event = { event_id: `node-${i}`, tag_set: { key: `k${i % 4}`, value: `v${i}` } };
    const reply = await call('Publish', { path: room, event });
    if (Number(reply.offset) < 0) fail(`Publish returned offset ${reply.offset}`);
    counts.set(room, counts.get(room) + 1);
    if (i === EVENTS / 2) {
      // Kill the job once it is folding: the watch has seen its first changes.
      const until = Date.now() + 60000;
      while (ROOMS.every((r) => !rooms.has(r))) {
        if (Date.now() > until) fail('the watch saw no change within 60 s of the first events');
        await sleep(50);
      }
      await stopJob(job, 'SIGKILL');
      job = startJob();
    }
  }
  const deadline = Date.now() + 90000;
  const version = (r) => (rooms.get(r) || { version: 0 }).version;
  while (ROOMS.some((r) => version(r) < counts.get(r))) {
    if (watchError) fail(watchError);
    if (Date.now() > deadline) fail(`watch did not reach the final versions: ${ROOMS.map((r) => `${r} ${version(r)}/${counts.get(r)}`)}`);
    await sleep(200);
  }
  if (watchError) fail(watchError);
  for (const room of ROOMS) {
    const watched = rooms.get(room);
    if (watched.version !== counts.get(room)) fail(`${room}: watched version ${watched.version}, expected ${counts.get(room)}`);
    const snap = await call('GetSnapshot', { path: room });
    const snapModules = Object.fromEntries(Object.entries(snap.modules).map(([k, v]) => [k, JSON.parse(v)]));
    const redis = redisHash(room);
    const redisModules = Object.fromEntries(
      Object.entries(redis).filter(([k]) => k !== 'version' && k !== 'updated_at').map(([k, v]) => [k, JSON.parse(v)]),
    );
    if (Number(snap.version) !== watched.version || Number(redis.version) !== watched.version) {
      fail(`${room}: watched ${watched.version}, GetSnapshot ${snap.version}, Redis ${redis.version}`);
    }
    if (!same(watched.modules.tags, redisModules.tags) || !same(snapModules, redisModules)) {
      fail(`${room}: watched ${JSON.stringify(watched.modules)}, Redis ${JSON.stringify(redisModules)}`);
    }
    const deltas = await call('GetDeltas', { path: room, after_version: counts.get(room) - 3 });
    const got = deltas.changes.map((c) => Number(c.version));
    const want = [counts.get(room) - 2, counts.get(room) - 1, counts.get(room)];
    if (!same(got, want)) fail(`${room}: GetDeltas versions ${got}`);
  }
  try {
    await call('GetSnapshot', { path: 'not a path//' });
    fail('a malformed path was accepted');
  } catch (error) {
    if (error.code !== grpc.status.INVALID_ARGUMENT) fail(`a malformed path got ${error.code}`);
  }
  watch.cancel();
  await stopJob(job, 'SIGTERM');
  console.log(`node client: ok: ${EVENTS} events over ${ROOMS.length} rooms, a kill -9 of the job, contiguous watched versions equal to GetSnapshot and Redis`);
  process.exit(0);
}

main().catch((error) => fail(error.stack || String(error)));
