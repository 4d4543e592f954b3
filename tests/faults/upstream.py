"""The proxied upstream of `make faults`: a process of its own, so that a
kill -9 takes its connections with it, as a real upstream's death does.

    python3 upstream.py PORT LOGFILE

POST /item/ID answers 200 {"id": ID} after appending ID to LOGFILE (flushed
before the answer, so it survives the kill); GET /health answers 200.
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, status, body):
        out = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        self.answer(200, {"status": "ok"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.path.startswith("/item/"):
            return self.answer(404, {"error": "not_found"})
        ident = self.path[len("/item/"):]
        with LOCK:
            LOG.write(ident + "\n")
            LOG.flush()
        self.answer(200, {"id": ident})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    LOG = open(sys.argv[2], "a")
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
