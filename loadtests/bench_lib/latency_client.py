"""Sequential requests over one keep-alive connection; prints latencies as JSON.

``python -m bench_lib.latency_client --host H --port P --n 3000 --warmup 300``

A raw blocking socket and a minimal HTTP/1.1 response reader, so the client's
own cost per request is a few tens of microseconds and the same for every
target; the benchmark reports differences between targets, which cancel it.
The garbage collector is off during the loop so no collection lands inside a
sample. Standard library only.

With ``--sse`` the request is a streamed one and a sample is the time to
first token: from sending the request to the read that brought the first
``data:`` of the SSE body (the rest of the response is then read as usual).

Output (one JSON object on stdout): ``samples_us`` (every measured request, in
order), ``errors`` (responses other than 200, or with ``--sse`` without an
SSE event), ``reconnects`` (the server closed the keep-alive connection).
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import sys
import time

RECV = 65536
SSE_MARK = b"data:"


class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.sock = self._connect()
        self.buf = bytearray()
        #: ``perf_counter_ns`` when the last read returned.
        self.t_recv = 0

    def _connect(self) -> socket.socket:
        s = socket.create_connection(self.addr, timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = self._connect()
        self.buf.clear()

    def _fill(self) -> None:
        data = self.sock.recv(RECV)
        self.t_recv = time.perf_counter_ns()
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def _take_line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    def _take(self, n: int) -> None:
        while len(self.buf) < n:
            self._fill()
        del self.buf[:n]

    def exchange(self, request: bytes, first_mark: bytes | None = None) -> tuple[int, bool, int]:
        """Send one request, read its whole response; (status, keep-alive, t_first).

        ``t_first`` is when the read that brought ``first_mark`` (in the body)
        returned, 0 if it never came or no mark was asked for.
        """
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self.buf[:end]).lower()
        del self.buf[: end + 4]
        status = int(head[9:12])
        keep = b"\r\nconnection: close" not in head
        t_first = 0
        chunked = b"\r\ntransfer-encoding: chunked" in head
        if first_mark is not None and status == 200 and chunked:
            # Chunk framing never splits the mark here: every event is written whole.
            while first_mark not in self.buf:
                if self.buf.startswith(b"0\r\n\r\n") or b"\r\n0\r\n\r\n" in self.buf:
                    break  # the body ended without an event
                self._fill()
            else:
                t_first = self.t_recv
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            self._take(int(head[i + 17 : j if j >= 0 else len(head)]))
        elif chunked:
            while True:
                size = int(self._take_line().split(b";", 1)[0], 16)
                self._take(size + 2)  # data and its CRLF (or the final empty line)
                if size == 0:
                    break
        return status, keep, t_first


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--body", required=True)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--sse", action="store_true", help="time to the first SSE event")
    ns = p.parse_args()
    mark = SSE_MARK if ns.sse else None
    request = build_request(ns.host, ns.port, ns.path, ns.body.encode())
    conn = Conn(ns.host, ns.port)
    samples: list[float] = []
    errors = 0
    reconnects = 0
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    for i in range(ns.warmup + ns.n):
        t0 = clock()
        status, keep, t_first = conn.exchange(request, mark)
        t1 = t_first if mark is not None else clock()
        if i >= ns.warmup:
            samples.append((t1 - t0) / 1000.0)
            if status != 200 or (mark is not None and not t_first):
                errors += 1
        if not keep:
            reconnects += 1
            conn.reconnect()
    gc.enable()
    conn.sock.close()
    json.dump({"samples_us": samples, "errors": errors, "reconnects": reconnects}, sys.stdout)


if __name__ == "__main__":
    main()
