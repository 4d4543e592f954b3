"""make faults: fault injection against the stack of `make up`, under load.

    scripts/faults.sh [--faults NAME,...] [--rate N] [--seconds S] [--smoke]

The stack is scripts/stack.sh's, started with its own STACK_VAR, free
STACK_PORTS, its own database (ae_faults) and Redis db (FAULTS_REDIS_DB, 7)
on the servers of scripts/servers.sh (the worktree's AE_*_PORT), so it runs
beside anyone's `make up`. Loads, all at a steady rate while every fault
happens:

  events   chain events posted to the gateway (batches retried until the
           gateway answers 2xx: an indexer's behaviour); one trigger whose
           REST action posts to a local receiver, which counts deliveries by
           X-Idempotency-Key and by the event id in the body;
  appends  runtime appends to one run, each with its own idempotency key,
           retried with the same key until answered 200;
  rtes     node states over AMQP (tests/faults/rtes_load.cjs, npm amqplib,
           confirms, mandatory), counted by node id in rtes_events;
  realtime 1,000 /ws subscribers (tests/faults/rt_load.cjs, npm ws), fed by
           a ws publisher and by PUBLISH on Redis: at most once, loss reported;
  proxy    POST /api/v1/faultsup/item/ID through the gateway's proxy to an
           upstream process of its own (tests/faults/upstream.py), not
           retried: each answered 200 by the upstream or refused cleanly
           (502/503/504 with the JSON body, or no connection while the
           gateway is down), none reaching the upstream twice;
  sse      events published with POST /internal/v1/sse/{client} (retried
           until 202, each with its own Idempotency-Key) to one SSE client
           that reconnects with Last-Event-ID as EventSource does: every
           stored event must reach it once.

Faults: kill -9 of each service (then `stack.sh up` brings it back, as an
operator's `make up` would), restart of PostgreSQL, Redis and RabbitMQ
(servers.sh restart), the event-processor's LISTEN connection cut
(pg_terminate_backend), Redis and PostgreSQL paused (SIGSTOP 10 s, SIGCONT),
kill -9 of the proxied upstream (back after 2 s), and, with a second
gateway or event-processor started beside the stack's on the same stores,
kill -9 of the stack's one, left down for the phase (the loads fail over to
the second gateway as a client behind a load balancer does).

After each fault: every accepted event reached the receiver under exactly one
idempotency key and has one success row in action_results, every accepted
append is in the run exactly once, every service answers its health route
with 200, and a server fault left every service's pid unchanged (it
reconnected by itself). A table is printed at the end; the exit status is 1
when any check failed.
"""
import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration", "peers"))
from httppeers import Peer  # noqa: E402
from pgtmp import free_port  # noqa: E402
from tools import need  # noqa: E402

import psycopg2  # noqa: E402

STACK = os.path.join(ROOT, "scripts", "stack.sh")
SERVERS = os.path.join(ROOT, "scripts", "servers.sh")
ALL = ["api-gateway", "realtime", "runtime", "event-processor", "action-workers"]
HEALTH = {"api-gateway": "/api/v1/health", "realtime": "/health", "runtime": "/healthz",
          "event-processor": "/health", "action-workers": "/health"}
DB_NAME = "ae_faults"
PRESENCE_TTL_S = 6
PRESENCE_ROOM = "faults-presence"


def log(msg):
    print("faults: " + msg, file=sys.stderr, flush=True)


