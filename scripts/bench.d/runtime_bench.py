"""Benchmarks of bin/runtime (issue 14), run by scripts/bench.d/65-runtime.sh.

  1. appends/s to one run (unique idempotency key each, one client: a run's
     appends are ordered, each waits for the previous commit) against pgbench
     single-row INSERT commits with one client. Bar: ratio >= 0.8.
  2. appends/s over 100 runs from 32 concurrent clients against pgbench with
     32 clients. Bar: ratio >= 0.8.
  3. at 1,000 appends/s to one run, the time from sending an append to the
     Khala WebSocket frame of its message reaching a subscriber of the run's
     topic, p99, measured by a C client (rt_ws_latency: one thread; the npm
     `ws` client, BENCH_WS_CLIENT=node, is kept for comparison). Bar: <= 10 ms.

Both sides of 1 and 2 use the same private PostgreSQL 15 cluster, created
here with fsync=on and synchronous_commit=on: the runtime's answer means the
append is durable, and an anchor on a cluster without fsync (the shared dev
servers run fsync=off) would measure something no deployment runs. Runs are
interleaved (ours, anchor, anchor, ours, ours, anchor, ...) and the
median of the pair ratios is reported. Both sides use prepared statements
and the same connection count (pgbench -c N, wrk -c N). Appends go through wrk with a Lua script
(HTTP/1.1 keep-alive), answered with Prefer: return=minimal (the run without
its growing event list; the default answer carries every event).

Each throughput line is followed by the CPU per operation (lib.sh's
proc_ticks over the run: the runtime process, every PostgreSQL process,
and the load generator's own), the figure that does not move with the
machine's load.

Environment: BINDIR (bin), BENCH_SECONDS (5 per run), BENCH_ROUNDS (3 pairs),
BENCH_RUNTIME_BAR (0.8), BENCH_WS_P99_MS (10), BENCH_RUNTIME_PARTS (appends,ws; statement,
not run by default: the runtime's own append statement run by pgbench -c 1 with no HTTP and no
runtime between, beside the INSERT and the runtime, which bounds what the 1-client ratio can
reach with this schema; hop, not run by default either: the runtime built from a copy of this
tree with pgbench's own INSERT as its append statement, against pgbench -c 1, which bounds what
the 1-client ratio can reach with any statement behind HTTP), BENCH_WS_CLIENT (c|node).
"""

import base64
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from pgtmp import PgTmp, free_port  # noqa: E402

