"""Entrypoint of the NCF image: `serve`, `train`, or any other command.

    serve    SageMaker hosting: TorchServe with the model of /opt/ml/model, published on
             0.0.0.0:${SAGEMAKER_BIND_TO_PORT:-8080} (/ping, /invocations, /predictions/ncf)
    train    SageMaker training: python -m training.train (torchrun when distributed) with
             the hyperparameters of /opt/ml/input/config/hyperparameters.json
    CMD ...  anything else is exec'd as given: `docker run IMAGE bash`

NCF_OPT_ML moves the /opt/ml root (the tests point it at a temporary folder). docker/README.md
describes the environment variables and what each mode does.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import deque
from pathlib import Path
from typing import NamedTuple

import yaml
from health_gate import GateServer, Readiness, Upstream, log

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # in the image a .pth has it; on a host, docker/ is sys.path[0]
    sys.path.append(str(REPO))
from archive.server import CONFIG, ServerError, launch, loopback_config, render_config  # noqa: E402

MODEL = "ncf"
LOG_CONFIG = REPO / "archive" / "log4j2.xml"
PUBLIC_PORT = 8080
TORCHSERVE_TIMEOUT = 120  # TorchServe's response timeout when neither the .mar nor env sets one
MAX_BODY = 6_553_500  # TorchServe's default max_request_size; SageMaker's limit is 6 MB
STOP_SECONDS = 5  # SIGTERM -> SIGKILL for TorchServe: all done within docker stop's 10 s
MASTER_PORT = 29500
# TorchServe's access log line of the gate's readiness poll (GET /models/ncf).
READINESS_POLL = f'.*"GET /models/{MODEL} HTTP/1.1".*'
PR_SET_CHILD_SUBREAPER = 36


class Ports(NamedTuple):
    """TorchServe's loopback ports; the defaults apply without SAGEMAKER_SAFE_PORT_RANGE."""

    inference: int = 8083
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070  # TorchServe always starts its gRPC APIs as well
    grpc_management: int = 7071


class ConfigError(Exception):
    """A setting or input that makes the requested mode impossible: one line, exit 2."""


class Shutdown(Exception):
    """Raised in the main thread by SIGTERM/SIGINT."""


def opt_ml() -> Path:
    return Path(os.environ.get("NCF_OPT_ML", "/opt/ml"))


def gpu_count() -> int:
    """GPUs the NVIDIA runtime gave this container (0 without nvidia-smi)."""
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listing.splitlines())


def env_int(name: str, default: int | None = None, minimum: int = 1) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"{name}={text!r}: expected an integer >= {minimum}")
    return value