def call(method, url, body=None, token=None, timeout=5, headers=None):
    """(status, decoded JSON or None); status 0 when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as f:
            raw = f.read()
            return f.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, None
    except (OSError, ValueError):
        return 0, None


def listening_pid(port):
    """The pid of the process listening on 127.0.0.1:port (ss -p)."""
    out = subprocess.run([need("ss"), "-Hltnp", "sport = :%d" % port], capture_output=True, text=True).stdout
    for part in out.split("pid=")[1:]:
        return int(part.split(",")[0])
    return None


def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids.append(int(d))
    return kids


class Stack:
    """scripts/stack.sh up with STACK_VAR, STACK_PORTS, STACK_SERVICES."""

    def __init__(self, services, var):
        self.services = services
        self.var = var
        self.extras = {}  # service -> [Extra]: second instances (the pair faults)
        self.rt = None  # the RealtimeLoad, when there is one
        self.ports = {}
        while len(set(self.ports.values())) < len(ALL):
            self.ports = {s: free_port() for s in ALL}
        srv = {}
        out = subprocess.run([SERVERS, "env"], capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if not k.endswith("_URL")}).stdout
        for line in out.splitlines():
            if line.startswith("export ") and "=" in line:
                k, v = line[len("export "):].split("=", 1)
                srv[k] = v
        self.pg = urllib.parse.urlsplit(srv["DATABASE_URL"].strip("'"))
        self.redis = urllib.parse.urlsplit(srv["REDIS_URL"].strip("'"))
        self.db_url = urllib.parse.urlunsplit(self.pg._replace(path="/" + DB_NAME))
        rdb = os.environ.get("FAULTS_REDIS_DB", "7")
        self.redis_url = urllib.parse.urlunsplit(self.redis._replace(path="/" + rdb))
        # A vhost of its own (servers.sh vhost), where the RTES queues are
        # durable: the default vhost's are not (SPEC 5b's default), and other
        # suites declare them there.
        self.amqp_url = urllib.parse.urlunsplit(urllib.parse.urlsplit(srv["AMQP_URL"].strip("'"))._replace(
            path="/faults"))
        self.ingest = uuid.uuid4().hex
        self.internal = uuid.uuid4().hex
        self.jwt_secret = uuid.uuid4().hex + uuid.uuid4().hex
        self.upstream_port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.endswith("_URL") and k != "AE_TEST_RUN"}
        self.env.update({
            "STACK_VAR": var, "STACK_SERVICES": " ".join(services),
            "STACK_PORTS": " ".join(str(self.ports[s]) for s in ALL), "STACK_TIMEOUT": "90",
            "DATABASE_URL": self.db_url, "REDIS_URL": self.redis_url, "AMQP_URL": self.amqp_url,
            "INGEST_TOKEN": self.ingest, "JWT_SECRET": self.jwt_secret, "ALLOWED_TARGETS": "127.0.0.1", "RATE_LIMIT": "1000000",
            "JOB_VISIBILITY_TIMEOUT": "5s", "RETRY_BASE_MS": "200", "RETRY_MAX_ATTEMPTS": "50",
            "RETRY_MAX_DELAY_MS": "2000", "BREAKER_FAILURES": "0", "LOG_LEVEL": "info",
            # 1,000 subscribers subscribe at once: the global token bucket
            # (100/s) would answer most of them 429.
            "RATE_LIMIT_PER_SECOND": "100000", "RATE_LIMIT_BURST": "100000",
            "RABBITMQ_QUEUE_DURABLE": "true",
            # A killed realtime's presence entries are left out (and
            # deleted) once its heartbeat is this old: kill9-pair:realtime
            # waits for that within its phase.
            "PRESENCE_TTL": "%ds" % PRESENCE_TTL_S,
            # The proxied upstream (tests/faults/upstream.py), and a breaker
            # that tries it again soon after it came back.
            "FAULTSUP_URL": "http://127.0.0.1:%d" % self.upstream_port, "PROXY_BREAKER_COOLDOWN_MS": "1000",
            "INTERNAL_TOKEN": self.internal,
            # On 127.0.0.1, where free_port found the ports free (on 0.0.0.0
            # they may meet a client bound to 127.0.0.2, as the load tools do).
            "SERVER_HOST": "127.0.0.1", "HOST": "127.0.0.1", "METRICS_HOST": "127.0.0.1",
            "BINDIR": os.environ.get("BINDIR", "bin"),
        })

    def url(self, service, path=""):
        return "http://127.0.0.1:%d%s" % (self.ports[service], path)

    def prepare_db(self):
        subprocess.run([SERVERS, "start", "all"], check=True, stdout=subprocess.DEVNULL, timeout=300,
                       env={k: v for k, v in os.environ.items() if not k.endswith("_URL")})
        admin = psycopg2.connect(urllib.parse.urlunsplit(self.pg))
        admin.autocommit = True
        with admin.cursor() as c:
            c.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % DB_NAME)
            c.execute("CREATE DATABASE %s" % DB_NAME)
        admin.close()
        if "realtime" in self.services:
            subprocess.run([SERVERS, "vhost", "faults"], check=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if not k.endswith("_URL")})
        import redis
        redis.Redis.from_url(self.redis_url).flushdb()
        # A fresh stack: what a previous run recorded (its secrets among
        # them) would be given to the services again.
        for f in ("stack.env", "secrets", "env"):
            try:
                os.unlink(os.path.join(self.var, f))
            except FileNotFoundError:
                pass

    def up(self):
        r = subprocess.run([STACK, "up"], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError("stack.sh up failed:\n" + r.stdout + r.stderr)

    def pid(self, service):
        try:
            with open(os.path.join(self.var, "run", service + ".pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def pids(self):
        return {s: self.pid(s) for s in self.services}

    def healthy(self, skip=()):
        """The services whose health route does not answer 200 (the second
        instances' included; `skip`: the stack's instances left down)."""
        bad = [s for s in self.services if s not in skip and call("GET", self.url(s, HEALTH[s]), timeout=2)[0] != 200]
        return bad + [e.service + " (second)" for es in self.extras.values() for e in es
                      if call("GET", e.url(HEALTH[e.service]), timeout=2)[0] != 200]

    def wait_healthy(self, timeout=90, skip=()):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.healthy(skip):
                return True
            time.sleep(0.1)
        return False

    def stop(self):
        for s in reversed(self.services):
            pid = self.pid(s)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        end = time.monotonic() + 20
        for s in self.services:
            pid = self.pid(s)
            while pid and time.monotonic() < end and os.path.exists("/proc/%d" % pid):
                time.sleep(0.1)
            if pid and os.path.exists("/proc/%d" % pid):
                os.kill(pid, signal.SIGKILL)

    def sql(self, q, args=None):
        conn = psycopg2.connect(self.db_url, connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as c:
                c.execute(q, args)
                return c.fetchall() if c.description else None
        finally:
            conn.close()


PORT_ENV = {"api-gateway": "SERVER_PORT", "realtime": "PORT", "event-processor": "METRICS_PORT",
            "action-workers": "METRICS_PORT"}


class Extra:
    """A second instance of a service beside the stack's, on the same
    stores (database, Redis, RabbitMQ vhost), on a port of its own."""

    def __init__(self, stack, service):
        self.stack, self.service, self.port, self.proc = stack, service, free_port(), None

    def url(self, path=""):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def start(self):
        env = {k: v for k, v in self.stack.env.items() if not k.startswith("STACK_")}
        env[PORT_ENV[self.service]] = str(self.port)
        os.makedirs(os.path.join(self.stack.var, "log"), exist_ok=True)
        self.log = open(os.path.join(self.stack.var, "log", self.service + "-2.log"), "ab")
        self.proc = subprocess.Popen([os.path.join(ROOT, env["BINDIR"], self.service)], env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + 60
        while call("GET", self.url(HEALTH[self.service]), timeout=2)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the second %s did not start (see %s)" % (self.service, self.log.name))
            time.sleep(0.2)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()


class Upstream:
    """tests/faults/upstream.py as a process (kill -9 takes its connections
    with it); the ids it answered are in its log, which survives the kill."""

    def __init__(self, port, var):
        self.port, self.logpath, self.proc = port, os.path.join(var, "upstream.log"), None
        os.makedirs(var, exist_ok=True)
        open(self.logpath, "w").close()

    def start(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "upstream.py"), str(self.port), self.logpath],
                                     start_new_session=True)
        end = time.monotonic() + 20
        while call("GET", "http://127.0.0.1:%d/health" % self.port, timeout=1)[0] != 200:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the upstream did not start")
            time.sleep(0.05)

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def seen(self):
        with open(self.logpath) as f:
            return Counter(line.strip() for line in f if line.strip())


class Receiver:
    """The webhook peer (tests/integration/peers), counted by
    X-Idempotency-Key and by the event id of the body."""

    def __init__(self):
        self.peer = Peer("webhook").start(free_port())

    def url(self):
        return self.peer.base() + "/hook"

    def counts(self):
        by_key, keys_of_event = Counter(), defaultdict(set)
        for r in self.peer.requests("/hook"):
            key = r["headers"].get("x-idempotency-key", "")
            by_key[key] += 1
            try:
                keys_of_event[json.loads(r["body"])["event"]].add(key)
            except (ValueError, KeyError, TypeError):
                keys_of_event["<bad body>"].add(key)
        return by_key, keys_of_event


class Ticker(threading.Thread):
    """Calls step() every 1/rate seconds until stopped; step() returns False
    while what it sends is not accepted (it is retried on the next tick)."""

    def __init__(self, rate):
        super().__init__(daemon=True)
        self.period = 1.0 / rate
        self.running = threading.Event()
        self.running.set()
        self.draining = False

    def run(self):
        nxt = time.monotonic()
        while True:
            pending = self.step()
            if not self.running.is_set() and not pending:
                return
            nxt += self.period
            time.sleep(max(0.0, nxt - time.monotonic()))

    def finish(self, timeout=90):
        self.running.clear()
        self.join(timeout)
        return not self.is_alive()


class RetryLoad(Ticker):
    """One new item per tick, sent until accepted (the same item again on
    the next tick while refused); accepted holds the ids of those accepted."""

    def __init__(self, stack, rate, tag):
        super().__init__(rate)
        self.stack, self.tag = stack, tag
        self.accepted, self.failures, self.pending, self.n = [], 0, None, 0

    def step(self):
        if self.pending is None:
            if not self.running.is_set():
                return False
            self.n += 1
            self.pending = self.make(self.n)
        ident = self.send(self.pending)
        if ident is not None:
            self.accepted.append(ident)
            self.pending = None
            return False
        self.failures += 1
        return True


class EventLoad(RetryLoad):
    """Chain events (agent `agent` on chain 1, reputation), posted until the
    gateway accepts them."""

    def __init__(self, stack, rate, agent, tag):
        super().__init__(stack, rate, tag)
        self.agent = agent

    def make(self, n):
        eid = "flt-%s-%06d-%s" % (self.tag, n, uuid.uuid4().hex[:6])
        return {"id": eid, "chain_id": 1, "block_number": 1000 + n, "block_hash": "0xb" + eid[-6:],
                "transaction_hash": "0x" + uuid.uuid4().hex, "log_index": 0, "registry": "reputation",
                "event_type": "NewFeedback", "agent_id": self.agent, "timestamp": int(time.time()),
                "client_address": "0xc", "feedback_index": n, "score": 90, "tag1": "f", "tag2": ""}

    def send(self, ev):
        st, body = call("POST", gateway_url(self.stack, self, "/api/v1/chain-events"), {"events": [ev]},
                        self.stack.ingest)
        failover(self, st)
        ok = st in (200, 201) and body and body.get("inserted", 0) + body.get("duplicates", 0) == 1
        return ev["id"] if ok else None


def gateway_url(stack, load, path):
    """The gateway a load talks to: the stack's, or with a second gateway
    running, whichever answered last (a client behind a load balancer)."""
    urls = [stack.url("api-gateway")] + [e.url() for e in stack.extras.get("api-gateway", [])]
    return urls[getattr(load, "gw", 0) % len(urls)] + path


def failover(load, status):
    """Nothing answered: the next request goes to the other gateway."""
    if status == 0:
        load.gw = getattr(load, "gw", 0) + 1


class ProxyLoad(Ticker):
    """One POST /api/v1/faultsup/item/ID per tick through the gateway's proxy
    to the upstream, not retried (each request is its own item). A request
    is answered 200 with its id (and the upstream logged it), or refused
    cleanly: 502/503/504 with the JSON error body, or no connection while the
    gateway itself is down; any other answer is a failure."""

    def __init__(self, stack, rate, tag):
        super().__init__(rate)
        self.stack, self.tag, self.n = stack, tag, 0
        self.ok, self.refused, self.bad, self.ok_after = [], 0, [], 0
        self.recovered_at = None

    def step(self):
        if not self.running.is_set():
            return False
        self.n += 1
        ident = "px-%s-%06d" % (self.tag, self.n)
        st, body = call("POST", gateway_url(self.stack, self, "/api/v1/faultsup/item/" + ident), {"n": self.n})
        failover(self, st)
        if st == 200 and body == {"id": ident}:
            self.ok.append(ident)
            if self.recovered_at is not None:
                self.ok_after += 1
        elif st == 0 or (st in (502, 503, 504) and isinstance(body, dict) and "error" in body):
            self.refused += 1
        else:
            self.bad.append((ident, st, body))
        return False


class SsePublishLoad(RetryLoad):
    """Events for one SSE client through POST /internal/v1/sse/{client},
    retried until stored (202), each with its own Idempotency-Key (the
    event's id), so a retry after a lost answer stores nothing twice."""

    def __init__(self, stack, rate, client, tag):
        super().__init__(stack, rate, tag)
        self.client = client

    def make(self, n):
        return "%s-%06d" % (self.tag, n)

    def send(self, ident):
        st, _ = call("POST", gateway_url(self.stack, self, "/internal/v1/sse/" + self.client),
                     {"event_type": "faults.tick", "data": {"id": ident}}, self.stack.internal,
                     headers={"Idempotency-Key": ident})
        failover(self, st)
        return ident if st == 202 else None


class SseReader(threading.Thread):
    """An SSE client of GET /api/v1/events/{client} that, as EventSource
    does, reconnects 0.5 s after its stream ended with the last id it saw in
    Last-Event-ID (to the other gateway when one does not answer). Counts
    each faults.tick event by its id and the SSE ids it came under."""

    def __init__(self, stack, client):
        super().__init__(daemon=True)
        self.stack, self.client = stack, client
        self.last_id, self.ids, self.receipts = None, defaultdict(set), Counter()
        self.resets = self.connects = 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.stream()
            except (OSError, http.client.HTTPException, ValueError):
                self.gw = getattr(self, "gw", 0) + 1
            self.stopping.wait(0.5)

    def stream(self):
        u = urllib.parse.urlsplit(gateway_url(self.stack, self, ""))
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=40)
        try:
            hdrs = {"Accept": "text/event-stream"}
            if self.last_id:
                hdrs["Last-Event-ID"] = self.last_id
            conn.request("GET", "/api/v1/events/" + self.client, headers=hdrs)
            r = conn.getresponse()
            if r.status != 200:
                r.read()
                raise OSError("status %d" % r.status)
            self.connects += 1
            sid = event = data = None
            while not self.stopping.is_set():
                line = r.readline()
                if not line:
                    return
                line = line.rstrip(b"\r\n").decode()
                if line.startswith("id: "):
                    sid = line[4:]
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "":
                    if sid:
                        self.last_id = sid
                    if event == "faults.tick":
                        ident = json.loads(data)["data"]["id"]
                        self.ids[ident].add(sid)
                        self.receipts[ident] += 1
                    elif event == "stream.reset":
                        self.resets += 1
                    sid = event = data = None
        finally:
            conn.close()