BINDIR = os.path.join(ROOT, os.environ.get("BINDIR", "bin"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
BAR = float(os.environ.get("BENCH_RUNTIME_BAR", "0.8"))
WS_BAR_MS = float(os.environ.get("BENCH_WS_P99_MS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
WS_CLIENT = os.environ.get("BENCH_WS_CLIENT", "c")
WORK = os.path.join(ROOT, "var", "bench", "runtime")


def log(msg):
    print("65-runtime: " + msg, file=sys.stderr, flush=True)


def post(base, path, body, headers=None):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers=dict({"Content-Type": "application/json"}, **(headers or {})))
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Runtime:
    def __init__(self, url, binary=None, **env):
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        e = dict(os.environ, DATABASE_URL=url, RUNTIME_BIND_ADDR="127.0.0.1:%d" % self.port, LOG_LEVEL="warn",
                 RUNTIME_KHALA_RUN_EVENTS_PUBLISH_RATE_PER_SECOND="100000000", DB_MAX_CONNECTIONS="34",
                 RUNTIME_KHALA_ALLOWED_ORIGINS="http://127.0.0.1")
        e.update(env)
        self.log = open(os.path.join(WORK, "runtime.log"), "ab")
        self.proc = subprocess.Popen([binary or os.path.join(BINDIR, "runtime")], env=e, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("runtime did not become ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()


LIB = os.path.join(ROOT, "scripts", "bench.d", "lib.sh")


def ticks(*pids):
    """CPU clock ticks of the processes and their descendants (lib.sh proc_ticks)."""
    out = subprocess.run(["bash", "-c", '. "$0"; proc_ticks "$@"', LIB] + [str(p) for p in pids],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip() or 0)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def steal_ticks():
    """The machine's stolen and total CPU ticks so far (lib.sh steal_ticks), as a string for steal_pct."""
    return subprocess.run(["bash", "-c", '. "$0"; steal_ticks', LIB], capture_output=True, text=True,
                          check=True).stdout.strip()


def steal_pct(before, after):
    """The stolen share of the CPU time between two steal_ticks readings, in percent (lib.sh steal_pct)."""
    return float(subprocess.run(["bash", "-c", '. "$0"; steal_pct "$1" "$2"', LIB, before, after],
                                capture_output=True, text=True, check=True).stdout)


def us_per(t, n):
    return t * 1e6 / CLK_TCK / n if n else 0.0


def wrk_append(base, run_ids, conns, seconds):
    """Appends/s from wrk with `conns` connections spread over run_ids, and the appends sent."""
    ids = ",".join('"%s"' % r for r in run_ids)
    script = os.path.join(WORK, "append.lua")
    with open(script, "w") as f:
        f.write("""
local ids = {%s}
local n = 0
-- Each thread's Lua state starts with the same random seed: without a tag
-- and a seed of its own, two threads sent the same keys to the same runs
-- (half the appends were replays).
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("tno", threads)
  thread:set("tag", tostring(threads) .. "." .. tostring(os.time()) .. "." .. tostring(math.random(1, 1e9)))
end
init = function(args) math.randomseed(os.time() * 1000 + tno) end
request = function()
  n = n + 1
  local id = ids[math.random(#ids)]
  return wrk.format("POST", "/internal/v1/runs/" .. id .. "/events",
    {["Content-Type"] = "application/json", ["Prefer"] = "return=minimal"},
    '{"event_type":"bench.step","payload":{"n":' .. n .. ',"tool":"grep","ok":true},"idempotency_key":"' ..
    tag .. '-' .. n .. '"}')
end
""" % ids)
    threads = 2 if conns > 1 else 1
    t0 = os.times()
    out = subprocess.run(["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % seconds, "-s", script, base + "/"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    t1 = os.times()
    if "Non-2xx" in out:
        raise RuntimeError("wrk saw errors; run is void:\n" + out)
    n = int([ln.split()[0] for ln in out.splitlines() if "requests in" in ln][0])
    load_us = ((t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)) * 1e6 / max(n, 1)
    return float([ln.split()[1] for ln in out.splitlines() if ln.startswith("Requests/sec:")][0]), n, load_us


INSERT_SQL = "INSERT INTO bench_commit (v) VALUES ('x');\n"


def pgbench(url, clients, seconds, text=INSERT_SQL):
    """Commits/s of pgbench running `text` (the single-row INSERT unless told), the commits, and
    pgbench's own CPU us per commit."""
    script = os.path.join(WORK, "pgbench.sql")
    with open(script, "w") as f:
        f.write(text)
    t0 = os.times()
    out = subprocess.run(["pgbench", "-n", "-M", "prepared", "-c%d" % clients, "-j%d" % min(clients, 2),
                          "-T%d" % seconds, "-f", script, url], capture_output=True, text=True,
                         timeout=seconds + 60)
    t1 = os.times()
    done = [ln.split()[-1] for ln in out.stdout.splitlines() if "actually processed" in ln]
    if not done or int(done[0]) == 0:
        raise RuntimeError("pgbench failed:\n" + out.stdout + out.stderr)
    n = int(done[0])
    load_us = ((t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)) * 1e6 / n
    return float([ln.split()[2] for ln in out.stdout.splitlines() if ln.startswith("tps =")][0]), n, load_us


def postmaster_pid(pg):
    with open(os.path.join(pg.datadir, "postmaster.pid")) as f:
        return int(f.readline())


class Cpu:
    """CPU per operation of the server side (the runtime, when there is one,
    and every PostgreSQL process) and of the load generator, over one run."""

    def __init__(self, pg_pid, rt_pid=None):
        self.pg_pid, self.rt_pid = pg_pid, rt_pid

    def measure(self, fn):
        t0 = (ticks(self.rt_pid) if self.rt_pid else 0, ticks(self.pg_pid))
        s0 = steal_ticks()
        rate, n, load_us = fn()
        s1 = steal_ticks()
        t1 = (ticks(self.rt_pid) if self.rt_pid else 0, ticks(self.pg_pid))
        return {"rate": rate, "rt_us": us_per(t1[0] - t0[0], n), "pg_us": us_per(t1[1] - t0[1], n),
                "load_us": load_us, "steal": steal_pct(s0, s1)}


def append_counts(base):
    """(appends, commits that wrote them) from the runtime's metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    n = {"runtime_appends_total": 0.0, "runtime_append_commits_total": 0.0}
    for ln in text.splitlines():
        name = ln.split("{")[0].split(" ")[0]
        if name in n:
            n[name] += float(ln.rsplit(" ", 1)[1])
    return n["runtime_appends_total"], n["runtime_append_commits_total"]


def interleaved(name, ours, anchor, rounds=3, unit="appends/s"):
    """Rounds of ours, anchor (alternating which goes first); the median of
    the pair ratios, and the median CPU per operation of each side."""
    a, b = [], []
    for i in range(rounds):
        if i % 2 == 0:
            a.append(ours())
            b.append(anchor())
        else:
            b.append(anchor())
            a.append(ours())
    r = statistics.median([x["rate"] / y["rate"] for x, y in zip(a, b)])
    ok = r >= BAR
    med = lambda v, k: statistics.median([x[k] for x in v])  # noqa: E731
    print("%s: runtime %.0f %s (runs %s), pgbench %.0f commits/s (runs %s), median ratio %.2f (bar >= %.2f) %s" % (
        name, med(a, "rate"), unit, " ".join("%.0f" % x["rate"] for x in a), med(b, "rate"),
        " ".join("%.0f" % x["rate"] for x in b), r, BAR, "ok" if ok else "MISSED"), flush=True)
    print("  CPU us per append: runtime %.1f + postgres %.1f (+ wrk %.1f); per pgbench commit: postgres %.1f "
          "(+ pgbench %.1f); steal %% of the machine's CPU time per run: %s, pgbench %s" % (
              med(a, "rt_us"), med(a, "pg_us"), med(a, "load_us"), med(b, "pg_us"), med(b, "load_us"),
              " ".join("%.1f" % x["steal"] for x in a), " ".join("%.1f" % x["steal"] for x in b)), flush=True)
    return ok


def sync_token():
    """An HS256 sync token for the runtime's development key (run topics)."""
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
    now = int(time.time())
    claims = {"sub": "bench", "oa_user_id": 1, "oa_sync_scopes": ["runtime.run_events"], "iat": now,
              "exp": now + 600, "iss": "https://openagents.com", "aud": "openagents-sync", "jti": "bench-%d" % now}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    key = os.environ.get("RUNTIME_SYNC_TOKEN_SIGNING_KEY", "dev-sync-key").encode()
    return (head + b"." + b64(hmac.new(key, head, hashlib.sha256).digest())).decode()


def ws_latency(rt, seconds):
    """p99 ms from append sent to frame received, at 1,000 appends/s: by the
    C client (build/tests/drivers/rt_ws_latency, one thread, little CPU an
    append), or with BENCH_WS_CLIENT=node by runtime_ws_latency.cjs (npm ws)."""
    run = post(rt.base, "/internal/v1/runs", {})["run"]
    if WS_CLIENT == "node":
        script = os.path.join(ROOT, "scripts", "bench.d", "runtime_ws_latency.cjs")
        env = dict(os.environ, NODE_PATH=os.path.join(ROOT, "tests", "integration", "node_modules"))
        argv = ["node", script, rt.base, run["id"], "1000", str(seconds)]
    else:
        env = dict(os.environ)
        argv = [os.path.join(ROOT, os.environ.get("O", "build"), "tests", "drivers", "rt_ws_latency"), str(rt.port),
                run["id"], "1000", str(seconds), sync_token()]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60,
                         cwd=os.path.join(ROOT, "tests", "integration"))
    if out.returncode != 0:
        raise RuntimeError("latency client failed: " + out.stderr + out.stdout)
    return json.loads(out.stdout)


def main():
    os.makedirs(WORK, exist_ok=True)
    ok = True
    parts = os.environ.get("BENCH_RUNTIME_PARTS", "appends,ws").split(",")
    if "appends" in parts:
        ok &= bench_appends()
    if "ws" in parts:
        ok &= bench_ws()
    if "statement" in parts:
        bench_statement()
    if "hop" in parts:
        bench_hop()
    return 0 if ok else 1


# Both sides of each ratio: durable commits (see the header).
DURABLE = {"fsync": "on", "synchronous_commit": "on", "max_connections": "100"}


def migrate(url):
    r = subprocess.run([os.path.join(BINDIR, "runtime-migrate")], env=dict(os.environ, DB_URL=url),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("runtime-migrate failed: " + r.stderr)


def bench_appends():
    ok = True
    with PgTmp(extra_conf=DURABLE) as pg:
        url = pg.url()
        pg.query("CREATE TABLE bench_commit (id bigserial PRIMARY KEY, v text)")
        migrate(url)
        rt = Runtime(url)
        ours, theirs = Cpu(postmaster_pid(pg), rt.proc.pid), Cpu(postmaster_pid(pg))
        try:
            one = post(rt.base, "/internal/v1/runs", {})["run"]["id"]
            ok &= interleaved("runtime appends, one run, idempotency keys, 1 client vs pgbench -c 1",
                              lambda: ours.measure(lambda: wrk_append(rt.base, [one], 1, SECONDS)),
                              lambda: theirs.measure(lambda: pgbench(url, 1, SECONDS)), ROUNDS)
            many = [post(rt.base, "/internal/v1/runs", {})["run"]["id"] for _ in range(100)]
            before = append_counts(rt.base)
            ok &= interleaved("runtime appends, 100 runs, 32 clients vs pgbench -c 32",
                              lambda: ours.measure(lambda: wrk_append(rt.base, many, 32, SECONDS)),
                              lambda: theirs.measure(lambda: pgbench(url, 32, SECONDS)), ROUNDS)
            after = append_counts(rt.base)
            if after[1] > before[1]:
                print("  32 clients: %.1f appends per commit (group commit, rtappend)" % (
                    (after[0] - before[0]) / (after[1] - before[1])), flush=True)
        finally:
            rt.stop()
    return ok


def fast_statement(run_id):
    """RTAPPEND_FAST_SQL as runtime/rtappend.c has it, as a pgbench script
    appending to run_id. The key is 'k' || txid_current(), unique for each
    transaction and the same in the statement's three uses of it; the
    colons of the topic's literals are spelled chr(58), since pgbench takes
    any ':name' of a script for a variable."""
    import re
    with open(os.path.join(ROOT, "runtime", "rtappend.c")) as f:
        src = f.read()
    body = src.split("RTAPPEND_FAST_SQL[] =", 1)[1].split(";\n", 1)[0]
    sql = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body))
    for k, v in (("$1", "'%s'::uuid" % run_id), ("$2", "'bench.step'"), ("$3", "'{}'"),
                 ("$4", "('k' || txid_current())"), ("'run:'", "'run' || chr(58)"),
                 ("':events'", "chr(58) || 'events'")):
        sql = sql.replace(k, v)
    if "$" in sql or ":" in sql.replace("::", ""):
        raise RuntimeError("the append statement has a parameter this script does not fill: " + sql)
    return sql + ";\n"


def bench_statement():
    """Where the 1-client ratio goes: the runtime over HTTP, its append
    statement run by pgbench alone, and the INSERT anchor, interleaved."""
    with PgTmp(extra_conf=DURABLE) as pg:
        url = pg.url()
        pg.query("CREATE TABLE bench_commit (id bigserial PRIMARY KEY, v text)")
        migrate(url)
        rt = Runtime(url)
        ours, theirs = Cpu(postmaster_pid(pg), rt.proc.pid), Cpu(postmaster_pid(pg))
        try:
            one = post(rt.base, "/internal/v1/runs", {})["run"]["id"]
            text = fast_statement(one)
            rows = {"runtime": [], "statement": [], "insert": []}
            for i in range(ROUNDS):
                sides = [("runtime", lambda: ours.measure(lambda: wrk_append(rt.base, [one], 1, SECONDS))),
                         ("statement", lambda: theirs.measure(lambda: pgbench(url, 1, SECONDS, text))),
                         ("insert", lambda: theirs.measure(lambda: pgbench(url, 1, SECONDS)))]
                for name, fn in (sides if i % 2 == 0 else sides[::-1]):
                    rows[name].append(fn())
        finally:
            rt.stop()
    med = lambda k, f: statistics.median([x[f] for x in rows[k]])  # noqa: E731
    ratio = lambda a, b: statistics.median([x["rate"] / y["rate"] for x, y in zip(rows[a], rows[b])])  # noqa: E731
    print("runtime append statement, 1 client, no HTTP (pgbench -c 1 running RTAPPEND_FAST_SQL): %.0f/s (runs %s) "
          "against pgbench INSERT %.0f/s (runs %s), median ratio %.2f, the ceiling of the 1-client ratio with this "
          "schema; the runtime over HTTP %.0f/s (runs %s), %.2f of its statement" % (
              med("statement", "rate"), " ".join("%.0f" % x["rate"] for x in rows["statement"]), med("insert", "rate"),
              " ".join("%.0f" % x["rate"] for x in rows["insert"]), ratio("statement", "insert"), med("runtime", "rate"),
              " ".join("%.0f" % x["rate"] for x in rows["runtime"]), ratio("runtime", "statement")), flush=True)
    print("  CPU us per append: runtime %.1f + postgres %.1f over HTTP, postgres %.1f for the statement alone; "
          "per INSERT commit postgres %.1f" % (med("runtime", "rt_us"), med("runtime", "pg_us"),
                                                med("statement", "pg_us"), med("insert", "pg_us")), flush=True)


# The anchor's own INSERT in the shape of the append statement's answer
# (outcome, seq, status, message, worker_id, metadata, created_at,
# updated_at, Khala message), its four parameters only type-checked.
HOP_SQL = ("INSERT INTO bench_commit (v) SELECT 'x' WHERE $1::uuid IS NOT NULL AND $2::text IS NOT NULL "
           "AND $3::jsonb IS NOT NULL AND ($4::text IS NULL OR true) RETURNING 'appended', id, 'running'::text, "
           "NULL::text, NULL::text, NULL::text, '2026-01-01T00:00:00Z'::text, '2026-01-01T00:00:00Z'::text, "
           "NULL::text")


def hop_build():
    """bin/runtime built from a copy of this tree (its git files) in which
    RTAPPEND_FAST_SQL is HOP_SQL: every append of the 1-client benchmark is
    then pgbench's single-row INSERT, and what is left between the two
    sides is the HTTP hop (wrk, the runtime's loop, libpq) alone."""
    import re
    import shutil
    tree = tempfile.mkdtemp(prefix="hop-", dir=WORK)
    names = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in names.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(tree, name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(tree, name))
    path = os.path.join(tree, "runtime", "rtappend.c")
    with open(path) as f:
        src = f.read()
    new, n = re.subn(r"const char RTAPPEND_FAST_SQL\[\] =.*?;\n", lambda m: "const char RTAPPEND_FAST_SQL[] = %s;\n" %
                     json.dumps(HOP_SQL), src, count=1, flags=re.S)
    if n != 1:
        raise RuntimeError("RTAPPEND_FAST_SQL not found in runtime/rtappend.c")
    with open(path, "w") as f:
        f.write(new)
    subprocess.run(["make", "-C", tree, "-j2", "bin/runtime"], check=True, stdout=subprocess.DEVNULL)
    return tree, os.path.join(tree, "bin", "runtime")


def bench_hop():
    """What the HTTP hop alone costs the 1-client ratio: the runtime whose
    append statement is the anchor's INSERT, interleaved with pgbench."""
    import shutil
    tree, binary = hop_build()
    try:
        with PgTmp(extra_conf=DURABLE) as pg:
            url = pg.url()
            pg.query("CREATE TABLE bench_commit (id bigserial PRIMARY KEY, v text)")
            migrate(url)
            rt = Runtime(url, binary=binary)
            ours, theirs = Cpu(postmaster_pid(pg), rt.proc.pid), Cpu(postmaster_pid(pg))
            rows = {"hop": [], "insert": []}
            try:
                one = post(rt.base, "/internal/v1/runs", {})["run"]["id"]
                events0 = int(pg.query("SELECT count(*) FROM runtime.run_events")[0][0])
                for i in range(ROUNDS):
                    sides = [("hop", lambda: ours.measure(lambda: wrk_append(rt.base, [one], 1, SECONDS))),
                             ("insert", lambda: theirs.measure(lambda: pgbench(url, 1, SECONDS)))]
                    for name, fn in (sides if i % 2 == 0 else sides[::-1]):
                        rows[name].append(fn())
                # Every append must have been the INSERT: no event row, and
                # one bench_commit row per append and per pgbench commit.
                events = int(pg.query("SELECT count(*) FROM runtime.run_events")[0][0]) - events0
                inserted = int(pg.query("SELECT count(*) FROM bench_commit")[0][0])
            finally:
                rt.stop()
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    done = sum(x["rate"] for side in rows.values() for x in side) * SECONDS
    if events != 0 or inserted < 0.99 * done:
        raise RuntimeError("the hop runtime did not run the INSERT: %d events, %d rows for ~%.0f" % (events, inserted, done))
    med = lambda k, f: statistics.median([x[f] for x in rows[k]])  # noqa: E731
    print("runtime HTTP hop, 1 client (the runtime built with pgbench's INSERT as its append statement) vs "
          "pgbench -c 1: %.0f appends/s (runs %s) against %.0f commits/s (runs %s), median ratio %.2f, the ceiling "
          "of the 1-client ratio for any append statement" % (
              med("hop", "rate"), " ".join("%.0f" % x["rate"] for x in rows["hop"]), med("insert", "rate"),
              " ".join("%.0f" % x["rate"] for x in rows["insert"]),
              statistics.median([x["rate"] / y["rate"] for x, y in zip(rows["hop"], rows["insert"])])), flush=True)
    print("  CPU us per append: runtime %.1f + postgres %.1f (+ wrk %.1f); per pgbench commit: postgres %.1f "
          "(+ pgbench %.1f)" % (med("hop", "rt_us"), med("hop", "pg_us"), med("hop", "load_us"),
                                med("insert", "pg_us"), med("insert", "load_us")), flush=True)


def bench_ws():
    ok = True
    # One run cannot take 1,000 durable appends/s when each commit waits for
    # its own fsync (~2 ms here): the latency benchmark measures the path
    # append -> commit -> NOTIFY -> frame on a cluster without fsync, like
    # the shared development servers.
    with PgTmp() as pg:
        url = pg.url()
        migrate(url)
        rt = Runtime(url)
        try:
            secs = SECONDS * 2
            s0 = steal_ticks()
            res = ws_latency(rt, secs)
            stolen = steal_pct(s0, steal_ticks())
            good = res["p99_ms"] <= WS_BAR_MS and res["received"] == res["sent"] and res["sent"] >= 900 * secs
            print("runtime append-to-WebSocket-frame (%s client) at %d appends/s for %d s (%d sent, %d frames): p50 %.2f ms, "
                  "p99 %.2f ms, max %.2f ms (append answered: p50 %.2f ms, p99 %.2f ms) (bar p99 <= %.0f ms) %s "
                  "(steal %.1f%% of the machine's CPU time)" % (
                      WS_CLIENT, res["rate"], secs, res["sent"], res["received"], res["p50_ms"], res["p99_ms"], res["max_ms"],
                      res["ack_p50_ms"], res["ack_p99_ms"], WS_BAR_MS, "ok" if good else "MISSED", stolen), flush=True)
            ok &= good
        finally:
            rt.stop()
    return ok


if __name__ == "__main__":
    sys.exit(main())