def project_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the project's own modules (python -m training.train ...)."""
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def become_subreaper() -> None:
    """Adopt orphaned descendants: TorchServe's launcher exits after starting Java, and Java
    must stay this process's child, to be waited for and never left behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


# ---------------------------------------------------------------------- train


def read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None


def hyperparameter_args(hyperparameters: dict) -> list[str]:
    """{"epochs": "5", "resume": "true"} -> ["--epochs", "5", "--resume"].

    SageMaker hands every value over as a string, so "true"/"false" stand for the
    training CLI's on/off flags (no training option takes those words as a value). Keys
    starting with sagemaker_ are instructions to this entrypoint, not training options.
    """
    args = []
    for key, value in hyperparameters.items():
        if key.startswith("sagemaker_"):
            continue
        value = str(value)
        if value.lower() == "true":
            args.append(f"--{key}")
        elif value.lower() != "false":
            args += [f"--{key}", value]
    return args


def cluster(root: Path) -> tuple[list[str], str, str | None]:
    """(hosts, current host, network interface) of this training job.

    SageMaker writes resourceconfig.json, with the same host list on every host (so every
    host derives the same ranks); SM_HOSTS / SM_CURRENT_HOST win where set."""
    resources = read_json(root / "input" / "config" / "resourceconfig.json", {})
    current = os.environ.get("SM_CURRENT_HOST") or resources.get("current_host")
    current = current or socket.gethostname()
    hosts = json.loads(os.environ["SM_HOSTS"]) if "SM_HOSTS" in os.environ else None
    hosts = hosts or resources.get("hosts") or [current]
    if current not in hosts:
        raise ConfigError(f"current host {current!r} is not among the hosts {hosts}")
    return hosts, current, resources.get("network_interface_name")


def training_env(root: Path, hosts: list[str], current: str, gpus: int, interface) -> dict:
    """The SM_* variables training.train reads, derived from the /opt/ml layout.

    SageMaker sets them only in its framework containers; in a BYOC container the files
    are there but the variables may not be. Values already set are kept."""
    env = {
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_HOSTS": json.dumps(hosts),
        "SM_CURRENT_HOST": current,
        "SM_NUM_GPUS": str(gpus),
    }
    channels = root / "input" / "data"
    if channels.is_dir():
        for channel in sorted(p for p in channels.iterdir() if p.is_dir()):
            env[f"SM_CHANNEL_{channel.name.upper().replace('-', '_')}"] = str(channel)
    if interface and len(hosts) > 1:  # the interface the other hosts are reachable on
        env |= {"NCCL_SOCKET_IFNAME": interface, "GLOO_SOCKET_IFNAME": interface}
    return {key: value for key, value in env.items() if key not in os.environ}


def training_command(
    args: list[str], distributed: bool, hosts: list[str], current: str, gpus: int
) -> list[str]:
    module = ["-m", "training.train", *args]
    if not distributed:
        return [sys.executable, *module]
    # torch.distributed.run is torchrun, started by the same interpreter.
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={max(gpus, 1)}"]
    if len(hosts) == 1:
        return [*run, "--standalone", *module]
    return [
        *run,
        f"--nnodes={len(hosts)}",
        f"--node_rank={hosts.index(current)}",
        f"--master_addr={hosts[0]}",
        f"--master_port={MASTER_PORT}",
        *module,
    ]


def run_reporting_failure(command: list[str], env: dict, failure: Path) -> int:
    """Run `command` (signals passed on to it); if it fails, write the end of its stderr
    to `failure`, which SageMaker shows as the job's FailureReason."""
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: child.send_signal(received))
    tail = deque(maxlen=20)

    def tee():
        for line in child.stderr:
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
            tail.append(line.decode(errors="replace"))

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    code = child.wait()
    reader.join()
    if code != 0:
        failure.parent.mkdir(parents=True, exist_ok=True)
        reason = "".join(tail).strip() or f"{command[0]} exited with status {code}"
        failure.write_text(reason[-1024:] + "\n")  # FailureReason holds 1024 characters
    return code


def train(argv: list[str]) -> int:
    if argv:
        raise ConfigError(f"train takes no arguments (got {' '.join(argv)}); use hyperparameters")
    root = opt_ml()
    hyperparameters = read_json(root / "input" / "config" / "hyperparameters.json", {})
    distributed = str(hyperparameters.get("sagemaker_distributed", "")).lower() == "true"
    hosts, current, interface = cluster(root)
    gpus = env_int("SM_NUM_GPUS", minimum=0)
    gpus = gpu_count() if gpus is None else gpus
    env = training_env(root, hosts, current, gpus, interface)
    for key in ("SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR"):
        Path(env.get(key) or os.environ[key]).mkdir(parents=True, exist_ok=True)
    command = training_command(
        hyperparameter_args(hyperparameters), distributed, hosts, current, gpus
    )
    log(f"host {current} of {len(hosts)}, {gpus} GPU(s): {' '.join(command)}")
    return run_reporting_failure(command, project_env(env), root / "output" / "failure")


# ---------------------------------------------------------------------- serve


def find_model(model_dir: Path) -> tuple[str, Path]:
    """("mar", file) or ("artifact", folder): what SageMaker extracted into /opt/ml/model.

    `make package` uploads ncf.mar (with the artifact's metadata.json beside it); a
    training job's model.tar.gz is the artifact folder itself."""
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such folder (mount the model there)")
    mars = sorted(model_dir.glob("*.mar"))
    if (model_dir / f"{MODEL}.mar").is_file():
        return "mar", model_dir / f"{MODEL}.mar"
    if len(mars) == 1:
        return "mar", mars[0]
    if mars:
        raise ConfigError(f"{model_dir}: several .mar files ({', '.join(m.name for m in mars)})")
    if (model_dir / "metadata.json").is_file():
        return "artifact", model_dir
    raise ConfigError(f"{model_dir}: neither a .mar nor an artifact (metadata.json)")