def check_sse(reader, accepted, timeout):
    """(delivered, lost, duplicated, redelivered): duplicated is an event
    that came under two SSE ids (stored twice: a publish retried after its
    answer was lost), redelivered the same id replayed again."""
    want = set(accepted)
    end = time.monotonic() + timeout
    while time.monotonic() < end and not want <= set(reader.ids):
        time.sleep(0.2)
    time.sleep(1.0)
    ids = dict(reader.ids)
    delivered = len(want & set(ids))
    dup = sum(1 for e in want if len(ids.get(e, ())) > 1)
    redelivered = sum(max(0, reader.receipts[e] - len(ids.get(e, ()))) for e in want)
    return delivered, len(want) - delivered, dup, redelivered


class AppendLoad(RetryLoad):
    """Runtime appends to run `run_id`, each retried with its idempotency key
    until answered 200."""

    def __init__(self, stack, rate, run_id, tag):
        super().__init__(stack, rate, tag)
        self.run_id = run_id

    def make(self, n):
        return ("ap-%s-%06d" % (self.tag, n), n)

    def send(self, item):
        key, n = item
        st, _ = call("POST", self.stack.url("runtime", "/internal/v1/runs/%s/events" % self.run_id),
                     {"event_type": "tool.step", "payload": {"n": n}, "idempotency_key": key})
        return key if st == 200 else None


