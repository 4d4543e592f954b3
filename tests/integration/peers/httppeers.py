"""Local HTTP peers for the action-workers tests.

Recorder servers that stand in for the Telegram Bot API and for webhook
receivers. Each records every request (method, path, headers, body, time)
and answers from a per-path script of canned responses, then a default.
They speak HTTP/1.1 keep-alive, like the real services, over plain TCP or
TLS (start(port, tls=ssl_context): see tlspki.py).

    tg = Peer("telegram").start(18301)
    tg.script("/botTOKEN/sendMessage", [Resp(429, {...})])
    ...
    tg.requests()  # list of dicts
"""
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Resp:
    def __init__(self, status=200, body=None, delay=0.0, headers=None):
        self.status = status
        self.body = body
        self.delay = delay
        self.headers = headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls = None          # an ssl.SSLContext: serve https
    handshake_failures = 0

    def handle_error(self, request, client_address):
        # A client that hangs up mid-request (a timeout test, a refused
        # certificate) is expected here; anything else is printed.
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):
            super().handle_error(request, client_address)

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the connection's own thread, so a client
        # that refuses our certificate holds up nobody else.
        if self.tls is None:
            return super().finish_request(request, client_address)
        try:
            # The wrapped socket takes over the descriptor: it is the one to
            # close (shutdown_request only sees the detached original).
            request = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.handshake_failures += 1
            request.close()
            return
        try:
            super().finish_request(request, client_address)
        finally:
            request.close()


class Peer:
    def __init__(self, kind="webhook"):
        self.kind = kind
        self.lock = threading.Lock()
        self._requests = []
        self._scripts = {}
        self.default = None
        self.httpd = None
        self.msg_id = 0

    # -- control -------------------------------------------------------
    def start(self, port, tls=None):
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n).decode("utf-8", "replace") if n else ""
                rec = {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                    "t": time.time(),
                }
                resp = peer._next(self.path, rec)
                if resp.delay:
                    time.sleep(resp.delay)
                with peer.lock:
                    peer._requests.append(rec)
                data = resp.body
                if not isinstance(data, (bytes, str)):
                    data = json.dumps(data)
                if isinstance(data, str):
                    data = data.encode()
                try:
                    self.send_response(resp.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in resp.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.httpd.tls = tls
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    @property
    def scheme(self):
        return "https" if self.httpd.tls is not None else "http"

    @property
    def handshake_failures(self):
        """TLS handshakes that failed on our side (a client refusing the
        chain breaks off there; a host name mismatch is found by the client
        only after the handshake)."""
        return self.httpd.handshake_failures

    def base(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.httpd.server_address[1])

    def script(self, path, responses):
        with self.lock:
            self._scripts[path] = list(responses)

    def requests(self, path=None):
        with self.lock:
            return [r for r in self._requests if path is None or r["path"] == path]

    def clear(self):
        with self.lock:
            self._requests = []
            self._scripts = {}
            self.default = None

    def wait(self, count, timeout=20.0, path=None):
        """Waits until at least `count` requests were recorded; returns them."""
        end = time.time() + timeout
        while time.time() < end:
            got = self.requests(path)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        return self.requests(path)

    # -- answers -------------------------------------------------------
    def _next(self, path, rec):
        with self.lock:
            script = self._scripts.get(path)
            if script:
                return script.pop(0)
            if self.default:
                return self.default
            if self.kind == "telegram":
                self.msg_id += 1
                try:
                    req = json.loads(rec["body"] or "{}")
                except ValueError:
                    return Resp(400, {"ok": False, "error_code": 400, "description": "Bad Request: bad JSON"})
                return Resp(200, {"ok": True, "result": {"message_id": self.msg_id,
                                                         "chat": {"id": req.get("chat_id")},
                                                         "date": int(time.time()), "text": req.get("text")}})
            return Resp(200, {"ok": True})


def telegram_429(retry_after):
    return Resp(429, {"ok": False, "error_code": 429,
                      "description": "Too Many Requests: retry after %d" % retry_after,
                      "parameters": {"retry_after": retry_after}})


def _main():
    """Runs a Telegram-compatible server and a webhook receiver for trying
    the platform by hand (README, "End to end by hand"); prints every request
    they get until Ctrl-C."""
    import sys
    tg_port = int(sys.argv[1]) if len(sys.argv) > 1 else 18777
    hook_port = int(sys.argv[2]) if len(sys.argv) > 2 else 18778
    peers = [Peer("telegram").start(tg_port), Peer("webhook").start(hook_port)]
    print("telegram-compatible server: TELEGRAM_API_BASE=http://127.0.0.1:%d" % tg_port, flush=True)
    print("webhook receiver:           http://127.0.0.1:%d/<any path>" % hook_port, flush=True)
    seen = [0, 0]
    try:
        while True:
            for i, p in enumerate(peers):
                reqs = p.requests()
                for r in reqs[seen[i]:]:
                    print("%s %s %s %s" % (p.kind, r["method"], r["path"], r["body"]), flush=True)
                seen[i] = len(reqs)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    _main()