def copy_mar(source: Path, dest: Path, workers: int, timeout: int | None) -> int:
    """Copy the .mar with workers/timeout written into its model-config.yaml, and return the
    response timeout in force.

    A .mar's model-config.yaml takes precedence over config.properties in TorchServe, so
    SAGEMAKER_MODEL_SERVER_WORKERS/TIMEOUT can only take effect there."""
    with zipfile.ZipFile(source) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        config_name = manifest.get("model", {}).get("configFile")
        config = (yaml.safe_load(mar.read(config_name)) or {}) if config_name else {}
        effective = timeout or config.get("responseTimeout") or TORCHSERVE_TIMEOUT
        with zipfile.ZipFile(dest, "w") as out:
            for info in mar.infolist():
                if info.filename == config_name:
                    config |= {"minWorkers": workers, "maxWorkers": workers}
                    if timeout:
                        config["responseTimeout"] = timeout
                    out.writestr(info, yaml.safe_dump(config, sort_keys=False))
                else:
                    with mar.open(info) as member, out.open(info, "w") as copy:
                        shutil.copyfileobj(member, copy, 1 << 20)
    return effective


def console_log_config(source: Path, dest: Path) -> None:
    """archive/log4j2.xml with every logger writing to its console appender instead of files:
    SageMaker collects a container's stdout/stderr (into CloudWatch), not its files."""
    tree = ET.parse(source)
    appenders = tree.getroot().find("Appenders")
    console = appenders.find("Console")  # archive/log4j2.xml has one
    for appender in [a for a in appenders if a is not console]:
        appenders.remove(appender)
    for logger in tree.getroot().find("Loggers"):
        refs = logger.findall("AppenderRef")
        for ref in refs:
            logger.remove(ref)
        if refs:  # one reference: two to the same console would print each line twice
            ET.SubElement(logger, "AppenderRef", ref=console.get("name"))
        if logger.get("name") == "ACCESS_LOG":
            # The gate asks the management API for the model's state twice a second.
            ET.SubElement(
                logger, "RegexFilter", regex=READINESS_POLL, onMatch="DENY", onMismatch="NEUTRAL"
            )
    tree.write(dest, encoding="UTF-8", xml_declaration=True)


def loopback_ports(public: int) -> Ports:
    """TorchServe's ports, all on 127.0.0.1.

    With accept-bind-to-port, SageMaker may run other containers in the same network
    namespace and names the ports this one may use besides its own in
    SAGEMAKER_SAFE_PORT_RANGE ("low-high")."""
    spec = os.environ.get("SAGEMAKER_SAFE_PORT_RANGE", "").strip()
    if not spec:
        if public in Ports():
            raise ConfigError(f"SAGEMAKER_BIND_TO_PORT={public} is one of TorchServe's {Ports()}")
        return Ports()
    try:
        low, high = (int(part) for part in spec.split("-"))
    except ValueError:
        raise ConfigError(f"SAGEMAKER_SAFE_PORT_RANGE={spec!r}: expected LOW-HIGH") from None
    free = [port for port in range(low, high + 1) if port != public]
    if len(free) < len(Ports._fields):
        raise ConfigError(f"SAGEMAKER_SAFE_PORT_RANGE={spec!r}: {len(Ports._fields)} ports needed")
    return Ports(*free[: len(Ports._fields)])


def write_config(run: Path, store: Path, ports: Ports, workers: int, timeout: int | None) -> Path:
    """archive/config.properties (what `make serve` runs: token auth off, no model API,
    metrics) with this container's ports, model and limits. TorchServe listens on loopback
    only: the public port is the gate's."""
    overrides = {
        **loopback_config(*ports),
        "model_store": store,
        "load_models": f"{MODEL}={MODEL}.mar",
        # For a .mar without model-config.yaml; ours carry workers and timeout in it.
        "default_workers_per_model": workers,
        "max_request_size": MAX_BODY,
        "max_response_size": MAX_BODY,
    }
    if timeout:
        overrides["default_response_timeout"] = timeout
    config = run / "config.properties"
    render_config(CONFIG, config, overrides)
    return config