class NodeLoad:
    """A node script of tests/faults answering one JSON line per command."""

    def __init__(self, script, **env):
        subprocess.run([os.path.join(ROOT, "tests", "integration", "setup-node.sh")], check=True,
                       stdout=subprocess.DEVNULL)
        self.proc = subprocess.Popen([need("node"), os.path.join(HERE, script)], env=dict(os.environ, **env),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        got = self.proc.stdout.readline()
        if not got:
            raise RuntimeError("%s exited (%s)" % (type(self).__name__, self.proc.poll()))
        return json.loads(got)

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


class RealtimeLoad(NodeLoad):
    """tests/faults/rt_load.cjs: subscribers on /ws and one publisher."""

    def __init__(self, stack, subscribers, rate):
        super().__init__("rt_load.cjs", RT_URL="ws://127.0.0.1:%d/ws" % stack.ports["realtime"],
                         JWT_SECRET=stack.jwt_secret, RT_SUBSCRIBERS=str(subscribers), RT_RATE=str(rate))


class RtesLoad(NodeLoad):
    """tests/faults/rtes_load.cjs: node states over AMQP (npm amqplib)."""

    def __init__(self, stack, rate):
        super().__init__("rtes_load.cjs", AMQP_URL=stack.amqp_url, RTES_RATE=str(rate))


def check_rtes(stack, tag, accepted, timeout):
    """(delivered, lost, duplicated) of node states in rtes_events."""
    want = set(accepted)
    end = time.monotonic() + timeout
    got = {}
    while time.monotonic() < end:
        got = dict(stack.sql("SELECT node_id, count(*) FROM rtes_events WHERE execution_id = %s "
                             "GROUP BY node_id", ("ex-faults-" + tag,)) or [])
        if want <= set(got):
            break
        time.sleep(0.3)
    delivered = len(want & set(got))
    return delivered, len(want) - delivered, sum(1 for k in want if got.get(k, 0) > 1)


class RedisPublishLoad(Ticker):
    """Broadcasts published straight to Redis channel rt:topic:faults, as
    the event-processor publishes trigger.fired (SPEC 3, 5a): the path a
    Redis restart cuts. Not retried: at most once, like the publisher."""

    def __init__(self, stack, rate, tag):
        super().__init__(rate)
        import redis
        self.r = redis.Redis.from_url(stack.redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.tag, self.n, self.accepted, self.failures = tag, 0, [], 0

    def step(self):
        if not self.running.is_set():
            return False
        import redis
        n = self.n
        self.n += 1
        data = {"topic": "faults", "payload": {"p": self.tag, "n": n, "src": "redis"}, "from": "faults",
                "message_id": "broadcast_" + str(uuid.uuid4()), "timestamp": int(time.time())}
        try:
            self.r.publish("rt:topic:faults", json.dumps(data))
            self.accepted.append(n)
        except redis.RedisError:
            self.failures += 1
        return False


# ---------------------------------------------------------------- faults

def server_pids(stack, which):
    if which == "pg":
        pid = listening_pid(stack.pg.port)
        return [pid] + children(pid) if pid else []
    if which == "rabbitmq":
        # The Erlang VM (beam.smp) listening on the AMQP port, and its
        # helpers (erl_child_setup, inet_gethost).
        pid = listening_pid(urllib.parse.urlsplit(stack.amqp_url).port)
        return [pid] + children(pid) if pid else []
    pid = listening_pid(stack.redis.port)
    return [pid] if pid else []


def fault_kill9(service):
    def run(stack):
        pid = stack.pid(service)
        os.kill(pid, signal.SIGKILL)
        while os.path.exists("/proc/%d" % pid) and "zombie" not in open("/proc/%d/status" % pid).read().lower():
            time.sleep(0.05)
        stack.up()
    return {"name": "kill -9 " + service, "run": run, "restarts": service, "needs": [service]}


def fault_restart(server):
    def run(stack):
        r = subprocess.run([SERVERS, "restart", server], capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if not k.endswith("_URL")})
        if r.returncode != 0:
            raise RuntimeError("servers.sh restart %s: %s" % (server, r.stderr))
    return {"name": "restart " + server, "run": run, "restarts": None, "needs": []}


def fault_pause(server, seconds=10):
    def run(stack):
        pids = server_pids(stack, server)
        if not pids:
            raise RuntimeError("no %s process found" % server)
        for p in pids:
            os.kill(p, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            for p in pids:
                os.kill(p, signal.SIGCONT)
    return {"name": "SIGSTOP %s %ds" % (server, seconds), "run": run, "restarts": None, "needs": []}


def fault_kill9_upstream(seconds=2):
    def run(stack):
        stack.upstream.kill9()
        time.sleep(seconds)
        stack.upstream.start()
    return {"name": "kill -9 upstream %ds" % seconds, "run": run, "restarts": None, "needs": ["api-gateway"]}


def fault_kill9_pair(service):
    """Two instances share the stores; the stack's is killed and stays down
    for the phase (the second carries the load), then comes back."""
    def run(stack):
        pid = stack.pid(service)
        os.kill(pid, signal.SIGKILL)
        while os.path.exists("/proc/%d" % pid) and "zombie" not in open("/proc/%d/status" % pid).read().lower():
            time.sleep(0.05)
    return {"name": "kill -9 1 of 2 " + service.replace("event-processor", "ev-proc"), "run": run,
            "restarts": service, "needs": [service], "down": service, "pair": service}


def presence_fields(stack):
    import redis
    r = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    return [k.decode() for k in r.hgetall("rt:room:%s:presence" % PRESENCE_ROOM)]


def fault_kill9_pair_realtime():
    """Two realtime instances on one Redis, half of the 1,000 subscribers
    (and presence-1) on the second; the stack's is killed and stays down
    for the phase. Its clients get a close and reconnect to the living one;
    the living one's clients keep receiving (a subscriber that missed a
    broadcast without a close fails the phase, as always); the dead
    instance's presence entries are gone within PRESENCE_TTL."""
    def run(stack):
        fields = presence_fields(stack)
        dead = [f.split("|", 1)[0] for f in fields if f.endswith("|presence-0")]
        if not dead:
            raise RuntimeError("presence-0 has no presence entry before the fault (%r)" % fields)
        stack.dead_instance = dead[0]
        pid = stack.pid("realtime")
        os.kill(pid, signal.SIGKILL)
        while os.path.exists("/proc/%d" % pid) and "zombie" not in open("/proc/%d/status" % pid).read().lower():
            time.sleep(0.05)

    def check(stack):
        """Presence, once the dead instance's heartbeat is PRESENCE_TTL old:
        both users listed once (presence-0 rejoined on the living one), no
        entry of the dead instance left."""
        if not stack.rt:
            return []
        end = time.monotonic() + PRESENCE_TTL_S + 20
        time.sleep(PRESENCE_TTL_S)
        last = None
        while time.monotonic() < end:
            got = stack.rt.ask("presence")
            fields = presence_fields(stack)
            stale = [f for f in fields if f.startswith(stack.dead_instance + "|")]
            last = (got, fields)
            if sorted(got.get("users", [])) == ["presence-0", "presence-1"] and not stale:
                log("realtime pair: presence %r, no entry of the dead instance %s left" % (got["users"],
                                                                                          stack.dead_instance))
                return []
            time.sleep(1.0)
        return ["presence after the kill: %r (want presence-0 and presence-1 once, no entry of %s)"
                % (last, stack.dead_instance)]
    return {"name": "kill -9 1 of 2 realtime", "run": run, "check": check, "restarts": "realtime",
            "needs": ["realtime"], "down": "realtime", "pair": "realtime", "lazy_pair": True}


LISTEN_SQL = ("SELECT pid, coalesce(nullif(application_name, ''), query) FROM pg_stat_activity WHERE datname = %s "
              "AND backend_type = 'client backend' AND query ILIKE 'LISTEN %%'")


def fault_listen_cut():
    """pg_terminate_backend of every LISTEN connection on the stack's
    database: the event-processor's (new_event, trigger_changed), the
    gateway's and realtime's token revocation listeners, the runtime's
    Khala one. Each must be back (a new backend) by itself."""
    def run(stack):
        before = stack.sql(LISTEN_SQL, (DB_NAME,))
        names = Counter(a for _, a in before)
        if not any(a == "event-processor-listen" for a in names):
            raise RuntimeError("no LISTEN connection of the event-processor to cut (%r)" % before)
        old = {p for p, _ in before}
        stack.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(old),))
        end = time.monotonic() + 30
        while True:
            now = stack.sql(LISTEN_SQL, (DB_NAME,))
            back = Counter(a for p, a in now if p not in old)
            if all(back[a] >= n for a, n in names.items()):
                log("LISTEN cut: %d connections (%s), all back" % (len(before), ", ".join(
                    "%s×%d" % (a, n) for a, n in sorted(names.items()))))
                return
            if time.monotonic() > end:
                raise RuntimeError("LISTEN connections not back after 30 s: had %r, new %r" % (dict(names), dict(back)))
            time.sleep(0.1)
    return {"name": "LISTEN cut (all)", "run": run, "restarts": None, "needs": ["event-processor"]}


