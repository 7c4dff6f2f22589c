"""`lggdeploy serve`: an engine behind a real Triton Inference Server, torch-free.

The tritonserver binary and its Python backend come with the `serve` extra (NVIDIA PyTriton's wheel carries them);
`serve` writes a model repository in a temporary folder (repository.write_serve_repository) and runs tritonserver
on it. Three Python-backend models run the engine inside Triton's Python backend processes — no further hop to this
process (at concurrency 1, paired with in-process batch 1: +5.5 ms through PyTriton's proxy, +2.1 ms without it, in one
run; benchmarks/results/serve-zen4/):

- `<preset>-slice`: slices [B, 256, 256, 3] UINT8 -> masks [B, 256, 256] UINT8 (0/1), and probabilities FP32 with
  `--probabilities`, preprocessing and threshold exactly as the manifest says (handlers.py, the one implementation);
  dynamic batching, `--instances` copies of the engine;
- `<preset>-volume`: one patient's volume [N, 256, 256, 3] UINT8 and spacing_mm [3] FP32 -> masks after the manifest's
  post-processing and volume_ml [1];
- `<preset>-info`: the engine's facts (sha256, preset, threshold, normalization, post-processing) as JSON; every
  model's config parameters carry them too (`/v2/models/<name>/config`).

A bad request is refused with its reason in one line (HTTP 400 / gRPC INVALID_ARGUMENT) and never fails the other
requests of its dynamic batch. Before anything starts: the engine's sha256 against its manifest, its backend
usable in this environment, the ports free, tritonserver and its Python backend stub for this Python present — each
a line and exit 2. Health is Triton's
(`/v2/health/ready`), metrics Triton's Prometheus endpoint, its log goes to the `lggdeploy.serve.tritonserver`
logger. SIGTERM stops the server: tritonserver lets in-flight requests finish (its exit timeout), then the command
exits 143.

The Python backend stub is a binary linked against libpython; a pyenv-built interpreter's stub can pick the system's
older libpython and fail in multiprocessing (`'_thread.RLock' object has no attribute '_recursion_count'`):
`server_environment` puts this interpreter's own lib/ first on tritonserver's LD_LIBRARY_PATH.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from lggdeploy.common.errors import LggError
from lggdeploy.serve.repository import QUEUE_DELAY_US, write_serve_repository

logger = logging.getLogger(__name__)
server_logger = logging.getLogger("lggdeploy.serve.tritonserver")

SERVE_HINT = (
    "pip install 'lggdeploy[serve]' — in its own environment: Triton's Python backend needs numpy < 2, which the training and DICOM "
    "extras do not allow"
)


@dataclass(frozen=True)
class ServeOptions:
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # the slice model's max_batch_size
    max_queue_delay_us: int = QUEUE_DELAY_US  # dynamic batching: how long a request may wait for others
    instances: int = 1  # engine instances of the slice model (each its own session)
    threads: int | None = None  # CPU threads per engine instance (default: all cores / instances)
    max_volume_slices: int = 512
    exit_timeout_s: int = 30  # SIGTERM: how long in-flight requests may take to finish
    probabilities: bool = False  # the slice model also returns probabilities (256 KB per slice more to send)
    start_timeout_s: int = 300  # until tritonserver and every model answer ready

    def validate(self) -> ServeOptions:
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3:
            raise LggError(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
        return self


DEFAULTS = ServeOptions()
HELP = {
    "http_port": "HTTP/REST port (KServe v2 protocol)",
    "grpc_port": "gRPC port",
    "metrics_port": "Prometheus metrics port",
    "max_batch": "largest batch of slices the slice model takes (dynamic batching fills it)",
    "max_queue_delay_us": "how long a request may wait for others to form a batch, in microseconds",
    "instances": "engine instances serving the slice model in parallel",
    "threads": "CPU threads per engine instance (default: the cores shared among the instances)",
    "probabilities": "the slice model also returns FP32 probabilities (default: masks only)",
}


def resolve_engine(path: Path) -> Path:
    """An engine file, or an `optimize` output folder (its chosen engine)."""
    path = Path(path)
    if path.is_dir():
        chosen = [
            p
            for p in (path / "chosen").glob("*")
            if p.suffix in (".onnx", ".xml", ".plan") and not p.name.endswith(".qdq.onnx")
        ]
        if len(chosen) != 1:
            raise LggError(
                f"{path} is a folder but not an `lggdeploy optimize` output with one chosen engine; give an engine file"
            )
        return chosen[0]
    if not path.is_file():
        raise LggError(f"{path} does not exist: give an engine built by `lggdeploy build` or an optimize folder")
    return path


@dataclass(frozen=True)
class TritonInstall:
    """The tritonserver binary and Python backend that the `serve` extra (NVIDIA PyTriton's wheel) carries."""

    binary: Path
    backend: Path  # libtriton_python.so, triton_python_backend_utils.py
    stub: Path  # the Python backend stub built for this Python version
    libs: Path  # the wheel's bundled shared libraries

    def backend_directory(self, folder: Path) -> Path:
        """A backend directory with this Python's stub beside the Python backend (where the backend looks for it)."""
        python = folder / "python"
        python.mkdir(parents=True)
        for file in (self.backend / "libtriton_python.so", self.backend / "triton_python_backend_utils.py", self.stub):
            shutil.copy2(file, python / file.name)
        return folder


def find_tritonserver() -> TritonInstall:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise LggError(f"serving needs Triton Inference Server: {SERVE_HINT}")
    package = Path(list(spec.submodule_search_locations)[0])
    server = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = TritonInstall(
        server / "bin" / "tritonserver",
        server / "backends" / "python",
        server / "python_backend_stubs" / version / "triton_python_backend_stub",
        package.parent / "nvidia_pytriton.libs",
    )
    if not found.binary.is_file() or not (found.backend / "libtriton_python.so").is_file():
        raise LggError(f"{server} has no tritonserver with its Python backend: reinstall, {SERVE_HINT}")
    if not found.stub.is_file():
        have = sorted(p.name for p in (server / "python_backend_stubs").glob("*") if p.is_dir())
        raise LggError(
            f"{server} has no Python backend stub for Python {version} (it has {', '.join(have) or 'none'}): "
            "serve from one of those"
        )
    return found


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that were free on 127.0.0.1 a moment ago (the OS's choice): for a test or benchmark that
    starts a server beside others. Another process may take one before it is bound; the server then fails on it."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def check_ports_free(opts: ServeOptions) -> None:
    for flag, port in (
        ("--http-port", opts.http_port),
        ("--grpc-port", opts.grpc_port),
        ("--metrics-port", opts.metrics_port),
    ):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as exc:
                raise LggError(
                    f"{flag} {port} is already in use ({exc.strerror}): stop what listens there or choose another port"
                ) from None


def server_environment(install: TritonInstall) -> dict[str, str]:
    """tritonserver's environment: this interpreter's lib/ first on LD_LIBRARY_PATH (the stub links libpython, and a
    pyenv-built Python's stub would otherwise load the system's older one), the wheel's libraries after it, and this
    environment's bin/ first on PATH (the stub imports lggdeploy and numpy from the Python it finds there)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    shared = sysconfig.get_config_var("LDLIBRARY") or ""
    first = [libdir] if libdir and (Path(libdir) / shared).is_file() else []
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    return dict(
        os.environ,
        LD_LIBRARY_PATH=":".join([*first, str(install.libs), *current]),
        PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    )


def prepare(engine: Path, opts: ServeOptions):
    """Every check before the server starts: (engine path, manifest, facts, the tritonserver install)."""
    from lggdeploy.engines.formats import format_of, read_manifest, verify_engine
    from lggdeploy.serve.handlers import EngineFacts

    opts.validate()
    engine = resolve_engine(engine)
    manifest = read_manifest(engine)
    verify_engine(engine, manifest)  # a replaced file: refused, nothing served
    usable, reason = format_of(manifest, engine).usable()  # the models open it in this environment's Python
    if not usable:
        raise LggError(f"{engine.name}: {reason} — `serve` runs the engine in this environment")
    check_ports_free(opts)
    return engine, manifest, EngineFacts.from_manifest(manifest), find_tritonserver()


def serve(engine: Path, opts: ServeOptions, on_ready=None) -> None:
    """Serve until stopped: SIGTERM / Ctrl-C raise in the main thread, and tritonserver is stopped as they propagate
    (in-flight requests finish within `exit_timeout_s`)."""
    engine, _, facts, install = prepare(engine, opts)
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.instances)
    with tempfile.TemporaryDirectory(prefix="lggdeploy-serve-") as tmp:
        models = write_serve_repository(engine, facts, Path(tmp) / "models", replace(opts, threads=threads))

        def ready() -> None:
            logger.info(
                f"serving {engine} as {', '.join(models)} on HTTP :{opts.http_port}, gRPC :{opts.grpc_port}, "
                f"metrics :{opts.metrics_port} ({opts.instances} instance(s) × {threads} thread(s))"
            )
            if on_ready is not None:
                on_ready()

        run_tritonserver(install, Path(tmp) / "models", models, opts, ready)


def run_tritonserver(install: TritonInstall, repository: Path, models: list[str], opts: ServeOptions, on_ready) -> None:
    """tritonserver on `repository` until it is stopped (an exception here, SIGTERM in the CLI, stops it first):
    `on_ready` once Triton and every one of `models` answer ready. Also what the tests run `triton-repo`'s
    repositories with."""
    with tempfile.TemporaryDirectory(prefix="lggdeploy-backends-") as backends:
        process = _start(install, repository, install.backend_directory(Path(backends)), opts)
        try:
            log = _ServerLog(process)
            _wait_ready(process, log, opts, models)
            on_ready()
            code = process.wait()
            raise LggError(f"tritonserver stopped on its own (exit {code}): {log.last_error()}")
        finally:
            _stop(process, opts.exit_timeout_s)


def _start(install: TritonInstall, repository: Path, backends: Path, opts: ServeOptions) -> subprocess.Popen:
    command = [
        str(install.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends}",
        f"--http-port={opts.http_port}",
        f"--grpc-port={opts.grpc_port}",
        f"--metrics-port={opts.metrics_port}",
        f"--exit-timeout-secs={opts.exit_timeout_s}",
        "--log-verbose=0",
        # its own shared-memory names, so that two servers on one machine never share a region
        f"--backend-config=python,shm-region-prefix-name=lggdeploy{os.getpid()}_",
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=server_environment(install), text=True
    )


class _ServerLog:
    """tritonserver's output, line by line to this module's logger (a thread), the last lines kept for an error."""

    def __init__(self, process: subprocess.Popen):
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.thread = threading.Thread(target=self._follow, args=(process.stdout,), daemon=True)
        self.thread.start()

    def _follow(self, stream) -> None:
        for line in stream:
            line = line.rstrip()
            self.lines.append(line)
            server_logger.info(line)

    def last_error(self) -> str:
        errors = [line for line in self.lines if line[:1] == "E" or "error" in line.lower()]
        return (errors or list(self.lines) or ["no output"])[-1][:300]


def _wait_ready(process: subprocess.Popen, log: _ServerLog, opts: ServeOptions, models: list[str]) -> None:
    """Until Triton and every model answer ready; a server that exits or never gets there: one line."""
    urls = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]
    deadline = time.monotonic() + opts.start_timeout_s
    while True:
        try:
            for url in urls:
                with urllib.request.urlopen(f"http://127.0.0.1:{opts.http_port}{url}", timeout=2):
                    pass
            return
        except OSError:
            if process.poll() is not None:
                log.thread.join(timeout=5)
                raise LggError(
                    f"tritonserver exited before it was ready (exit {process.returncode}): {log.last_error()}"
                ) from None
            if time.monotonic() > deadline:
                raise LggError(
                    f"tritonserver was not ready after {opts.start_timeout_s} s: {log.last_error()}"
                ) from None
            time.sleep(0.25)


def _stop(process: subprocess.Popen, exit_timeout_s: int) -> None:
    """SIGTERM: tritonserver stops taking requests and lets in-flight ones finish; killed if it outlives its timeout."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=exit_timeout_s + 15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