def start_torchserve(run: Path, config: Path, log_config: Path) -> tuple[int, int]:
    """Start TorchServe; return (Java's pid, the process group of TorchServe's processes)."""
    tmp = run / "tmp"
    tmp.mkdir()
    java = launch(
        ["--ts-config", str(config), "--log-config", str(log_config)],
        cwd=run,
        tmp=tmp,
        logs=run / "logs",
    )
    return java, os.getpgid(java)


def wait_for(pid: int) -> int:
    """Reap children until `pid` exits; return its exit status."""
    while True:
        reaped, status = os.waitpid(-1, 0)
        if reaped == pid:
            return os.waitstatus_to_exitcode(status)


def reap_all(deadline: float) -> bool:
    """Reap children until none is left (True) or the deadline passes (False)."""
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return True
        time.sleep(0.05)
    return False


def stop_group(pgid: int) -> None:
    """SIGTERM TorchServe's processes, SIGKILL whatever outlives STOP_SECONDS."""
    for signum, seconds in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, 2)):
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            pass
        if reap_all(time.monotonic() + seconds):
            return
    log("processes of TorchServe outlived SIGKILL")


def prepare_model(run: Path, workers: int, timeout: int | None) -> tuple[Path, int]:
    """The model store holding ncf.mar, built from an artifact if that is what we got."""
    kind, source = find_model(opt_ml() / "model")
    store = run / "model-store"
    store.mkdir()
    if kind == "artifact":
        log(f"{source} holds an artifact: packing it into a .mar")
        built = run / "built"
        build = [sys.executable, "-m", "archive.build", "--artifact", str(source)]
        if subprocess.run([*build, "--out", str(built)], env=project_env()).returncode != 0:
            raise ConfigError(f"could not pack {source} into a .mar (archive.build says why)")
        source = built / f"{MODEL}.mar"
    return store, copy_mar(source, store / f"{MODEL}.mar", workers, timeout)


def serve(argv: list[str]) -> int:
    if argv:
        raise ConfigError(f"serve takes no arguments (got {' '.join(argv)})")
    public = env_int("SAGEMAKER_BIND_TO_PORT", PUBLIC_PORT)
    ports = loopback_ports(public)
    workers = env_int("SAGEMAKER_MODEL_SERVER_WORKERS") or gpu_count() or 1
    timeout = env_int("SAGEMAKER_MODEL_SERVER_TIMEOUT")

    def on_signal(signum, _frame):
        raise Shutdown(signal.Signals(signum).name)

    become_subreaper()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run = Path(tempfile.mkdtemp(prefix="ncf-serve-"))
    server = readiness = pgid = None
    try:
        store, response_timeout = prepare_model(run, workers, timeout)
        config = write_config(run, store, ports, workers, timeout)
        log_config = run / "log4j2.xml"
        console_log_config(LOG_CONFIG, log_config)
        java, pgid = start_torchserve(run, config, log_config)
        readiness = Readiness(ports.management, MODEL, workers)
        upstream = Upstream(ports.inference, timeout=response_timeout + 10)
        try:
            gate = GateServer(public, readiness, upstream, MAX_BODY)
        except OSError as error:
            raise ConfigError(f"cannot listen on 0.0.0.0:{public}: {error.strerror}") from None
        threading.Thread(target=gate.serve_forever, name="gate", daemon=True).start()
        server = gate  # only now: shutdown() would wait forever for a loop not yet started
        readiness.start()
        log(
            f"serving on 0.0.0.0:{public}: {workers} worker(s), response timeout "
            f"{response_timeout} s; /ping is 503 until the model is READY"
        )
        status = wait_for(java)
        log(f"TorchServe exited with status {status}")
        return 1
    except Shutdown as stop:
        log(f"{stop}: stopping TorchServe")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut cleanup
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if server is not None:
            server.shutdown()
            server.server_close()
        if readiness is not None:
            readiness.stop()
        if pgid is not None:
            stop_group(pgid)
        shutil.rmtree(run, ignore_errors=True)


def main(argv: list[str]) -> int:
    command, *rest = argv or ["serve"]
    try:
        if command == "serve":
            return serve(rest)
        if command == "train":
            return train(rest)
    except (ConfigError, ServerError) as error:
        log(f"error: {error}")
        return 2
    try:
        os.execvp(command, argv)
    except OSError as error:
        log(f"cannot run {command!r}: {error.strerror} (modes: serve, train, or a command)")
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