def all_faults():
    f = {}
    for s in ALL:
        f["kill9:" + s] = fault_kill9(s)
    for s in ("pg", "redis", "rabbitmq"):
        f["restart:" + s] = fault_restart(s)
    f["kill9:upstream"] = fault_kill9_upstream()
    f["kill9-pair:api-gateway"] = fault_kill9_pair("api-gateway")
    f["kill9-pair:event-processor"] = fault_kill9_pair("event-processor")
    f["kill9-pair:realtime"] = fault_kill9_pair_realtime()
    f["listen-cut"] = fault_listen_cut()
    f["pause:redis"] = fault_pause("redis")
    f["pause:pg"] = fault_pause("pg")
    f["pause:rabbitmq"] = fault_pause("rabbitmq")
    return f


# ---------------------------------------------------------------- checks

def check_events(stack, recv, accepted, timeout):
    """(delivered, lost, duplicated, redelivered, events without exactly one
    success row) once every accepted event reached the receiver and has its
    success row in action_results, or `timeout` passed. A worker killed
    between the delivery and its row delivers again after
    JOB_VISIBILITY_TIMEOUT: the row comes then."""
    want = set(accepted)

    def rows():
        return dict(stack.sql("SELECT event_id, count(DISTINCT job_id) FROM action_results "
                              "WHERE status = 'success' AND event_id = ANY(%s) GROUP BY event_id",
                              (list(want),)) or [])

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        _, keys_of = recv.counts()
        if want <= set(keys_of) and all(n == 1 for n in rows().values()) and len(rows()) == len(want):
            break
        time.sleep(0.2)
    time.sleep(2.0)  # a duplicate would arrive by now
    by_key, keys_of = recv.counts()
    delivered = len(want & set(keys_of))
    dup = sum(1 for e in want if len(keys_of.get(e, ())) > 1)
    redelivered = sum(n - 1 for k, n in by_key.items() if n > 1)
    done = rows()
    table_bad = [e for e in want if done.get(e) != 1]
    return delivered, len(want) - delivered, dup, redelivered, table_bad


