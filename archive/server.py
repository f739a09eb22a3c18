"""Start a TorchServe of our own, wait until its model is READY, stop it without leftovers.

    python -m archive.server start [--model-store model-store] [--state logs] [--set KEY=VALUE]
    python -m archive.server stop  [--state logs]
    python -m archive.server logs  [--state logs] [--lines 40]

Used by `make serve / stop / logs` and by tests/test_serving.py, so the tests exercise the
same code path. Everything of one server lives in its state folder (logs/ for make serve):
the rendered config.properties, TorchServe's logs, server.json (pid, addresses) and tmp/.
tmp/ is TorchServe's private TMPDIR: it holds the launcher's pid file, the extracted .mar
and the worker sockets, which would otherwise be /tmp/.model_server.pid and
/tmp/.ts.sock.9000 and clash with any other TorchServe on the machine.

Stopping signals only processes recorded as this server's: the Java frontend whose pid is in
server.json (checked against its command line) and the workers whose socket is in tmp/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "archive" / "config.properties"
LOG_CONFIG = REPO / "archive" / "log4j2.xml"
STATE = REPO / "logs"
MODEL = "ncf"
# config.properties keys holding paths; relative ones are taken from the repository root.
PATH_KEYS = ("metrics_config", "model_store")
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")
GRPC_APIS = ("grpc_inference", "grpc_management")
EXAMPLE_REQUEST = {"user_id": 1, "k": 3}
LOG_FILES = ("ts_log.log", "model_log.log", "access_log.log", "torchserve.out")


class ServerError(RuntimeError):
    pass


@dataclass
class Server:
    state: str
    pid: int  # the Java frontend
    config: str
    inference: str  # base URLs a client on this machine can use
    management: str
    metrics: str

    @staticmethod
    def file(state: Path) -> Path:
        return state / "server.json"

    def save(self):
        Server.file(Path(self.state)).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def curl(self, body: Mapping = EXAMPLE_REQUEST) -> str:
        return (
            f"curl -s -X POST {self.inference}/predictions/{MODEL} "
            f"-H 'Content-Type: application/json' -d '{json.dumps(body)}'"
        )


# ---------------------------------------------------------------------- configuration


def _property(line: str) -> tuple[str, str] | None:
    """(key, value) of a `key=value` line of a properties file; None for comments and blanks."""
    if "=" not in line or line.lstrip().startswith(("#", "!")):
        return None
    key, value = line.split("=", 1)
    return key.strip(), value.strip()


def render_config(base: Path, out: Path, overrides: Mapping[str, str]) -> dict[str, str]:
    """Write `base` to `out` with `overrides` applied and relative paths made absolute (from
    the repository root); return the settings. Comments and order are kept."""
    pending = {key: str(value) for key, value in overrides.items()}
    props, lines = {}, []

    def setting(key: str, value: str) -> str:
        if key in PATH_KEYS and not Path(value).is_absolute():
            value = str(REPO / value)
        props[key] = value
        return f"{key}={value}"

    for line in base.read_text().splitlines():
        found = _property(line)
        if found is not None:
            key, value = found
            line = setting(key, pending.pop(key, value))  # an override replaces it in place
        lines.append(line)
    lines += [setting(key, value) for key, value in pending.items()]
    out.write_text("\n".join(lines) + "\n")
    return props


def client_url(address: str) -> str:
    """The URL to reach a bind address from this machine (0.0.0.0 -> 127.0.0.1)."""
    parts = urlsplit(address)
    host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "::", None) else parts.hostname
    return f"{parts.scheme}://{host}:{parts.port}"


def listen_addresses(props: Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """The (host, port) each API of the configuration listens on, by setting to change."""
    found = {}
    for key in ADDRESS_KEYS:
        parts = urlsplit(props[key])
        found[key] = (parts.hostname, parts.port)
    for api in GRPC_APIS:
        found[f"{api}_port"] = (props[f"{api}_address"], int(props[f"{api}_port"]))
    return found


def loopback_config(inference, management, metrics, grpc_inference, grpc_management):
    """config.properties settings putting each TorchServe listener on its loopback port
    (gRPC too: TorchServe opens 7070/7071 unless told otherwise)."""
    return {
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "grpc_inference_port": str(grpc_inference),
        "grpc_management_port": str(grpc_management),
    }


def check_ports_free(props: Mapping[str, str]):
    for key, (host, port) in listen_addresses(props).items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                raise ServerError(
                    f"{key}: port {port} on {host} is in use (another TorchServe?); choose "
                    f'another with --set {key}=... (make serve SERVE_ARGS="--set {key}=...")'
                ) from None


# ---------------------------------------------------------------------- processes


def _running(process: psutil.Process) -> bool:
    # A zombie has exited; whoever inherited it (init, for the detached frontend) reaps it.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _pid_running(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.Error:
        return False


def our_processes(state: Path) -> list[psutil.Process]:
    """The live processes of the server in `state`: the Java frontend (its java.io.tmpdir is
    state/tmp) and the Python workers (their socket is in state/tmp)."""
    tmp = str(state.resolve() / "tmp")
    frontend, socket_prefix = f"-Djava.io.tmpdir={tmp}", f"{tmp}/.ts.sock."

    def ours(arg: str) -> bool:
        return arg == frontend or arg.startswith(socket_prefix)

    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(ours(arg) for arg in process.info["cmdline"] or []) and _running(process):
            found.append(process)
    return found


def _is_frontend(process: psutil.Process) -> bool:
    try:
        return "org.pytorch.serve.ModelServer" in process.cmdline()
    except psutil.Error:
        return False


def _signal(process: psutil.Process, send):
    try:
        send(process)
    except psutil.NoSuchProcess:
        pass


def _wait_gone(processes, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


# ---------------------------------------------------------------------- HTTP


def http(method: str, url: str, body: Mapping | None = None, timeout: float = 10):
    """(status, decoded JSON or text) of one request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def readiness_problem(management: str, model: str) -> str | None:
    """None when every worker of `model` is READY, else a sentence for the user."""
    try:
        status, described = http("GET", f"{management}/models/{model}", timeout=5)
    except OSError as error:
        return (
            f"cannot reach TorchServe's management API at {management} ({error}); "
            "is it running (`make serve`), and is that its address?"
        )
    if status == 404:
        return f"TorchServe at {management} does not serve a model named {model!r}"
    if status != 200 or not isinstance(described, list) or not described:
        return f"{management}/models/{model} answered {status}: {described}"
    workers = described[0].get("workers") or []
    if not workers:
        return f"model {model!r} has no workers"
    waiting = [f"{w.get('id')}={w.get('status')}" for w in workers if w.get("status") != "READY"]
    if waiting:
        return f"model {model!r} has workers that are not READY: {', '.join(waiting)}"
    return None


