"""A raw-socket WebSocket client for the tests that need a peer no stock
client would be: one that stops reading, or never answers a ping."""

import base64
import os
import socket


def connect(port, path):
    """A socket that completed the upgrade of GET `path`."""
    s = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, key)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise AssertionError("closed during the handshake: %r" % data)
        data += chunk
    if not data.startswith(b"HTTP/1.1 101"):
        raise AssertionError("upgrade refused: %r" % data)
    return s


def send_text(s, text):
    """One masked text frame (clients must mask)."""
    payload = text.encode()
    mask = os.urandom(4)
    if len(payload) < 126:
        hdr = bytes([0x81, 0x80 | len(payload)])
    else:
        hdr = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
