"""A Python client of the Omni service (grpcio, stubs generated from proto/ at test time).

Publishes tag events to a few rooms through `Publish` while a `Watch` follows
them, kills the processing job (`omni run`) with SIGKILL half-way and starts
it again, then checks per room: contiguous versions, no duplicate, the final
watched view equal to `GetSnapshot` and to Redis, and `GetDeltas` for the tail.

usage: check.py <stubs dir> <service addr> <omni binary> <topology> <redis url> <key prefix> <app id>
"""
import json
import subprocess
import sys
import threading
import time

stubs, addr, omni, topology, redis_url, key_prefix, app = sys.argv[1:8]
sys.path.insert(0, stubs)

import grpc  # noqa: E402
from omni.v1 import service_pb2 as pb, service_pb2_grpc as rpc  # noqa: E402
import tecate_pb2  # noqa: E402

ROOMS = [f"app/{app}/room/r{i}" for i in range(6)]
EVENTS = 240


def fail(message):
    print(f"python client: FAIL: {message}", flush=True)
    sys.exit(1)


def start_job():
    log = open(f"{topology}.run-{time.time_ns()}.log", "w")
    return subprocess.Popen([omni, "run", "--topology", topology], stdout=log, stderr=log)


class Follower:
    """The watched rooms, each checked to follow on from its previous event."""

    def __init__(self):
        self.rooms = {}
        self.lock = threading.Lock()
        self.error = None

    def apply(self, event):
        kind = event.WhichOneof("event")
        if kind in ("snapshot", "resynchronised"):
            snap = getattr(event, kind)
            room = self.rooms.setdefault(snap.path, {"version": 0, "modules": {}})
            if snap.version < room["version"]:
                raise AssertionError(f"{snap.path}: {kind} at {snap.version} after version {room['version']}")
            room["version"] = snap.version
            room["modules"] = {k: json.loads(v) for k, v in snap.modules.items()}
        else:
            change = event.change
            room = self.rooms.setdefault(change.path, {"version": 0, "modules": {}})
            if change.version != room["version"] + 1:
                raise AssertionError(f"{change.path}: change {change.version} after version {room['version']}")
            room["version"] = change.version
            if change.module == "room":
                room["modules"] = {}
            else:
                room["modules"][change.module] = json.loads(change.state_json)

    def run(self, stub):
        try:
            for event in stub.Watch(pb.WatchRequest(pattern=f"app/{app}/room/*")):
                with self.lock:
                    self.apply(event)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = f"watch failed: {e.code()} {e.details()}"
        except AssertionError as e:
            self.error = str(e)

    def version(self, path):
        with self.lock:
            return self.rooms.get(path, {}).get("version", 0)


def redis_hash(path):
    out = subprocess.run(["redis-cli", "-u", redis_url, "HGETALL", f"{key_prefix}:room:{{{path}}}"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return dict(zip(out[0::2], out[1::2]))


def main():
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = rpc.OmniStub(channel)
    job = start_job()
    follower = Follower()
    watcher = threading.Thread(target=follower.run, args=(stub,), daemon=True)
    watcher.start()
    counts = {room: 0 for room in ROOMS}
    for i in range(EVENTS):
        room = ROOMS[i % len(ROOMS)]
        event = tecate_pb2.RoomEvent(event_id=f"py-{i}", tag_set=tecate_pb2.TagSet(key=f"k{i % 4}", value=f"v{i}"))
        reply = stub.Publish(pb.PublishRequest(path=room, event=event), timeout=30)
        if reply.offset < 0:
            fail(f"Publish returned offset {reply.offset}")
        counts[room] += 1
        if i == EVENTS // 2:
            # Kill the job once it is folding: the watch has seen its first changes.
            deadline = time.time() + 60
            while sum(follower.version(r) for r in ROOMS) == 0:
                if time.time() > deadline:
                    fail("the watch saw no change within 60 s of the first events")
                time.sleep(0.05)
            job.kill()
            job.wait()
            job = start_job()
    deadline = time.time() + 90
    while any(follower.version(r) < counts[r] for r in ROOMS):
        if follower.error:
            fail(follower.error)
        if time.time() > deadline:
            fail(f"watch did not reach the final versions: {[(r, follower.version(r), counts[r]) for r in ROOMS]}")
        time.sleep(0.2)
    if follower.error:
        fail(follower.error)
    for room in ROOMS:
        watched = follower.rooms[room]
        if watched["version"] != counts[room]:
            fail(f"{room}: watched version {watched['version']}, expected {counts[room]} (one change per event)")
        snap = stub.GetSnapshot(pb.GetSnapshotRequest(path=room), timeout=10)
        snapshot_modules = {k: json.loads(v) for k, v in snap.modules.items()}
        redis = redis_hash(room)
        redis_modules = {k: json.loads(v) for k, v in redis.items() if k not in ("version", "updated_at")}
        if snap.version != watched["version"] or int(redis.get("version", 0)) != watched["version"]:
            fail(f"{room}: watched {watched['version']}, GetSnapshot {snap.version}, Redis {redis.get('version')}")
        if watched["modules"].get("tags") != redis_modules.get("tags") or snapshot_modules != redis_modules:
            fail(f"{room}: watched {watched['modules']}, GetSnapshot {snapshot_modules}, Redis {redis_modules}")
        deltas = stub.GetDeltas(pb.GetDeltasRequest(path=room, after_version=counts[room] - 3), timeout=10)
        if [c.version for c in deltas.changes] != [counts[room] - 2, counts[room] - 1, counts[room]]:
            fail(f"{room}: GetDeltas versions {[c.version for c in deltas.changes]}")
    try:
        stub.GetSnapshot(pb.GetSnapshotRequest(path="not a path//"), timeout=10)
        fail("a malformed path was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            fail(f"a malformed path got {e.code()}")
    job.terminate()
    job.wait(timeout=60)
    print(f"python client: ok: {EVENTS} events over {len(ROOMS)} rooms, a kill -9 of the job, "
          f"contiguous watched versions equal to GetSnapshot and Redis", flush=True)


if __name__ == "__main__":
    main()
