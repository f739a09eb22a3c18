"""The container's public HTTP port: /ping from the model's real state, the rest to TorchServe.

TorchServe's own /ping answers 200 as soon as a worker process exists, while the worker is
still loading the model, and goes on answering 200 for the first minutes of a worker
crash-looping (verified on 0.12: /ping said Healthy while the management API listed the
only worker as not READY). SageMaker routes traffic to an instance once /ping is 200, so
the container publishes this small gate instead: TorchServe's inference API listens on
loopback only, and every request except /ping is passed on to it unchanged.

/ping is 200 once every worker asked for is READY (so the first traffic meets full
capacity), and afterwards while at least one worker is READY; otherwise 503 with the
reason. The state comes from TorchServe's management API, polled in the background, so a
/ping never waits on TorchServe (SageMaker allows it 2 s).
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Connection-level headers are not forwarded (RFC 9110 section 7.6.1); Host and
# Content-Length are set anew for the hop they are sent on.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
POLL_SECONDS = 0.5


def log(message: str) -> None:
    print(f"entrypoint: {message}", file=sys.stderr, flush=True)


class Readiness:
    """Whether `model` can serve, from GET /models/<model> on the management API."""

    def __init__(self, management_port: int, model: str, workers: int):
        self.management_port = management_port
        self.model = model
        self.workers = workers
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._healthy = False
        self._reason = "TorchServe is starting"
        self._was_ready = False  # every worker has been READY at least once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join()

    def state(self) -> tuple[bool, str]:
        with self._lock:
            return self._healthy, self._reason

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(POLL_SECONDS)

    def ready_workers(self) -> int | None:
        """READY workers of the model, or None while the management API cannot say."""
        connection = http.client.HTTPConnection("127.0.0.1", self.management_port, timeout=2)
        try:
            connection.request("GET", f"/models/{self.model}")
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()
        if response.status != 200:
            return None
        described = json.loads(body)
        workers = (described[0].get("workers") or []) if described else []
        return sum(worker.get("status") == "READY" for worker in workers)

    def refresh(self) -> None:
        ready = self.ready_workers()
        if ready is None:
            healthy, reason = False, "TorchServe's management API does not answer"
        elif not self._was_ready:
            healthy = ready >= self.workers
            reason = f"loading the model: {ready} of {self.workers} workers READY"
        else:
            healthy, reason = ready > 0, "no worker is READY"
        with self._lock:
            changed = healthy != self._healthy
            self._healthy, self._reason = healthy, "" if healthy else reason
        if healthy and not self._was_ready:
            self._was_ready = True
            seconds = time.monotonic() - self.started
            log(f"model {self.model} READY ({ready} workers) after {seconds:.1f} s; /ping is 200")
        elif changed:
            log(f"/ping is {'200' if healthy else '503'}" + ("" if healthy else f": {reason}"))


class Upstream:
    """Keep-alive connections to TorchServe's inference API, one per handler thread."""

    def __init__(self, port: int, timeout: float):
        self.port = port
        self.timeout = timeout
        self._local = threading.local()

    def forward(self, method: str, path: str, body: bytes, headers: dict[str, str]):
        """(status, reason, headers, body) of TorchServe's answer."""
        reused = getattr(self._local, "connection", None) is not None
        try:
            return self._exchange(method, path, body, headers)
        except (ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            # TorchServe may have closed an idle keep-alive connection: once more on a fresh
            # one (scoring has no side effects, so a repeat is harmless).
            return self._exchange(method, path, body, headers)

    def _exchange(self, method: str, path: str, body: bytes, headers: dict[str, str]):
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self._local.connection = connection
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except BaseException:
            connection.close()
            self._local.connection = None
            raise
        if response.will_close:
            connection.close()
            self._local.connection = None
        return response.status, response.reason, response.getheaders(), data


class GateServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not hold up the container's exit
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, port: int, readiness: Readiness, upstream: Upstream, max_body: int):
        self.readiness = readiness
        self.upstream = upstream
        self.max_body = max_body
        super().__init__(("0.0.0.0", port), GateHandler)


class GateHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as SageMaker's front end uses it
    # Headers and body go out in two writes: with Nagle's algorithm the body would wait
    # for the client's delayed ACK of the headers (+40 ms per request, measured).
    disable_nagle_algorithm = True
    server_version = "ncf-recommender"
    sys_version = ""
    server: GateServer

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/ping":
            healthy, reason = self.server.readiness.state()
            if healthy:
                self.reply(200, {"status": "Healthy"})
            else:
                self.reply(503, {"status": "Unhealthy", "reason": reason})
        else:
            self.forward()

    def do_POST(self):
        self.forward()

    def do_OPTIONS(self):  # TorchServe answers OPTIONS / with its API description
        self.forward()

    def forward(self):
        body = self.read_body()
        if body is None:
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            status, reason, answer_headers, data = self.server.upstream.forward(
                self.command, self.path, body, headers
            )
        except TimeoutError:
            self.reply(504, {"code": 504, "message": "TorchServe did not answer in time"})
            return
        except (OSError, http.client.HTTPException) as error:
            self.reply(502, {"code": 502, "message": f"TorchServe unreachable: {error}"})
            return
        self.send_response(status, reason)
        for key, value in answer_headers:
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self) -> bytes | None:
        """The request body, or None once an error has been answered."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.reply(400, {"code": 400, "message": "bad Content-Length"}, close=True)
            return None
        if length > self.server.max_body:
            self.reply(413, {"code": 413, "message": "request too large"}, close=True)
            return None
        return self.rfile.read(length)

    def read_chunked(self) -> bytes | None:
        body = bytearray()
        while True:
            try:
                size = int(self.rfile.readline().split(b";", 1)[0], 16)
            except ValueError:
                self.reply(400, {"code": 400, "message": "bad chunked body"}, close=True)
                return None
            if size == 0:
                break
            if len(body) + size > self.server.max_body:
                self.reply(413, {"code": 413, "message": "request too large"}, close=True)
                return None
            body += self.rfile.read(size)
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, unused
            pass
        return bytes(body)

    def reply(self, status: int, payload: dict, close: bool = False):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:  # the rest of the request was not read: the connection cannot be reused
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        # Requests are in TorchServe's access log already; /ping every few seconds would
        # drown everything else. Errors still reach log_error -> stderr.
        pass

    def log_error(self, format, *args):
        log(f"{self.address_string()}: {format % args}")