def model_ready(server: Server) -> bool:
    """True once every worker of the model is READY (/ping is healthy before that)."""
    return readiness_problem(server.management, MODEL) is None


# ---------------------------------------------------------------------- start / stop


def launch(args: list[str], cwd: Path, tmp: Path, logs: Path, output: Path | None = None) -> int:
    """`torchserve --start --ncs ARGS`; return the Java frontend's pid.

    The launcher starts Java and returns. Java gets a new session, so it is out of the
    caller's terminal (no SIGINT/SIGHUP) and its process group is Java's and the workers'.
    `tmp` is private to this server (the launcher's pid file, the extracted .mar, worker
    sockets), `logs` gets its logs and metrics, `output` (else inherited) the launcher's."""
    launcher = shutil.which("torchserve", path=str(Path(sys.executable).parent))
    launcher = launcher or shutil.which("torchserve")
    if launcher is None:
        raise ServerError(f"torchserve not found beside {sys.executable} or on PATH")
    # TS_CONFIG_FILE would beat --ts-config. PYTHONPATH goes before the model's own folder
    # on the workers' path, where it could shadow the handler code packed in the .mar.
    env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE", "PYTHONPATH")}
    env |= {"TMPDIR": str(tmp), "TEMP": str(tmp)}
    env |= {"LOG_LOCATION": str(logs), "METRICS_LOCATION": str(logs)}
    with open(output, "ab") if output else contextlib.nullcontext() as out:
        launched = subprocess.run(
            [launcher, "--start", "--ncs", *args], cwd=cwd, env=env,
            stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True, check=False,
        )  # fmt: skip
    pid_file = tmp / ".model_server.pid"
    if launched.returncode != 0 or not pid_file.is_file():
        see = f"; see {output}" if output else ""
        raise ServerError(f"torchserve --start failed (exit status {launched.returncode}){see}")
    return int(pid_file.read_text())


