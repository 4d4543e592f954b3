"""The api-gateway's ERC-8004 REST API (SPEC 2a, issue 3) against the real
PostgreSQL: accounts and tokens, triggers, chain events, results, CORS, the
rate limit, the error bodies, and the OpenAPI document.

Uses its own database `ae_test_gw_<pid>` on the shared server
(TEST_DATABASE_URL's server; created fresh, migrated with bin/migrate, dropped
at the end) and starts bin/api-gateway as a subprocess on a free port
(GW_TEST_PORT to choose one). The npm packages (jsonwebtoken, @redocly/cli) come from
tests/integration/setup-node.sh, which setUpModule runs (idempotent).
"""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
import unittest
import urllib.parse
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import (BINDIR, ROOT, Service, db_url, http, http_json, private_db_create,  # noqa: E402
                    private_db_drop, wait_for)
from pgtmp import free_port  # noqa: E402
from tools import need  # noqa: E402

import psycopg2  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
JWT_SECRET = "gw-test-secret-0123456789abcdef"
INGEST_TOKEN = "gw-test-ingest-token"
# One database per run (dropped at the end), so that two runs of this suite
# (a developer's and `make test`) never drop each other's database.
DB_NAME = "ae_test_gw_%d" % os.getpid()


TEST_DB_URL = db_url(DB_NAME)


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims, secret=JWT_SECRET, alg="HS256"):
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    signing = (header + "." + payload).encode()
    if alg == "none":
        return header + "." + payload + "."
    sig = hmac.new(secret.encode(), signing, hashlib.sha256).digest()
    return header + "." + payload + "." + b64url(sig)


