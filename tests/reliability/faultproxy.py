"""A fault-injecting HTTP reverse proxy for tests: clients talk to it on 127.0.0.1, it forwards to a real server.

It fails a share of requests with 500 or 503 (an S3-style XML error, never forwarded), drops a share of connections
without an answer (half before forwarding, so the request is lost, half after, so only the answer is lost) and delays
others. Decisions come from a seeded RNG and stop after ``max_faults``, so a run is bounded. Two scripted faults sit
on top of the random ones:

- ``burst(pattern, times)``: the next ``times`` requests whose "METHOD /path" matches ``pattern`` get a 503, enough
  to exhaust a client's own retries and reach the next layer (a task retry);
- ``outage(after=pattern)``: once a request matching ``pattern`` has been answered, every later request gets a 503
  (``after=None``: from now on), until ``restore()``.

Point S3 clients at it with ``AWS_ENDPOINT_URL=proxy.url``; the server behind it is untouched.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

__all__ = ["FaultPlan", "FaultProxy"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "expect"}
_S3_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected by the test '
             'fault proxy</Message><RequestId>fault-{n}</RequestId></Error>')
_CODES = {500: "InternalError", 503: "ServiceUnavailable"}


@dataclass(frozen=True)
class FaultPlan:
    """Shares of requests that fail, drop or wait; the rest pass untouched."""

    error_rate: float = 0.0  # answered 500 or 503 without reaching the server
    drop_rate: float = 0.0  # connection closed with no answer
    delay_rate: float = 0.0  # forwarded after a pause of up to max_delay_s
    max_delay_s: float = 0.3
    max_faults: int = 1000  # random faults stop after this many: a run always ends
    seed: int = 0


class FaultProxy:
    """``with FaultProxy(upstream, plan) as proxy:`` ... ``proxy.counts`` says what happened."""

    def __init__(self, upstream: str, plan: FaultPlan = FaultPlan()):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.plan = plan
        self.counts: Counter[str] = Counter()
        self.faulted: list[str] = []  # "action METHOD /path" of every injected fault, in order
        self.log: list[str] = []  # "METHOD /path" of every request, in order of arrival
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._bursts: list[list] = []  # [compiled pattern, remaining]
        self._outage_after: re.Pattern | None = None
        self._down = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- scripted faults

    def burst(self, pattern: str, times: int) -> None:
        with self._lock:
            self._bursts.append([re.compile(pattern), times])

    def outage(self, after: str | None = None) -> None:
        with self._lock:
            if after is None:
                self._down = True
            else:
                self._outage_after = re.compile(after)

    def restore(self) -> None:
        with self._lock:
            self._down, self._outage_after = False, None

    @property
    def faults(self) -> int:
        return len(self.faulted)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- decisions

    def decide(self, request: str) -> tuple[str, float]:
        """("pass" | "error500" | "error503" | "drop_before" | "drop_after", delay in seconds) for one request."""
        with self._lock:
            self.counts["requests"] += 1
            self.log.append(request)
            if self._down:
                return self._fault("outage503", request), 0.0
            for burst in self._bursts:
                if burst[1] > 0 and burst[0].search(request):
                    burst[1] -= 1
                    return self._fault("burst503", request), 0.0
            plan, roll = self.plan, self._rng.random()
            if len(self.faulted) - self.counts["scripted"] >= plan.max_faults:
                return "pass", 0.0
            if roll < plan.error_rate:
                return self._fault(self._rng.choice(("error500", "error503")), request), 0.0
            roll -= plan.error_rate
            if roll < plan.drop_rate:
                return self._fault(self._rng.choice(("drop_before", "drop_after")), request), 0.0
            roll -= plan.drop_rate
            if roll < plan.delay_rate:
                self.counts["delayed"] += 1
                return "pass", self._rng.uniform(0.0, plan.max_delay_s)
            return "pass", 0.0

    def _fault(self, action: str, request: str) -> str:
        self.counts[action] += 1
        if action.startswith(("burst", "outage")):
            self.counts["scripted"] += 1
        self.faulted.append(f"{action} {request}")
        return "error503" if action.endswith("503") else action

    def answered(self, request: str) -> None:
        with self._lock:
            self.counts["forwarded"] += 1
            if self._outage_after is not None and self._outage_after.search(request):
                self._down, self._outage_after = True, None


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # quiet: the counts say what happened
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                return response.status, response.reason, response.getheaders(), response.read()
            finally:
                conn.close()

        def _send(self, status: int, reason: str, headers, payload: bytes) -> None:
            self.send_response(status, reason)
            for key, value in headers:
                if key.lower() not in _HOP_BY_HOP and not (key.lower() == "content-length" and self.command != "HEAD"):
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _handle(self) -> None:
            body = self._body()
            request = f"{self.command} {self.path.split('?')[0]}"
            action, delay = proxy.decide(request)
            if action.startswith("error"):
                status = int(action[-3:])
                payload = _S3_ERROR.format(code=_CODES[status], n=proxy.faults).encode()
                return self._send(status, _CODES[status], [("Content-Type", "application/xml")], payload)
            if action == "drop_before":
                return self._drop()
            time.sleep(delay)
            status, reason, headers, payload = self._forward(body)
            proxy.answered(request)
            if action == "drop_after":
                return self._drop()
            self._send(status, reason, headers, payload)

        def _drop(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
