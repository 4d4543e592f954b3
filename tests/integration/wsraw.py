"""A raw-socket WebSocket client for the tests that need a peer no stock
client would be: one that stops reading, or never answers a ping."""

import base64
import json
import os
import socket


class Sock(socket.socket):
    """A socket that can carry `pending`: the bytes that came after the
    handshake answer (a server's first frames)."""


def connect(port, path):
    """A socket that completed the upgrade of GET `path`."""
    return connect_headers(port, path)


def send_text(s, text):
    """One masked text frame (clients must mask)."""
    payload = text.encode()
    mask = os.urandom(4)
    if len(payload) < 126:
        hdr = bytes([0x81, 0x80 | len(payload)])
    else:
        hdr = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def connect_headers(port, path, headers=None):
    """Like connect(), with extra request headers (a dict)."""
    s = Sock(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join("%s: %s\r\n" % kv for kv in (headers or {}).items())
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (path, key, extra)).encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise AssertionError("closed during the handshake: %r" % data)
        data += chunk
    if not data.startswith(b"HTTP/1.1 101"):
        raise AssertionError("upgrade refused: %r" % data)
    s.pending = data.partition(b"\r\n\r\n")[2]
    return s


def frame_header(opcode, length, fin=True):
    """A masked client frame header announcing `length` payload bytes, and
    its mask (the payload must be masked with it, see mask())."""
    b0 = (0x80 if fin else 0) | opcode
    if length < 126:
        hdr = bytes([b0, 0x80 | length])
    elif length < 65536:
        hdr = bytes([b0, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        hdr = bytes([b0, 0x80 | 127]) + length.to_bytes(8, "big")
    m = os.urandom(4)
    return hdr + m, m


def mask(payload, m, offset=0):
    """`payload` masked with `m`, starting `offset` bytes into the frame."""
    if not payload:
        return b""
    k = m[offset % 4:] + m[:offset % 4]
    key = (k * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


def send_frame(s, opcode, payload, fin=True):
    hdr, m = frame_header(opcode, len(payload), fin)
    s.sendall(hdr + mask(payload, m))


def next_frame(data):
    """The first server frame (unmasked) in `data`: (opcode, payload, rest),
    or None while it is incomplete."""
    if len(data) < 2:
        return None
    op, n, i = data[0] & 0x0F, data[1] & 0x7F, 2
    if n == 126:
        if len(data) < 4:
            return None
        n, i = int.from_bytes(data[2:4], "big"), 4
    elif n == 127:
        if len(data) < 10:
            return None
        n, i = int.from_bytes(data[2:10], "big"), 10
    if len(data) < i + n:
        return None
    return op, data[i:i + n], data[i + n:]


def parse_frames(data):
    """Server frames (unmasked) in `data`: ([(opcode, payload)], rest)."""
    out = []
    while (f := next_frame(data)) is not None:
        out.append(f[:2])
        data = f[2]
    return out, data


def close_code(frames):
    """The status code of the first close frame in `frames`, or None."""
    for op, payload in frames:
        if op == 8:
            return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
    return None


def wait_text(s, pred, timeout=5):
    """Reads server frames until a text frame whose JSON satisfies `pred`
    (True) or the server closes (False)."""
    s.settimeout(timeout)
    data = getattr(s, "pending", b"")
    while True:
        frames, _ = parse_frames(data)
        if any(op == 1 and pred(json.loads(p)) for op, p in frames):
            return True
        chunk = s.recv(65536)
        if not chunk:
            return False
        data += chunk