def check_appends(stack, run_id, accepted):
    st, body = call("GET", stack.url("runtime", "/internal/v1/runs/" + run_id), timeout=30)
    if st != 200:
        return 0, len(accepted), 0
    keys = Counter(e.get("idempotency_key") for e in body["run"]["events"])
    want = set(accepted)
    delivered = sum(1 for k in want if keys[k] >= 1)
    dup = sum(1 for k in want if keys[k] > 1)
    return delivered, len(want) - delivered, dup


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faults", default=",".join(all_faults()), help="comma list; default: all")
    ap.add_argument("--services", default=" ".join(ALL))
    ap.add_argument("--rate", type=float, default=20.0, help="events/s and appends/s")
    ap.add_argument("--before", type=float, default=3.0, help="seconds of load before each fault")
    ap.add_argument("--after", type=float, default=5.0, help="seconds of load after recovery")
    ap.add_argument("--drain", type=float, default=120.0, help="seconds allowed for delivery after the load")
    ap.add_argument("--var", default=os.path.join(ROOT, "var", "faults"))
    ap.add_argument("--subscribers", type=int, default=1000, help="realtime subscribers (0: no realtime load)")
    ap.add_argument("--rt-rate", type=float, default=5.0, help="realtime broadcasts/s")
    ap.add_argument("--rtes-rate", type=float, default=10.0, help="RTES node states/s (0: no RTES load)")
    ap.add_argument("--proxy-rate", type=float, default=10.0, help="proxied requests/s (0: none)")
    ap.add_argument("--sse-rate", type=float, default=10.0, help="SSE events/s (0: none)")
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    ap.add_argument("--json", help="also write the rows and failures to this file")
    a = ap.parse_args()

    known = all_faults()
    names = [n for n in a.faults.split(",") if n]
    for n in names:
        if n not in known:
            ap.error("unknown fault %s (known: %s)" % (n, ", ".join(known)))
    services = a.services.split()
    stack = Stack(services, a.var)
    stack.prepare_db()
    recv = Receiver()
    rows, failed = [], []
    rt = rtes = reader = None
    with_gw = "api-gateway" in services
    stack.upstream = Upstream(stack.upstream_port, a.var)
    try:
        stack.upstream.start()
        log("starting the stack (%s) in %s" % (" ".join(services), a.var))
        stack.up()
        for n in names:
            pair = known[n].get("pair")
            if pair in services and pair not in stack.extras and not known[n].get("lazy_pair"):
                log("starting a second %s" % pair)
                stack.extras[pair] = [Extra(stack, pair).start()]
        if with_gw and a.sse_rate > 0:
            reader = SseReader(stack, "faults-sse")
            reader.start()
        user = "flt" + uuid.uuid4().hex[:8]
        st, b = call("POST", stack.url("api-gateway", "/api/v1/auth/register"),
                     {"username": user, "email": user + "@example.test", "password": "faults pass 1"})
        assert st == 201, (st, b)
        st, b = call("POST", stack.url("api-gateway", "/api/v1/auth/login"),
                     {"username": user, "password": "faults pass 1"})
        assert st == 200, (st, b)
        token = b["access_token"]
        agent = 4242
        st, b = call("POST", stack.url("api-gateway", "/api/v1/triggers"), {
            "name": "faults", "chain_id": 1, "registry": "reputation",
            "conditions": [{"condition_type": "agent_id_equals", "value": str(agent)}],
            "actions": [{"action_type": "rest", "config": {
                "method": "POST", "url": recv.url(), "timeout_ms": 5000,
                "body_template": "{\"event\":\"{{event_id}}\"}"}}]}, token)
        assert st == 201, (st, b)
        time.sleep(1.0)  # the processor reloads the trigger on trigger_changed
        with_runtime = "runtime" in services
        run_id = None
        if with_runtime:
            st, b = call("POST", stack.url("runtime", "/internal/v1/runs"), {"worker_id": "faults"})
            assert st == 201, (st, b)
            run_id = b["run"]["id"]
        if "realtime" in services and a.rtes_rate > 0:
            rtes = RtesLoad(stack, a.rtes_rate)
        if "realtime" in services and a.subscribers > 0:
            rt = stack.rt = RealtimeLoad(stack, a.subscribers, a.rt_rate)
            r = rt.ask("ready")
            log("realtime: %d of %d subscribers subscribed" % (r["ready"], r["subscribers"]))
            if r["ready"] != r["subscribers"]:
                raise RuntimeError("realtime subscribers did not all subscribe: %r" % r)

        for i, n in enumerate(names):
            f = known[n]
            if any(s not in services for s in f["needs"]):
                log("%s: skipped (%s not in the stack)" % (f["name"], ",".join(f["needs"])))
                continue
            tag = "%02d" % i
            loads = [EventLoad(stack, a.rate, agent, tag)]
            if with_runtime:
                loads.append(AppendLoad(stack, a.rate, run_id, tag))
            px = ProxyLoad(stack, a.proxy_rate, tag) if with_gw and a.proxy_rate > 0 else None
            ssp = SsePublishLoad(stack, a.sse_rate, "faults-sse", tag) if reader else None
            pids = stack.pids()
            for ld in loads + [x for x in (px, ssp) if x]:
                ld.start()
            if f.get("lazy_pair") and f["pair"] in services and rt:
                # Only for its phase, so the other faults' clients all
                # live on the stack's instance.
                log("starting a second %s, half of the subscribers moved to it" % f["pair"])
                stack.extras[f["pair"]] = [Extra(stack, f["pair"]).start()]
                rt.ask("spread ws://127.0.0.1:%d/ws" % stack.extras[f["pair"]][0].port)
            if rt:
                rt.ask("ready")  # the reconnects of the previous fault are done
                rt.ask("phase " + tag)
                rpub = RedisPublishLoad(stack, a.rt_rate, tag)
                rpub.start()
            if rtes:
                rtes.ask("phase " + tag)
            time.sleep(a.before)
            log("%s" % f["name"])
            t0 = time.monotonic()
            problems = []
            try:
                f["run"](stack)
            except Exception as e:  # noqa: BLE001: the fault itself failed; reported in the row
                problems.append("fault: %s" % e)
            down = [f["down"]] if f.get("down") else []
            if not stack.wait_healthy(120, down):
                problems.append("unhealthy: %s" % ",".join(stack.healthy(down)))
            recovery = time.monotonic() - t0
            if f.get("check"):
                problems += f["check"](stack)
            if px:
                px.recovered_at = time.monotonic()
            after = stack.pids()
            for s in services:
                if s != f["restarts"] and after[s] != pids[s]:
                    problems.append("%s restarted (pid %s -> %s)" % (s, pids[s], after[s]))
            time.sleep(a.after)
            for ld in loads + [x for x in (px, ssp) if x]:
                if not ld.finish(a.drain):
                    problems.append("%s still not accepted after %.0f s" % (type(ld).__name__, a.drain))
            if px:
                seen = stack.upstream.seen()
                d4 = sum(1 for k in px.ok if seen.get(k))
                dup4 = sum(1 for k, c in seen.items() if k.startswith("px-%s-" % tag) and c > 1)
                rows.append((f["name"], "proxy→upstream", "%.0f req/s" % a.proxy_rate, len(px.ok), d4, len(px.ok) - d4,
                             dup4, 0, px.refused, recovery))
                if px.bad:
                    problems.append("proxy: %d answers neither 200 nor a clean 502/503/504, first %r"
                                    % (len(px.bad), px.bad[0]))
                if not px.ok_after:
                    problems.append("proxy: no request succeeded after the recovery")
                if dup4 or len(px.ok) != d4:
                    problems.append("proxy: %d requests reached the upstream twice, %d answered 200 unseen"
                                    % (dup4, len(px.ok) - d4))
            if ssp:
                d5, lost5, dup5, redel5 = check_sse(reader, ssp.accepted, a.drain)
                rows.append((f["name"], "SSE publish→client", "%.0f ev/s" % a.sse_rate, len(ssp.accepted), d5, lost5,
                             dup5, redel5, ssp.failures, recovery))
                if lost5 or dup5:
                    problems.append("SSE: %d lost, %d duplicated" % (lost5, dup5))
            if rtes:
                r = rtes.ask("stop")
                d3, lost3, dup3 = check_rtes(stack, tag, r["accepted"], a.drain)
                rows.append((f["name"], "RTES over AMQP", "%.0f st/s" % a.rtes_rate, len(r["accepted"]), d3, lost3,
                             dup3, 0, r["refused"], recovery))
                if lost3 or dup3 or r["pending"]:
                    problems.append("RTES: %d lost, %d duplicated, %d never confirmed" % (lost3, dup3, r["pending"]))
            if rt:
                rpub.finish()
                r = rt.ask("stop " + (",".join(map(str, rpub.accepted)) or "-"))
                rr = r["redis"]
                rows.append((f["name"], "redis→realtime", "%.0f×%d/s" % (a.rt_rate, a.subscribers), rr["accepted"],
                             rr["delivered"], rr["lost"], rr["duplicated"], 0, rpub.failures, recovery))
                if rr["duplicated"]:
                    problems.append("realtime: %d Redis broadcasts delivered twice" % rr["duplicated"])
                if rr["silent"]:
                    # Reported, not failed: a Redis outage is invisible to
                    # /ws clients by design (local delivery goes on).
                    log("realtime: %d subscribers missed Redis broadcasts without an Error frame or close"
                        % rr["silent"])
                rows.append((f["name"], "realtime bcast", "%.0f×%d/s" % (a.rt_rate, a.subscribers), r["accepted"],
                             r["delivered"], r["lost"], r["duplicated"], 0, r["refused"], recovery))
                log("realtime: %s" % json.dumps(r))
                # At-most-once: loss is reported, not a failure; but a
                # subscriber that missed broadcasts must have been told
                # (an Error frame or a close), and nothing may come twice.
                if r["silent"]:
                    problems.append("realtime: %d subscribers lost broadcasts with no Error frame or close"
                                    % r["silent"])
                if r["duplicated"]:
                    problems.append("realtime: %d broadcasts delivered twice" % r["duplicated"])
            ev = loads[0]
            d, lost, dup, redel, bad = check_events(stack, recv, ev.accepted, a.drain)
            if bad:
                problems.append("action_results: %d accepted events without exactly one success job" % len(bad))
            load = "%.0f ev/s" % a.rate
            rows.append((f["name"], "events→webhook", load, len(ev.accepted), d, lost, dup, redel, ev.failures,
                         recovery))
            if lost or dup or bad:
                problems.append("events: %d lost, %d duplicated" % (lost, dup))
            if with_runtime:
                apl = loads[1]
                d2, lost2, dup2 = check_appends(stack, run_id, apl.accepted)
                rows.append((f["name"], "runtime appends", "%.0f ap/s" % a.rate, len(apl.accepted), d2, lost2, dup2,
                             0, apl.failures, recovery))
                if lost2 or dup2:
                    problems.append("appends: %d lost, %d duplicated" % (lost2, dup2))
            if f.get("down"):
                # The stack's instance comes back for the next fault.
                stack.up()
                if not stack.wait_healthy(120):
                    problems.append("%s did not come back: %s" % (f["down"], ",".join(stack.healthy())))
            if f.get("lazy_pair") and f["pair"] in stack.extras:
                # Its clients (all of them now) get a close and go back.
                for e in stack.extras.pop(f["pair"]):
                    e.stop()
                stack.rt.ask("unspread")
            if problems:
                failed.append((f["name"], problems))
                log("%s: FAILED: %s" % (f["name"], "; ".join(problems)))
        if reader:
            log("SSE client: %d connections, %d stream.reset" % (reader.connects, reader.resets))
    finally:
        for ld in (rt, rtes):
            if ld:
                ld.close()
        if reader:
            reader.stopping.set()
        for es in stack.extras.values():
            for e in es:
                e.stop()
        if not a.keep:
            stack.stop()
        if stack.upstream.proc:
            stack.upstream.kill9()
        recv.peer.stop()

    hdr = ("fault", "path", "load", "accepted", "delivered", "lost", "duplicated", "redelivered", "refused",
           "recovery")
    fmt = "%-28s %-18s %-10s %8s %9s %5s %10s %11s %7s %9s"
    print(fmt % hdr)
    for r in rows:
        print(fmt % (r[:9] + ("%.1f s" % r[9],)))
    print("\nredelivered: the same X-Idempotency-Key delivered again (at-least-once; deduplicated by the key);\n"
          "refused: requests the load retried because nothing accepted them (during the fault);\n"
          "recovery: from the fault until every health route answers 200 again;\n"
          "realtime bcast: accepted = broadcasts acked × subscribers; at-most-once (SPEC 5a), loss reported, not failed.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": [dict(zip(hdr, r)) for r in rows], "failed": failed}, f, indent=1)
    for name, problems in failed:
        print("FAILED %s: %s" % (name, "; ".join(problems)))
    if not rows:
        print("FAILED: no fault ran")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
