"""`lggdeploy serve`: an engine behind a real Triton Inference Server (NVIDIA PyTriton's tritonserver), torch-free.

Three models, dynamic batching on the slice model:

- `<preset>-slice`: slices [B, 256, 256, 3] UINT8 -> masks [B, 256, 256] UINT8 (0/1), and probabilities FP32 with
  `--probabilities`, preprocessing and threshold exactly as the manifest says (handlers.py, the one implementation);
- `<preset>-volume`: one patient's volume [N, 256, 256, 3] UINT8 and spacing_mm [3] FP32 -> masks after the manifest's
  post-processing and volume_ml [1];
- `<preset>-info`: no input -> the engine's facts (sha256, preset, threshold, normalization, post-processing) as JSON,
  so a client can check what it talks to (PyTriton writes the model configs itself and has no config parameters;
  `triton-repo` puts the same facts in its config.pbtxt parameters).

Before anything starts: the engine's sha256 against its manifest, the ports free, PyTriton importable — each a
line and exit 2. Health is Triton's (`/v2/health/ready`), metrics Triton's Prometheus endpoint. SIGTERM stops the
server: tritonserver lets in-flight requests finish (its exit timeout), then the command exits 143.

PyTriton's Python backend stub is a binary linked against libpython; a pyenv-built interpreter's stub can pick the
system's older libpython and fail in multiprocessing (`'_thread.RLock' object has no attribute '_recursion_count'`).
`libpython_environment` puts this interpreter's own lib/ first on LD_LIBRARY_PATH before the server starts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lggdeploy.common.errors import LggError

logger = logging.getLogger(__name__)

SERVE_HINT = (
    "pip install 'lggdeploy[serve]' — in its own environment: PyTriton needs numpy < 2, which the training and DICOM "
    "extras do not allow"
)


@dataclass(frozen=True)
class ServeOptions:
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # the slice model's max_batch_size
    max_queue_delay_us: int = 500  # dynamic batching: how long a request may wait (benchmarks/results/serve-zen4/)
    instances: int = 1  # engine instances of the slice model (each its own session)
    threads: int | None = None  # CPU threads per engine instance (default: all cores / instances)
    max_volume_slices: int = 512
    exit_timeout_s: int = 30  # SIGTERM: how long in-flight requests may take to finish
    probabilities: bool = False  # the slice model also returns probabilities (256 KB per slice more to send)

    def validate(self) -> ServeOptions:
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3:
            raise LggError(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
        return self


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


def require_pytriton() -> None:
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise LggError(f"serving needs NVIDIA PyTriton: {SERVE_HINT}") from None


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


def libpython_environment() -> dict[str, str]:
    """This interpreter's lib/ first on LD_LIBRARY_PATH (the Python backend stub links libpython); returns what changed."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    shared = sysconfig.get_config_var("LDLIBRARY") or ""
    if not libdir or not (Path(libdir) / shared).is_file() or current.split(":")[0] == libdir:
        return {}
    os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir
    return {"LD_LIBRARY_PATH": os.environ["LD_LIBRARY_PATH"]}


def prepare(engine: Path, opts: ServeOptions):
    """Every check before the server starts: (engine path, manifest, facts)."""
    from lggdeploy.engines.formats import read_manifest, verify_engine
    from lggdeploy.serve.handlers import EngineFacts

    opts.validate()
    engine = resolve_engine(engine)
    manifest = read_manifest(engine)
    verify_engine(engine, manifest)  # a replaced file: refused, nothing served
    check_ports_free(opts)
    require_pytriton()
    return engine, manifest, EngineFacts.from_manifest(manifest)


def serve(engine: Path, opts: ServeOptions, on_ready=None) -> None:
    """Serve until stopped (SIGTERM / Ctrl-C raise in the main thread; the context stops tritonserver)."""
    engine, manifest, facts = prepare(engine, opts)  # every check first, PyTriton's import among them
    from pytriton.triton import Triton, TritonConfig

    changed = libpython_environment()
    if changed:
        logger.info(
            f"serve: LD_LIBRARY_PATH starts with this Python's lib/ for the Python backend stub ({changed['LD_LIBRARY_PATH'].split(':')[0]})"
        )
    functions, threads = _infer_functions(engine, manifest, facts, opts)
    config = TritonConfig(
        http_port=opts.http_port,
        grpc_port=opts.grpc_port,
        metrics_port=opts.metrics_port,
        exit_timeout_secs=opts.exit_timeout_s,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        _bind_models(triton, facts.preset, functions, opts)
        triton.run()
        logger.info(
            f"serving {engine} as {facts.preset}-slice, -volume and -info on HTTP :{opts.http_port}, gRPC "
            f":{opts.grpc_port}, metrics :{opts.metrics_port} ({opts.instances} instance(s) × {threads} thread(s))"
        )
        if on_ready is not None:
            on_ready()
        triton.serve()


def _infer_functions(engine: Path, manifest, facts, opts: ServeOptions) -> tuple[dict, int]:
    """PyTriton's infer functions of the three models (one slice function per engine instance), and the threads of
    each instance."""
    from pytriton.decorators import batch

    from lggdeploy.backends.base import RunOptions
    from lggdeploy.engines.formats import open_engine
    from lggdeploy.serve.handlers import SliceHandler, VolumeHandler

    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.instances)
    runners = [open_engine(engine, manifest, RunOptions(threads=threads)) for _ in range(opts.instances)]
    volume_handler = VolumeHandler(runners[0], facts, max_slices=opts.max_volume_slices)
    info = json.dumps({"engine": engine.name, **facts.to_parameters()}, sort_keys=True).encode()

    def slice_fn(handler):
        @batch
        def infer(slices):
            return handler(slices)

        return infer

    return {
        "slice": [slice_fn(SliceHandler(r, facts, opts.max_batch, opts.probabilities)) for r in runners],
        "volume": lambda requests: [volume_handler(r["volume"], r["spacing_mm"]) for r in requests],
        "info": lambda requests: [{"engine": np.array([info], dtype=object)} for _ in requests],
    }, threads


def _bind_models(triton, name: str, functions: dict, opts: ServeOptions) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    masks = Tensor(name="masks", dtype=np.uint8, shape=(256, 256))
    probabilities = [Tensor(name="probabilities", dtype=np.float32, shape=(256, 256))] if opts.probabilities else []
    triton.bind(
        model_name=f"{name}-slice",
        infer_func=functions["slice"],
        inputs=[Tensor(name="slices", dtype=np.uint8, shape=(256, 256, 3))],
        outputs=[masks, *probabilities],
        config=ModelConfig(
            max_batch_size=opts.max_batch,
            batcher=DynamicBatcher(max_queue_delay_microseconds=opts.max_queue_delay_us),
        ),
        strict=True,
    )
    triton.bind(
        model_name=f"{name}-volume",
        infer_func=functions["volume"],
        inputs=[
            Tensor(name="volume", dtype=np.uint8, shape=(-1, 256, 256, 3)),
            Tensor(name="spacing_mm", dtype=np.float32, shape=(3,)),
        ],
        outputs=[
            Tensor(name="masks", dtype=np.uint8, shape=(-1, 256, 256)),
            Tensor(name="volume_ml", dtype=np.float32, shape=(1,)),
        ],
        config=ModelConfig(batching=False),
        strict=True,
    )
    triton.bind(
        model_name=f"{name}-info",
        infer_func=functions["info"],
        inputs=[Tensor(name="request", dtype=np.uint8, shape=(1,))],
        outputs=[Tensor(name="engine", dtype=bytes, shape=(1,))],
        config=ModelConfig(batching=False),
    )
