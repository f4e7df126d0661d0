#!/usr/bin/env python3
"""Many clients racing on few keys, history in kv-bench's format.

fault-soak-conflict.py OUT DURATION_S KEYS CLIENTS ENDPOINT[,ENDPOINT..]
Each client picks a random endpoint per connection (proxy or any node: a
non-leader forwards), random ops on KEYS keys; every PUT value unique.
"""
import http.client, json, random, socket, sys, threading, time

out, dur, nkeys, nclients, eps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(",")
prefix = "cf%06d" % random.randrange(10**6)
keys = [f"{prefix}_{i}" for i in range(nkeys)]
t0 = time.monotonic_ns()
lock = threading.Lock()
lines = []
stop = t0 + int(dur * 1e9)


def now():
    return time.monotonic_ns() - t0


def client(cid):
    rnd = random.Random(cid)
    conn = None
    seq = 0
    while time.monotonic_ns() < stop:
        if conn is None:
            host, port = rnd.choice(eps).split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
        key = rnd.choice(keys)
        r = rnd.random()
        op = "put" if r < 0.4 else ("get" if r < 0.9 else "delete")
        e = {"client": cid, "op": op, "key": key}
        body = None
        if op == "put":
            seq += 1
            val = f"c{cid}s{seq}"
            e["value"] = val
            body = json.dumps({"value": val})
        method = {"put": "PUT", "get": "GET", "delete": "DELETE"}[op]
        e["invoke"] = now()
        sent = False
        try:
            try:
                conn.connect() if conn.sock is None else None
            except OSError:
                e["return"] = now(); e["outcome"] = "fail"; e["error"] = "connection"
                conn.close(); conn = None
                with lock: lines.append(e)
                continue
            conn.request(method, "/" + key, body=body, headers={"Content-Type": "application/json"} if body else {})
            sent = True
            resp = conn.getresponse()
            data = resp.read()
            e["return"] = now()
            st = resp.status
            e["status"] = st
            if op == "get" and st == 200:
                try:
                    v = json.loads(data)["value"]
                    e.update(outcome="ok", found=True, value=v)
                except Exception:
                    e["outcome"] = "unknown"
            elif op == "get" and st == 404:
                e.update(outcome="ok", found=False)
            elif op == "put" and st == 200:
                e["outcome"] = "ok"
            elif op == "delete" and st in (200, 404):
                e.update(outcome="ok", found=(st == 200))
            elif st == 503 or (400 <= st < 500):
                e["outcome"] = "fail"
            else:
                e["outcome"] = "unknown"
        except (OSError, http.client.HTTPException, socket.timeout):
            e["return"] = now()
            e["outcome"] = "unknown" if sent else "fail"
            e["error"] = "connection"
            conn.close(); conn = None
        with lock:
            lines.append(e)


ts = [threading.Thread(target=client, args=(c,)) for c in range(nclients)]
for t in ts: t.start()
for t in ts: t.join()
with open(out, "w") as f:
    for e in lines:
        f.write(json.dumps(e) + "\n")
ok = sum(1 for e in lines if e["outcome"] == "ok")
print(f"conflict: {len(lines)} ops, {ok} ok, {sum(1 for e in lines if e['outcome']=='unknown')} unknown, "
      f"{sum(1 for e in lines if e['outcome']=='fail')} fail")