def setUpModule():
    global GW, BASE, PORT
    need("npm")
    r = subprocess.run([os.path.join(HERE, "setup-node.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError("setup-node.sh failed (npm packages): " + r.stderr.strip())
    private_db_create(DB_NAME)
    PORT = int(os.environ.get("GW_TEST_PORT") or free_port())
    BASE = "http://127.0.0.1:%d" % PORT
    GW = Service("api-gateway", {
        "SERVER_PORT": PORT, "SERVER_HOST": "127.0.0.1", "DATABASE_URL": TEST_DB_URL,
        "JWT_SECRET": JWT_SECRET, "INGEST_TOKEN": INGEST_TOKEN, "RATE_LIMIT": "100000000",
        "HEALTH_CHECK_INTERVAL": "200ms", "CORS_ORIGINS": "http://localhost*,https://app.example.com"},
        health=BASE + "/api/v1/health", health_status=200).start()


def tearDownModule():
    GW.stop()
    private_db_drop(DB_NAME)


def db():
    c = psycopg2.connect(TEST_DB_URL)
    c.autocommit = True
    return c


def call(method, path, body=None, token=None, headers=None, raw=None):
    h = dict(headers or {})
    if token:
        h["Authorization"] = "Bearer " + token
    if raw is not None:
        h.setdefault("Content-Type", "application/json")
        status, hdrs, data = http(method, BASE + path, raw, h)
        return status, hdrs, json.loads(data) if data else None
    return http_json(method, BASE + path, body, h)


_seq = [0]


def new_user(prefix="u"):
    """Registers and logs in a fresh user; returns (user, tokens)."""
    _seq[0] += 1
    name = "%s%d_%s" % (prefix, _seq[0], uuid.uuid4().hex[:8])
    st, _, user = call("POST", "/api/v1/auth/register",
                       {"username": name, "email": name + "@Example.com", "password": "correct horse 1"})
    assert st == 201, (st, user)
    st, _, tok = call("POST", "/api/v1/auth/login", {"username": name, "password": "correct horse 1"})
    assert st == 200, (st, tok)
    return user, tok


def valid_trigger(**over):
    t = {
        "name": "High scores",
        "description": "notify on high feedback",
        "chain_id": 11155111,
        "registry": "reputation",
        "enabled": True,
        "conditions": [
            {"condition_type": "event_type_equals", "value": "NewFeedback"},
            {"condition_type": "score_threshold", "field": "score", "operator": ">=", "value": "80"},
        ],
        "actions": [
            {"action_type": "telegram", "priority": 2,
             "config": {"chat_id": "12345", "message_template": "agent {{agent_id}} scored {{score}}"}},
            {"action_type": "rest", "config": {"method": "POST", "url": "https://hooks.example.com/x"}},
        ],
    }
    t.update(over)
    return t


_ev = [0]


def event(**over):
    _ev[0] += 1
    e = {
        "id": "ev-%s-%d" % (uuid.uuid4().hex[:12], _ev[0]),
        "chain_id": 11155111, "block_number": 1000 + _ev[0], "block_hash": "0xbb",
        "transaction_hash": "0x" + uuid.uuid4().hex, "log_index": 0,
        "registry": "reputation", "event_type": "NewFeedback", "agent_id": 42,
        "timestamp": 1700000000 + _ev[0], "client_address": "0xc1", "feedback_index": 1,
        "score": 90, "tag1": "quality", "tag2": "speed",
    }
    e.update(over)
    return e


def ingest(events, token=INGEST_TOKEN):
    return call("POST", "/api/v1/chain-events", events, token=token)


class Health(unittest.TestCase):
    def test_health_routes_and_metrics(self):
        st, h, body = call("GET", "/api/v1/health")
        self.assertEqual((st, body["status"], body["database"]), (200, "healthy", "connected"))
        st, _, body = call("GET", "/health")
        self.assertEqual((st, body["service"]), (200, "api-gateway"))
        st, h, text = http("GET", BASE + "/metrics")
        self.assertEqual(st, 200)
        self.assertIn(b"http_requests_total{", text)

    def test_unknown_route_404_json(self):
        st, h, body = call("GET", "/api/v1/nope")
        self.assertEqual((st, body["error"]), (404, "not_found"))
        self.assertEqual(body["request_id"], h["x-request-id"])


class Accounts(unittest.TestCase):
    def test_register_returns_user_without_hash(self):
        name = "reg_" + uuid.uuid4().hex[:10]
        st, _, user = call("POST", "/api/v1/auth/register",
                           {"username": name, "email": name + "@example.com", "password": "s3cret-pass"})
        self.assertEqual(st, 201, user)
        self.assertEqual(user["username"], name)
        self.assertEqual(user["email"], name + "@example.com")
        self.assertTrue(user["id"])
        self.assertNotIn("password_hash", user)
        self.assertNotIn("password", user)
        with db() as c, c.cursor() as cur:
            cur.execute("SELECT password_hash FROM users WHERE id = %s", (user["id"],))
            h = cur.fetchone()[0]
        self.assertTrue(h.startswith("$y$"), h)
        self.assertNotIn("s3cret-pass", h)

    def test_register_conflicts(self):
        user, _ = new_user()
        st, _, body = call("POST", "/api/v1/auth/register",
                           {"username": user["username"], "email": "other_%s@example.com" % uuid.uuid4().hex,
                            "password": "password123"})
        self.assertEqual((st, body["error"]), (409, "conflict"))
        self.assertIn("username", body["details"])
        st, _, body = call("POST", "/api/v1/auth/register",
                           {"username": "x" + uuid.uuid4().hex[:10], "email": user["email"].upper(),
                            "password": "password123"})
        self.assertEqual((st, body["error"]), (409, "conflict"))
        self.assertIn("email", body["details"])

    def test_register_validation_lists_every_field(self):
        st, _, body = call("POST", "/api/v1/auth/register", {})
        self.assertEqual(st, 400)
        self.assertEqual(set(body["details"]), {"username", "email", "password"})
        st, _, body = call("POST", "/api/v1/auth/register",
                           {"username": "a b", "email": "not-an-email", "password": "short"})
        self.assertEqual(st, 400)
        self.assertEqual(set(body["details"]), {"username", "email", "password"})
        st, _, body = call("POST", "/api/v1/auth/register", {"username": 5, "email": [], "password": None})
        self.assertEqual(set(body["details"]), {"username", "email", "password"})

    def test_malformed_json_names_position(self):
        for path in ("/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/auth/refresh"):
            st, _, body = call("POST", path, raw='{"username": "a",, }')
            self.assertEqual((st, body["error"]), (400, "invalid_request"), path)
            self.assertRegex(body["message"], r"\d", "the message names the position")

    def test_login_by_username_and_email(self):
        user, tok = new_user()
        self.assertEqual(tok["token_type"], "Bearer")
        self.assertGreater(tok["expires_in"], 0)
        self.assertEqual(tok["access_token"].count("."), 2)
        self.assertTrue(tok["refresh_token"])
        st, _, tok2 = call("POST", "/api/v1/auth/login", {"email": user["email"], "password": "correct horse 1"})
        self.assertEqual(st, 200, tok2)
        # Usernames and emails are unique regardless of case, and match so at login.
        st, _, tok3 = call("POST", "/api/v1/auth/login", {"username": user["username"].upper(),
                                                           "password": "correct horse 1"})
        self.assertEqual(st, 200, tok3)
        claims = json.loads(base64.urlsafe_b64decode(tok2["access_token"].split(".")[1] + "=="))
        self.assertEqual(claims["sub"], user["id"])
        for k in ("iat", "exp", "jti"):
            self.assertIn(k, claims)

    def test_same_error_for_unknown_user_and_wrong_password(self):
        user, _ = new_user()
        st1, _, b1 = call("POST", "/api/v1/auth/login", {"username": user["username"], "password": "wrong pass!"})
        t0 = time.monotonic()
        st2, _, b2 = call("POST", "/api/v1/auth/login", {"username": "nobody_" + uuid.uuid4().hex,
                                                          "password": "wrong pass!"})
        unknown_s = time.monotonic() - t0
        self.assertEqual((st1, st2), (401, 401))
        self.assertEqual((b1["error"], b1["message"]), (b2["error"], b2["message"]))
        # The unknown user still pays for one yescrypt run.
        self.assertGreater(unknown_s, 0.002)
        st, _, b = call("POST", "/api/v1/auth/login", {"password": "x"})
        self.assertEqual(st, 400)
        self.assertIn("username", b["details"])

    def test_refresh_is_single_use_and_reuse_revokes_the_family(self):
        _, tok = new_user()
        st, _, t2 = call("POST", "/api/v1/auth/refresh", {"refresh_token": tok["refresh_token"]})
        self.assertEqual(st, 200, t2)
        self.assertNotEqual(t2["refresh_token"], tok["refresh_token"])
        st, _, body = call("GET", "/api/v1/triggers", token=t2["access_token"])
        self.assertEqual(st, 200)
        # Replaying the first token: refused, and the thief's replay kills the session.
        st, _, body = call("POST", "/api/v1/auth/refresh", {"refresh_token": tok["refresh_token"]})
        self.assertEqual((st, body["error"]), (401, "unauthorized"))
        st, _, body = call("POST", "/api/v1/auth/refresh", {"refresh_token": t2["refresh_token"]})
        self.assertEqual(st, 401)

    def test_refresh_bad_inputs(self):
        st, _, body = call("POST", "/api/v1/auth/refresh", {"refresh_token": "not-a-token"})
        self.assertEqual(st, 401)
        st, _, body = call("POST", "/api/v1/auth/refresh", {})
        self.assertEqual(st, 400)
        self.assertIn("refresh_token", body["details"])

    def test_logout_revokes_refresh_token(self):
        _, tok = new_user()
        st, _, body = call("POST", "/api/v1/auth/logout", {"refresh_token": tok["refresh_token"]})
        self.assertEqual(st, 204)
        st, _, body = call("POST", "/api/v1/auth/refresh", {"refresh_token": tok["refresh_token"]})
        self.assertEqual(st, 401)
        st, _, body = call("POST", "/api/v1/auth/logout", {"refresh_token": tok["refresh_token"]})
        self.assertEqual(st, 204, "logout is idempotent")

    def test_concurrent_refresh_only_one_wins(self):
        _, tok = new_user()
        results = []

        def go():
            results.append(call("POST", "/api/v1/auth/refresh", {"refresh_token": tok["refresh_token"]})[0])
        ts = [threading.Thread(target=go) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(sorted(results).count(200), 1, results)


class Tokens(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.user, cls.tok = new_user("tok")

    def claims(self, **over):
        now = int(time.time())
        c = {"sub": self.user["id"], "iat": now, "exp": now + 600, "jti": uuid.uuid4().hex}
        c.update(over)
        return c

    def assert_401(self, token, what):
        st, h, body = call("GET", "/api/v1/triggers", token=token)
        self.assertEqual(st, 401, what)
        self.assertEqual(body["error"], "unauthorized", what)
        self.assertIn("request_id", body)

    def test_missing_forged_expired_none(self):
        st, h, body = call("GET", "/api/v1/triggers")
        self.assertEqual((st, body["error"]), (401, "unauthorized"))
        self.assert_401(make_jwt(self.claims(), secret="another-secret"), "forged")
        self.assert_401(make_jwt(self.claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)), "expired")
        self.assert_401(make_jwt(self.claims(), alg="none"), "alg none")
        self.assert_401("garbage.token.here", "garbage")
        self.assert_401(self.tok["access_token"][:-3] + "AAA", "tampered signature")
        st, _, _ = call("GET", "/api/v1/triggers", headers={"Authorization": "Basic abc"})
        self.assertEqual(st, 401)

    def test_own_hs256_token_accepted(self):
        st, _, body = call("GET", "/api/v1/triggers", token=make_jwt(self.claims()))
        self.assertEqual(st, 200, body)

    def test_token_from_node_jsonwebtoken_accepted(self):
        script = ("const jwt=require('jsonwebtoken');"
                  "process.stdout.write(jwt.sign({sub:process.argv[1]},process.argv[2],"
                  "{algorithm:'HS256',expiresIn:600,jwtid:'n-'+Date.now()}));")
        r = subprocess.run([need("node"), "-e", script, self.user["id"], JWT_SECRET], cwd=HERE,
                           capture_output=True, text=True, check=True)
        st, _, body = call("GET", "/api/v1/triggers", token=r.stdout.strip())
        self.assertEqual(st, 200, body)

    def test_node_jsonwebtoken_verifies_our_token(self):
        script = ("const jwt=require('jsonwebtoken');"
                  "const c=jwt.verify(process.argv[1],process.argv[2],{algorithms:['HS256']});"
                  "process.stdout.write(JSON.stringify(c));")
        r = subprocess.run([need("node"), "-e", script, self.tok["access_token"], JWT_SECRET], cwd=HERE,
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["sub"], self.user["id"])


class Triggers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.alice, cls.at = new_user("alice")
        cls.bob, cls.bt = new_user("bob")
        cls.a = cls.at["access_token"]
        cls.b = cls.bt["access_token"]

    def create(self, token=None, **over):
        st, _, t = call("POST", "/api/v1/triggers", valid_trigger(**over), token=token or self.a)
        self.assertEqual(st, 201, t)
        return t

    def test_create_get_shape(self):
        t = self.create()
        for k in ("id", "name", "description", "chain_id", "registry", "enabled", "is_stateful", "conditions",
                  "actions", "created_at", "updated_at"):
            self.assertIn(k, t)
        self.assertEqual((t["name"], t["chain_id"], t["registry"], t["enabled"]),
                         ("High scores", 11155111, "reputation", True))
        self.assertFalse(t["is_stateful"])
        self.assertEqual([c["condition_type"] for c in t["conditions"]], ["event_type_equals", "score_threshold"])
        self.assertEqual(t["actions"][0]["config"]["chat_id"], "12345")
        self.assertEqual(t["actions"][0]["priority"], 2)
        self.assertEqual(t["actions"][1]["priority"], 1, "priority defaults to 1")
        self.assertRegex(t["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
        st, _, got = call("GET", "/api/v1/triggers/" + t["id"], token=self.a)
        self.assertEqual((st, got), (200, t))

    def test_is_stateful_derived(self):
        t = self.create(conditions=[{"condition_type": "ema_threshold", "field": "score", "operator": "<",
                                     "value": "50", "config": {"window_size": 10}}])
        self.assertTrue(t["is_stateful"])
        t = self.create(conditions=[{"condition_type": "rate_limit", "operator": ">", "value": "5",
                                     "config": {"time_window": "1h"}}])
        self.assertTrue(t["is_stateful"])
        t = self.create(conditions=[])
        self.assertFalse(t["is_stateful"])

    def test_put_patch_delete(self):
        t = self.create()
        body = valid_trigger(name="Renamed", registry="validation", enabled=False,
                             conditions=[{"condition_type": "agent_id_equals", "value": "7"}],
                             actions=[{"action_type": "mcp", "config": {"server_url": "https://mcp.example.com/mcp",
                                                                        "tool": "notify"}}])
        st, _, p = call("PUT", "/api/v1/triggers/" + t["id"], body, token=self.a)
        self.assertEqual(st, 200, p)
        self.assertEqual((p["name"], p["registry"], p["enabled"]), ("Renamed", "validation", False))
        self.assertEqual([c["condition_type"] for c in p["conditions"]], ["agent_id_equals"])
        self.assertEqual([a["action_type"] for a in p["actions"]], ["mcp"])
        self.assertEqual(p["created_at"], t["created_at"])
        st, _, q = call("PATCH", "/api/v1/triggers/" + t["id"], {"name": "Patched", "enabled": True}, token=self.a)
        self.assertEqual(st, 200, q)
        self.assertEqual((q["name"], q["enabled"], q["registry"]), ("Patched", True, "validation"))
        self.assertEqual([c["condition_type"] for c in q["conditions"]], ["agent_id_equals"])
        self.assertEqual([a["action_type"] for a in q["actions"]], ["mcp"])
        st, _, e = call("PATCH", "/api/v1/triggers/" + t["id"], {"registry": "bogus"}, token=self.a)
        self.assertEqual(st, 400)
        self.assertTrue(any("registry" in k for k in e["details"]), e)
        st, _, _ = call("DELETE", "/api/v1/triggers/" + t["id"], token=self.a)
        self.assertEqual(st, 204)
        st, _, e = call("GET", "/api/v1/triggers/" + t["id"], token=self.a)
        self.assertEqual((st, e["error"]), (404, "not_found"))
        st, _, _ = call("DELETE", "/api/v1/triggers/" + t["id"], token=self.a)
        self.assertEqual(st, 404)

    def test_other_users_trigger_is_404(self):
        t = self.create()
        for method, body in (("GET", None), ("PUT", valid_trigger()), ("PATCH", {"name": "x"}), ("DELETE", None)):
            st, _, e = call(method, "/api/v1/triggers/" + t["id"], body, token=self.b)
            self.assertEqual((st, e["error"]), (404, "not_found"), method)
        st, _, e = call("GET", "/api/v1/triggers/%s/results" % t["id"], token=self.b)
        self.assertEqual(st, 404)
        st, _, lst = call("GET", "/api/v1/triggers?limit=100", token=self.b)
        self.assertNotIn(t["id"], [i["id"] for i in lst["items"]])
        st, _, got = call("GET", "/api/v1/triggers/" + t["id"], token=self.a)
        self.assertEqual((st, got["name"]), (200, "High scores"), "bob changed nothing")

    def assert_invalid(self, body, *fields, method="POST", path="/api/v1/triggers"):
        st, _, e = call(method, path, body, token=self.a)
        self.assertEqual(st, 400, (body, e))
        self.assertEqual(e["error"], "invalid_request")
        keys = " ".join(e.get("details", {}).keys())
        for f in fields:
            self.assertIn(f, keys, "details %r should name %s" % (e.get("details"), f))
        return e

    def test_validation_rules(self):
        self.assert_invalid({}, "name", "chain_id", "registry")
        self.assert_invalid(valid_trigger(name=""), "name")
        self.assert_invalid(valid_trigger(chain_id="abc"), "chain_id")
        self.assert_invalid(valid_trigger(registry="nope"), "registry")
        self.assert_invalid(valid_trigger(enabled="yes"), "enabled")
        self.assert_invalid(valid_trigger(conditions="x"), "conditions")
        self.assert_invalid(valid_trigger(actions=[]), "actions")
        self.assert_invalid(valid_trigger(conditions=[{"condition_type": "moon_phase"}]), "condition_type")
        self.assert_invalid(valid_trigger(conditions=[{"condition_type": "score_threshold", "operator": "~",
                                                       "value": "5"}]), "operator")
        self.assert_invalid(valid_trigger(conditions=[{"condition_type": "score_threshold", "operator": ">",
                                                       "value": "high"}]), "value")
        self.assert_invalid(valid_trigger(conditions=[{"condition_type": "tag_equals", "field": "tag9",
                                                       "value": "x"}]), "field")
        self.assert_invalid(valid_trigger(conditions=[{"condition_type": "ema_threshold", "field": "score",
                                                       "operator": "<", "value": "5",
                                                       "config": {"window_size": 0}}]), "window_size")
        self.assert_invalid(valid_trigger(conditions=[{"condition_type": "rate_limit", "operator": ">",
                                                       "value": "5", "config": {"time_window": "soon"}}]),
                            "time_window")
        self.assert_invalid(valid_trigger(actions=[{"action_type": "telegram", "config": {}}]), "chat_id")
        self.assert_invalid(valid_trigger(actions=[{"action_type": "rest",
                                                    "config": {"method": "POST", "url": "ftp://x/y"}}]), "url")
        self.assert_invalid(valid_trigger(actions=[{"action_type": "mcp", "config": {"tool": "t"}}]), "server_url")
        self.assert_invalid(valid_trigger(actions=[{"action_type": "pigeon", "config": {}}]), "action_type")
        # Every bad field at once, not just the first.
        e = self.assert_invalid(valid_trigger(
            registry="nope",
            conditions=[{"condition_type": "moon_phase"}],
            actions=[{"action_type": "telegram", "config": {}}]), "registry", "condition_type", "chat_id")
        self.assertGreaterEqual(len(e["details"]), 3)
        t = self.create()
        self.assert_invalid(valid_trigger(registry="x"), "registry", method="PUT", path="/api/v1/triggers/" + t["id"])

    def test_malformed_json_and_non_object(self):
        st, _, e = call("POST", "/api/v1/triggers", raw='{"name": ', token=self.a)
        self.assertEqual(st, 400)
        self.assertRegex(e["message"], r"\d")
        st, _, e = call("POST", "/api/v1/triggers", [1, 2], token=self.a)
        self.assertEqual(st, 400)

    def test_sql_metacharacters_stored_literally(self):
        evil = "x'); DROP TABLE triggers; -- \" \\ % _ $1 ;"
        t = self.create(name=evil, description=evil,
                        conditions=[{"condition_type": "tag_equals", "field": "tag1", "value": evil}],
                        actions=[{"action_type": "telegram", "config": {"chat_id": evil, "message_template": evil}}])
        st, _, got = call("GET", "/api/v1/triggers/" + urllib.parse.quote(t["id"]), token=self.a)
        self.assertEqual((got["name"], got["description"]), (evil, evil))
        self.assertEqual(got["conditions"][0]["value"], evil)
        self.assertEqual(got["actions"][0]["config"]["chat_id"], evil)
        st, _, e = call("GET", "/api/v1/triggers/" + urllib.parse.quote("x' OR '1'='1"), token=self.a)
        self.assertEqual(st, 404)
        st, _, e = call("GET", "/api/v1/triggers?limit=" + urllib.parse.quote("1; DROP TABLE x"), token=self.a)
        self.assertEqual(st, 400)
        self.assertIn("limit", e["details"])
        st, _, e = call("GET", "/api/v1/triggers?cursor=" + urllib.parse.quote("' OR 1=1 --"), token=self.a)
        self.assertEqual(st, 400)
        self.assertIn("cursor", e["details"])
        with db() as c, c.cursor() as cur:
            cur.execute("SELECT count(*) FROM triggers WHERE name = %s", (evil,))
            self.assertEqual(cur.fetchone()[0], 1)

    def test_notify_trigger_changed_after_commit(self):
        c = db()
        try:
            cur = c.cursor()
            cur.execute("LISTEN trigger_changed")
            t = self.create()
            st, _, _ = call("PATCH", "/api/v1/triggers/" + t["id"], {"name": "n2"}, token=self.a)
            st, _, _ = call("DELETE", "/api/v1/triggers/" + t["id"], token=self.a)
            got = []

            def three():
                c.poll()
                while c.notifies:
                    n = c.notifies.pop(0)
                    if n.payload == t["id"]:
                        got.append(n.channel)
                return len(got) >= 3
            wait_for(three, 5, what="three trigger_changed notifications")
            self.assertEqual(set(got), {"trigger_changed"})
        finally:
            c.close()

    def test_failed_write_leaves_nothing(self):
        with db() as c, c.cursor() as cur:
            cur.execute("SELECT count(*) FROM triggers")
            before = cur.fetchone()[0]
        self.assert_invalid(valid_trigger(actions=[{"action_type": "telegram", "config": {}}]), "chat_id")
        with db() as c, c.cursor() as cur:
            cur.execute("SELECT count(*) FROM triggers")
            self.assertEqual(cur.fetchone()[0], before)

    def test_pagination_stable_under_inserts(self):
        user, tok = new_user("pager")
        a = tok["access_token"]
        made = [self.create(token=a, name="p%d" % i)["id"] for i in range(23)]
        seen, cursor, pages = [], None, 0
        while True:
            q = "/api/v1/triggers?limit=5" + ("&cursor=" + cursor if cursor else "")
            st, _, page = call("GET", q, token=a)
            self.assertEqual(st, 200, page)
            self.assertLessEqual(len(page["items"]), 5)
            seen += [i["id"] for i in page["items"]]
            # Inserts while paging must neither shift nor duplicate rows.
            self.create(token=a, name="during%d" % pages)
            pages += 1
            cursor = page["next_cursor"]
            if not cursor:
                break
            self.assertLess(pages, 20)
        self.assertEqual(len(seen), len(set(seen)), "no repeats")
        self.assertEqual(set(made) - set(seen), set(), "no skips")
        st, _, e = call("GET", "/api/v1/triggers?limit=0", token=a)
        self.assertEqual(st, 400)
        st, _, e = call("GET", "/api/v1/triggers?limit=101", token=a)
        self.assertEqual(st, 400)
        st, _, page = call("GET", "/api/v1/triggers", token=a)
        self.assertEqual(len(page["items"]), 20, "default limit")


class TriggerLimits(unittest.TestCase):
    """Issue 10: what one user may ask of the matching loop every tenant
    shares (limits in libshared/trigger_model.h, the same in the processor)."""

    def test_stateful_conditions_and_rate_value_bounded(self):
        _, tok = new_user("lim")
        a = tok["access_token"]

        def stateful(n):
            return [{"condition_type": "rate_limit" if i % 2 == 0 else "ema_threshold", "operator": ">",
                     "value": "100000" if i % 2 == 0 else "1",
                     "config": {"time_window": "365d"} if i % 2 == 0 else {"window_size": 100000}}
                    for i in range(n)]
        st, _, t = call("POST", "/api/v1/triggers", valid_trigger(conditions=stateful(8)), token=a)
        self.assertEqual(st, 201, t)
        # 32 stateful conditions per user in all: 3 more triggers of 8 fit.
        made = []
        for _ in range(3):
            st, _, x = call("POST", "/api/v1/triggers", valid_trigger(conditions=stateful(8)), token=a)
            self.assertEqual(st, 201, x)
            made.append(x)
        st, _, e = call("POST", "/api/v1/triggers", valid_trigger(conditions=stateful(1)), token=a)
        self.assertEqual(st, 400, e)
        self.assertIn("at most 32 stateful conditions", e["details"]["conditions"])
        # ...and no edit turns a stateless trigger into the 33rd.
        st, _, plain = call("POST", "/api/v1/triggers", valid_trigger(), token=a)
        self.assertEqual(st, 201, plain)
        st, _, e = call("PATCH", "/api/v1/triggers/" + plain["id"], {"conditions": stateful(1)}, token=a)
        self.assertEqual(st, 400, e)
        self.assertIn("at most 32 stateful conditions", e["details"]["conditions"])
        # Replacing one of the four with the same counts as before is fine.
        st, _, x = call("PUT", "/api/v1/triggers/" + made[0]["id"], valid_trigger(conditions=stateful(8)), token=a)
        self.assertEqual(st, 200, x)
        for x in made:
            self.assertEqual(call("DELETE", "/api/v1/triggers/" + x["id"], token=a)[0], 204)
        st, _, e = call("POST", "/api/v1/triggers", valid_trigger(conditions=stateful(9)), token=a)
        self.assertEqual((st, e["error"]), (400, "invalid_request"))
        self.assertIn("at most 8 stateful conditions", e["details"]["conditions"])
        st, _, e = call("PUT", "/api/v1/triggers/" + t["id"], valid_trigger(conditions=stateful(9)), token=a)
        self.assertEqual(st, 400)
        self.assertIn("conditions", e["details"])
        st, _, e = call("POST", "/api/v1/triggers", valid_trigger(conditions=[
            {"condition_type": "rate_limit", "operator": ">", "value": "100001", "config": {"time_window": "1h"}}]),
            token=a)
        self.assertEqual(st, 400)
        self.assertEqual(e["details"]["conditions[0].value"], "must be between 0 and 100000")

    def test_triggers_per_user_bounded_even_when_concurrent(self):
        _, tok = new_user("many")
        a = tok["access_token"]
        for i in range(95):
            st, _, t = call("POST", "/api/v1/triggers", valid_trigger(name="t%d" % i), token=a)
            self.assertEqual(st, 201, t)
        got = []

        def go(i):
            got.append(call("POST", "/api/v1/triggers", valid_trigger(name="c%d" % i), token=a))
        ts = [threading.Thread(target=go, args=(i,)) for i in range(10)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(sorted(st for st, _, _ in got), [201] * 5 + [400] * 5)
        for st, _, e in got:
            if st == 400:
                self.assertEqual(e["error"], "invalid_request")
                self.assertIn("at most 100 triggers", e["details"]["triggers"])
        with db() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM triggers t JOIN users u ON u.id = t.user_id WHERE u.username = %s",
                        (tok.get("username") or _whoami(a),))
            self.assertEqual(cur.fetchone()[0], 100)
        # Another user is not affected, and a deleted trigger frees a place.
        _, other = new_user("few")
        st, _, _ = call("POST", "/api/v1/triggers", valid_trigger(), token=other["access_token"])
        self.assertEqual(st, 201)
        st, _, lst = call("GET", "/api/v1/triggers?limit=1", token=a)
        st, _, _ = call("DELETE", "/api/v1/triggers/" + lst["items"][0]["id"], token=a)
        self.assertEqual(st, 204)
        st, _, _ = call("POST", "/api/v1/triggers", valid_trigger(), token=a)
        self.assertEqual(st, 201)


def _whoami(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["username"]


class Results(unittest.TestCase):
    def test_results_newest_first_paginated_owner_only(self):
        user, tok = new_user("res")
        a = tok["access_token"]
        st, _, t = call("POST", "/api/v1/triggers", valid_trigger(), token=a)
        self.assertEqual(st, 201)
        ev = event()
        self.assertEqual(ingest([ev])[0], 200)
        with db() as c, c.cursor() as cur:
            cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'action_results'")
            cols = {r[0] for r in cur.fetchall()}
            for i in range(7):
                row = {"job_id": "job-%s-%d" % (t["id"], i), "trigger_id": t["id"], "event_id": ev["id"],
                       "action_type": "telegram", "status": "success" if i % 2 else "failed",
                       "duration_ms": 10 + i, "error_message": None if i % 2 else "boom'; --",
                       "response_data": json.dumps({"i": i}), "retry_count": 0}
                row = {k: v for k, v in row.items() if k in cols}
                cur.execute("INSERT INTO action_results (%s, executed_at) VALUES (%s, now() - %s * interval '1 min')"
                            % (", ".join(row), ", ".join(["%s"] * len(row)), "%s"),
                            list(row.values()) + [7 - i])
        seen, cursor = [], None
        while True:
            st, _, page = call("GET", "/api/v1/triggers/%s/results?limit=3%s" %
                               (t["id"], "&cursor=" + cursor if cursor else ""), token=a)
            self.assertEqual(st, 200, page)
            seen += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        self.assertEqual(len(seen), 7)
        self.assertEqual([r["duration_ms"] for r in seen], [16, 15, 14, 13, 12, 11, 10], "newest first")
        self.assertEqual(seen[0]["response_data"], {"i": 6})
        self.assertEqual(seen[-1]["error_message"], "boom'; --")
        other, otok = new_user("res2")
        st, _, e = call("GET", "/api/v1/triggers/%s/results" % t["id"], token=otok["access_token"])
        self.assertEqual(st, 404)
        st, _, e = call("GET", "/api/v1/triggers/%s/results" % t["id"])
        self.assertEqual(st, 401)
        st, _, e = call("GET", "/api/v1/triggers/%s/results?limit=abc" % t["id"], token=a)
        self.assertEqual(st, 400)
        forged = b64url(b"1700000000000000:1' OR '1'='1")
        st, _, e = call("GET", "/api/v1/triggers/%s/results?cursor=%s" % (t["id"], forged), token=a)
        self.assertEqual((st, list(e["details"])), (400, ["cursor"]))


class ChainEvents(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.user, tok = new_user("ce")
        cls.a = tok["access_token"]

    def test_ingest_requires_ingest_token(self):
        st, h, e = call("POST", "/api/v1/chain-events", [event()])
        self.assertEqual((st, e["error"]), (401, "unauthorized"))
        st, h, e = ingest([event()], token="wrong-token")
        self.assertEqual(st, 401)
        st, h, e = ingest([event()], token=self.a)
        self.assertEqual(st, 401, "a user's JWT is not the ingest token")

    def test_ingest_idempotent_and_mixed_batch(self):
        batch = [event() for _ in range(5)]
        st, _, r = ingest(batch)
        self.assertEqual((st, r), (200, {"inserted": 5, "duplicates": 0}))
        st, _, r = ingest(batch)
        self.assertEqual((st, r), (200, {"inserted": 0, "duplicates": 5}))
        mixed = batch[:2] + [event() for _ in range(3)]
        st, _, r = ingest({"events": mixed})
        self.assertEqual((st, r), (200, {"inserted": 3, "duplicates": 2}))
        again = event()
        st, _, r = ingest([again, dict(again)])
        self.assertEqual((st, r), (200, {"inserted": 1, "duplicates": 1}), "a repeat inside one batch")
        st, _, r = ingest([])
        self.assertEqual((st, r), (200, {"inserted": 0, "duplicates": 0}))

    def test_ingest_one_statement_per_batch(self):
        """A statement-level trigger counts INSERT statements on events: a
        batch of 200 events must be exactly one (not a round trip per event)."""
        c = db()
        try:
            cur = c.cursor()
            cur.execute("CREATE TABLE IF NOT EXISTS gw_test_stmt_count (n int NOT NULL)")
            cur.execute("TRUNCATE gw_test_stmt_count")
            cur.execute("CREATE OR REPLACE FUNCTION gw_test_count_stmt() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$BEGIN INSERT INTO gw_test_stmt_count VALUES (1); RETURN NULL; END$$")
            cur.execute("CREATE TRIGGER gw_test_count_stmt AFTER INSERT ON events "
                        "FOR EACH STATEMENT EXECUTE FUNCTION gw_test_count_stmt()")
            try:
                st, _, r = ingest([event() for _ in range(200)])
                self.assertEqual((st, r), (200, {"inserted": 200, "duplicates": 0}))
                cur.execute("SELECT count(*) FROM gw_test_stmt_count")
                self.assertEqual(cur.fetchone()[0], 1, "one INSERT statement for the whole batch")
            finally:
                cur.execute("DROP TRIGGER gw_test_count_stmt ON events")
        finally:
            c.close()

    def test_ingest_validation_per_index(self):
        bad = [event(), event(event_type="Bogus"), event(chain_id="abc", score=1.5), {"chain_id": 1},
               event(agent_id=2 ** 70), "nope", event(registry="x'; DROP TABLE events; --", tag1=5)]
        st, _, e = ingest(bad)
        self.assertEqual(st, 400, e)
        d = e["details"]
        for k in ("events[1].event_type", "events[2].chain_id", "events[2].score", "events[3].id",
                  "events[3].registry", "events[3].event_type", "events[4].agent_id", "events[5]",
                  "events[6].registry", "events[6].tag1"):
            self.assertIn(k, d)
        self.assertFalse(any(k.startswith("events[0]") for k in d))
        st, _, e = call("GET", "/api/v1/chain-events/" + bad[0]["id"], token=self.a)
        self.assertEqual(st, 404, "nothing of an invalid batch is stored")
        st, _, e = ingest({"nope": 1})
        self.assertEqual(st, 400)
        st, _, e = ingest([event() for _ in range(1001)])
        self.assertEqual(st, 400)
        self.assertIn("events", e["details"])
        st, _, e = call("POST", "/api/v1/chain-events", raw="[{]", token=INGEST_TOKEN)
        self.assertEqual(st, 400)

    def test_big_integers_as_strings(self):
        big = "123456789012345678"
        ev = event(agent_id=big)
        self.assertEqual(ingest([ev])[2]["inserted"], 1)
        st, _, got = call("GET", "/api/v1/chain-events/" + ev["id"], token=self.a)
        self.assertEqual(st, 200)
        st, _, raw = http("GET", BASE + "/api/v1/chain-events/" + ev["id"], headers={"Authorization": "Bearer " + self.a})
        self.assertIn(b'"agent_id":' + big.encode(), raw.replace(b" ", b""))

    def test_oversized_body_413(self):
        body = "[" + ",".join(['{"id":"%s","pad":"%s"}' % (i, "x" * 1000) for i in range(1100)]) + "]"
        self.assertGreater(len(body), 1024 * 1024)
        st, _, e = call("POST", "/api/v1/chain-events", raw=body, token=INGEST_TOKEN)
        self.assertEqual((st, e["error"]), (413, "payload_too_large"))

    def test_get_one_and_filters(self):
        agent = 900000 + int(uuid.uuid4().int % 100000)
        evs = [event(agent_id=agent, chain_id=77, registry="identity", event_type="AgentRegistered",
                     timestamp=1600000000, owner="0xowner", token_uri="ipfs://x", score=None),
               event(agent_id=agent, chain_id=77, timestamp=1600000100),
               event(agent_id=agent, chain_id=78, timestamp=1600000200, registry="validation",
                     event_type="ValidationRequest", validator_address="0xv", request_hash="0xr")]
        self.assertEqual(ingest(evs)[2]["inserted"], 3)
        st, _, got = call("GET", "/api/v1/chain-events/" + evs[0]["id"], token=self.a)
        self.assertEqual(st, 200)
        for k, v in evs[0].items():
            self.assertEqual(got[k], v, k)
        self.assertIsNone(got["score"])
        self.assertRegex(got["created_at"], r"Z$")

        def ids(q):
            st, _, page = call("GET", "/api/v1/chain-events?agent_id=%d&%s" % (agent, q), token=self.a)
            self.assertEqual(st, 200, page)
            return {e["id"] for e in page["items"]}
        all3 = {e["id"] for e in evs}
        self.assertEqual(ids(""), all3)
        self.assertEqual(ids("chain_id=77"), {evs[0]["id"], evs[1]["id"]})
        self.assertEqual(ids("registry=identity"), {evs[0]["id"]})
        self.assertEqual(ids("event_type=ValidationRequest"), {evs[2]["id"]})
        self.assertEqual(ids("since=1600000100"), {evs[1]["id"], evs[2]["id"]})
        self.assertEqual(ids("until=1600000100"), {evs[0]["id"], evs[1]["id"]})
        self.assertEqual(ids("since=2020-09-13T12:28:20Z&until=2020-09-13T12:28:20Z"), {evs[1]["id"]})
        self.assertEqual(ids("since=2020-09-13T14:28:20%2B02:00&until=1600000100"), {evs[1]["id"]})
        st, _, e = call("GET", "/api/v1/chain-events/does-not-exist", token=self.a)
        self.assertEqual(st, 404)
        st, _, e = call("GET", "/api/v1/chain-events/" + evs[0]["id"])
        self.assertEqual(st, 401)
        st, _, e = call("GET", "/api/v1/chain-events")
        self.assertEqual(st, 401)

    def test_filter_validation_and_metacharacters(self):
        meta = urllib.parse.quote("1' OR '1'='1")
        st, _, e = call("GET", "/api/v1/chain-events?chain_id=%s&agent_id=%s&registry=%s&event_type=%s"
                        "&since=%s&until=%s&limit=%s&cursor=%s" % ((meta,) * 8), token=self.a)
        self.assertEqual(st, 400, e)
        self.assertEqual(set(e["details"]), {"chain_id", "agent_id", "registry", "event_type", "since", "until",
                                             "limit", "cursor"})
        evil_id = "ev'; DROP TABLE events; -- %s \\ \" $1 /x?y#z" % uuid.uuid4().hex
        ev = event(id=evil_id, tag1="'; DELETE FROM users; --", metadata_value="%_\\")
        self.assertEqual(ingest([ev])[2], {"inserted": 1, "duplicates": 0})
        self.assertEqual(ingest([ev])[2], {"inserted": 0, "duplicates": 1})
        st, _, got = call("GET", "/api/v1/chain-events/" + urllib.parse.quote(evil_id, safe=""), token=self.a)
        if st == 404 and "/" in evil_id:
            # A '/' inside a path segment is decoded before routing; ask the table instead.
            with db() as c, c.cursor() as cur:
                cur.execute("SELECT tag1, metadata_value FROM events WHERE id = %s", (evil_id,))
                self.assertEqual(cur.fetchone(), (ev["tag1"], ev["metadata_value"]))
        else:
            self.assertEqual(st, 200, got)
            self.assertEqual((got["id"], got["tag1"], got["metadata_value"]), (evil_id, ev["tag1"], "%_\\"))
        plain_evil = "ev'; DROP TABLE events; --" + uuid.uuid4().hex
        self.assertEqual(ingest([event(id=plain_evil)])[2]["inserted"], 1)
        st, _, got = call("GET", "/api/v1/chain-events/" + urllib.parse.quote(plain_evil, safe=""), token=self.a)
        self.assertEqual((st, got["id"]), (200, plain_evil))
        with db() as c, c.cursor() as cur:
            cur.execute("SELECT count(*) FROM users")
            self.assertGreater(cur.fetchone()[0], 0)

    def test_pagination_stable_under_inserts(self):
        chain = 500000 + int(uuid.uuid4().int % 100000)
        first = [event(chain_id=chain) for _ in range(30)]
        for i in range(0, 30, 10):
            self.assertEqual(ingest(first[i:i + 10])[2]["inserted"], 10)
        seen, cursor, n = [], None, 0
        while True:
            st, _, page = call("GET", "/api/v1/chain-events?chain_id=%d&limit=7%s" %
                               (chain, "&cursor=" + cursor if cursor else ""), token=self.a)
            self.assertEqual(st, 200, page)
            seen += [e["id"] for e in page["items"]]
            ingest([event(chain_id=chain) for _ in range(3)])
            n += 1
            cursor = page["next_cursor"]
            if not cursor:
                break
            self.assertLess(n, 20)
        self.assertEqual(len(seen), len(set(seen)))
        self.assertEqual({e["id"] for e in first} - set(seen), set())


class Cors(unittest.TestCase):
    def test_preflight_allowed(self):
        st, h, _ = http("OPTIONS", BASE + "/api/v1/triggers", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Authorization, Content-Type"})
        self.assertEqual(st, 204)
        self.assertEqual(h["access-control-allow-origin"], "http://localhost:3000")
        self.assertIn("POST", h["access-control-allow-methods"])
        self.assertIn("Authorization", h["access-control-allow-headers"])
        st, h, _ = http("OPTIONS", BASE + "/api/v1/chain-events", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"})
        self.assertEqual(st, 204)
        self.assertEqual(h["access-control-allow-origin"], "https://app.example.com")

    def test_preflight_refused_origin(self):
        st, h, body = http("OPTIONS", BASE + "/api/v1/triggers", headers={
            "Origin": "https://evil.example.org", "Access-Control-Request-Method": "POST"})
        self.assertEqual(st, 403)
        self.assertNotIn("access-control-allow-origin", h)
        self.assertEqual(json.loads(body)["error"], "forbidden")

    def test_simple_request_headers(self):
        st, h, _ = http("GET", BASE + "/api/v1/health", headers={"Origin": "http://127.0.0.1:5173"})
        self.assertEqual(h.get("access-control-allow-origin"), None, "127.0.0.1 is not in this instance's list")
        st, h, _ = http("GET", BASE + "/api/v1/health", headers={"Origin": "http://localhost:8000"})
        self.assertEqual(h["access-control-allow-origin"], "http://localhost:8000")
        st, h, _ = http("GET", BASE + "/api/v1/health", headers={"Origin": "https://evil.example.org"})
        self.assertNotIn("access-control-allow-origin", h)


class RateLimit(unittest.TestCase):
    def test_429_with_retry_after_and_health_exempt(self):
        port = free_port()
        base = "http://127.0.0.1:%d" % port
        with Service("api-gateway", {
                "SERVER_PORT": port, "SERVER_HOST": "127.0.0.1", "DATABASE_URL": TEST_DB_URL,
                "JWT_SECRET": JWT_SECRET, "INGEST_TOKEN": INGEST_TOKEN, "RATE_LIMIT": "5"},
                health=base + "/health") as svc:
            codes = [http("GET", base + "/api/v1/chain-events")[0] for _ in range(5)]
            self.assertEqual(codes, [401] * 5)
            st, h, body = http("GET", base + "/api/v1/chain-events")
            self.assertEqual(st, 429)
            self.assertGreaterEqual(int(h["retry-after"]), 1)
            self.assertLessEqual(int(h["retry-after"]), 12)
            e = json.loads(body)
            self.assertEqual(e["error"], "rate_limited")
            self.assertIn("request_id", e)
            st, _, _ = http("POST", base + "/api/v1/auth/login", {"username": "x", "password": "y"})
            self.assertEqual(st, 429)
            for _ in range(20):
                self.assertEqual(http("GET", base + "/health")[0], 200)
                self.assertIn(http("GET", base + "/api/v1/health")[0], (200, 503))
                self.assertEqual(http("GET", base + "/metrics")[0], 200)
            # One token comes back every 60/5 = 12 s; the bucket is per client, so wait for it.
            time.sleep(int(h["retry-after"]) + 0.2)
            self.assertEqual(http("GET", base + "/api/v1/chain-events")[0], 401)
            self.assertIn('status="429"', http("GET", base + "/metrics")[2].decode())


class OpenApi(unittest.TestCase):
    SPEC = os.path.join(ROOT, "docs", "openapi.yaml")

    def test_lint_with_redocly(self):
        r = subprocess.run([os.path.join(HERE, "node_modules", ".bin", "redocly"), "lint", self.SPEC,
                            "--format=stylish"], cwd=HERE, capture_output=True, text=True, timeout=180)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_every_route_documented(self):
        """Every route the gateway's sources register is in the document
        (bundled to JSON by redocly, so no YAML module is needed)."""
        import glob
        import re
        r = subprocess.run([os.path.join(HERE, "node_modules", ".bin", "redocly"), "bundle", self.SPEC,
                            "--ext", "json"], cwd=HERE, capture_output=True, text=True, timeout=180)
        self.assertEqual(r.returncode, 0, r.stderr)
        doc = json.loads(r.stdout)
        self.assertTrue(doc["openapi"].startswith("3.1"))
        registered = {("/metrics", "get")}
        for src in glob.glob(os.path.join(ROOT, "api-gateway", "*.c")):
            with open(src) as f:
                for method, path in re.findall(r'httpd_route\(gw->http, "([A-Z]+)", "([^"]+)"', f.read()):
                    registered.add((path, method.lower()))
        self.assertGreaterEqual(len(registered), 17)
        for path, method in sorted(registered):
            self.assertIn(path, doc["paths"], "route %s %s is not documented" % (method, path))
            self.assertIn(method, doc["paths"][path], "route %s %s is not documented" % (method, path))


if __name__ == "__main__":
    unittest.main()