def start(
    model_store: Path,
    state: Path = STATE,
    overrides: Mapping[str, str] | None = None,
    timeout: float = 180,
) -> Server:
    """Start TorchServe serving model_store/ncf.mar as `ncf`; return once its worker is READY."""
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    running = our_processes(state)
    if running:
        raise ServerError(
            f"a TorchServe is already running from {state} (pid "
            f"{', '.join(str(p.pid) for p in running)}); stop it first"
        )
    tmp = state / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # extracted .mar files of earlier runs
    tmp.mkdir()
    config = state / "config.properties"
    props = render_config(
        CONFIG, config, {"model_store": str(model_store.resolve()), **(overrides or {})}
    )
    check_ports_free(props)
    pid = launch(
        ["--ts-config", str(config), "--log-config", str(LOG_CONFIG),
         "--model-store", props["model_store"], "--models", f"{MODEL}={MODEL}.mar"],
        cwd=state, tmp=tmp, logs=state, output=state / "torchserve.out",
    )  # fmt: skip
    server = Server(
        state=str(state),
        pid=pid,
        config=str(config),
        inference=client_url(props["inference_address"]),
        management=client_url(props["management_address"]),
        metrics=client_url(props["metrics_address"]),
    )
    server.save()
    deadline = time.monotonic() + timeout
    try:
        while not model_ready(server):
            if not _pid_running(pid):
                raise ServerError(f"TorchServe exited during start-up; see {state}/ts_log.log")
            if time.monotonic() > deadline:
                raise ServerError(f"no READY worker after {timeout:.0f} s; see {state}")
            time.sleep(0.25)
    except BaseException:
        stop(state)
        raise
    return server


def stop(state: Path = STATE, timeout: float = 60) -> list[int]:
    """Stop the server of `state`, wait until none of its processes is left, return their
    pids. Java gets SIGTERM (its shutdown stops the workers); whatever outlives the
    timeout gets SIGKILL."""
    state = state.resolve()
    stopped = []
    # A second look catches a worker the frontend started while it was being stopped.
    for _ in range(2):
        processes = our_processes(state)
        frontend = [p for p in processes if _is_frontend(p)]
        for process in frontend or processes:  # workers without their frontend: signal them
            _signal(process, psutil.Process.terminate)
        alive = _wait_gone(processes, timeout)
        for process in alive:
            _signal(process, psutil.Process.kill)
        _wait_gone(alive, 10)
        stopped += [p.pid for p in processes]
    left = our_processes(state)
    if left:
        raise ServerError(f"still running after stop: pid {', '.join(str(p.pid) for p in left)}")
    Server.file(state).unlink(missing_ok=True)
    shutil.rmtree(state / "tmp", ignore_errors=True)
    return stopped


def show_logs(state: Path = STATE, lines: int = 40):
    for name in LOG_FILES:
        path = state / name
        if path.is_file():
            print(f"==> {path} <==")
            print("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))


def _override_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not (sep and key.strip()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key.strip(), value.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("command", choices=("start", "stop", "logs"))
    p.add_argument("--state", type=Path, default=STATE, help="state folder (default logs/)")
    p.add_argument("--model-store", type=Path, default=REPO / "model-store")
    p.add_argument(
        "--set", action="append", default=[], type=_override_arg, metavar="KEY=VALUE",
        help="override a config.properties setting, e.g. inference_address=http://0.0.0.0:9080",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY")
    p.add_argument("--lines", type=int, default=40, help="logs: lines per file")
    args = p.parse_args(argv)
    try:
        if args.command == "start":
            overrides = dict(args.set)
            if not (args.model_store / f"{MODEL}.mar").is_file():
                raise ServerError(f"no {args.model_store}/{MODEL}.mar; run `make archive`")
            server = start(args.model_store, args.state, overrides, timeout=args.timeout)
            status, answer = http(
                "POST", f"{server.inference}/predictions/{MODEL}", EXAMPLE_REQUEST
            )
            print(
                f"TorchServe is up (pid {server.pid}), model {MODEL} READY; logs in {server.state}"
            )
            print(f"  {server.curl()}")
            print(f"  -> {status} {json.dumps(answer)}")
            print(f"  management {server.management}, metrics {server.metrics}/metrics")
        elif args.command == "stop":
            pids = stop(args.state)
            print(f"stopped pid {', '.join(map(str, pids))}" if pids else "not running")
        else:
            show_logs(args.state, args.lines)
    except ServerError as error:
        print(f"archive.server: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
