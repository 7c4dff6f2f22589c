"""`lggdeploy triton-repo ENGINE... -o model_repository/`: a model repository for a stock Triton Inference Server.

Per engine (its preset, or preset-precision when several engines of one preset are given), Triton's own backends
run the network and Python-backend models run lggdeploy's pre- and post-processing — the same functions `serve`
runs (handlers.py) — chained by an ensemble, so a client sends uint8 slices and gets masks:

    <name>-engine   the engine: onnxruntime_onnx (model.onnx), openvino (model.xml + model.bin) or tensorrt_plan
                    (model.plan); instance_group KIND_CPU, or KIND_GPU for TensorRT; dynamic batching
    <name>-pre      python: slices [B, 256, 256, 3] UINT8 -> the network's input, normalized as the manifest says
    <name>-post     python: logits -> masks [B, 256, 256] UINT8 and probabilities FP32 at the manifest's threshold
    <name>-slice    ensemble: pre -> engine -> post (what clients call)
    <name>-volume   python: one patient's volume and spacing -> post-processed masks and volume_ml (runs the engine
                    itself through lggdeploy's runtime, since post-processing needs the whole volume)

Every config.pbtxt carries the engine's facts as parameters (sha256, preset, threshold, normalization,
post-processing). The Python models import lggdeploy: the Triton image needs `pip install lggdeploy` (the runtime,
torch-free) in its Python backend environment; the repository's README.md says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lggdeploy.common.errors import LggError
from lggdeploy.common.files import ensure_folder, temporary_folder, write_text_atomic
from lggdeploy.serve.handlers import EngineFacts

# Dynamic batching's wait for more requests. 0: a request runs as soon as an instance is free, and requests that
# queued meanwhile form the batch. Measured on 2 cores (benchmarks/results/serve-zen4/): 0 took 0.5-1.3 ms off the
# concurrency-1 latency against 500 us and batched as well at concurrency 8 and 16.
QUEUE_DELAY_US = 0
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}
ENGINE_BACKENDS = {  # engine file suffix -> (Triton backend, file name in the version folder)
    ".onnx": ("onnxruntime", "model.onnx"),
    ".xml": ("openvino", "model.xml"),
    ".plan": ("tensorrt", "model.plan"),
}


def _quote(value: str) -> str:
    return json.dumps(value)  # a protobuf text string: double quotes, backslash escapes


def _tensors(kind: str, tensors: list[tuple[str, str, list[int]]]) -> str:
    body = ",\n".join(
        f"  {{\n    name: {_quote(n)}\n    data_type: {t}\n    dims: [ {', '.join(map(str, d))} ]\n  }}"
        for n, t, d in tensors
    )
    return f"{kind} [\n{body}\n]"


def _parameters(facts: EngineFacts, extra: dict[str, str] | None = None) -> str:
    items = {**facts.to_parameters(), **(extra or {})}
    return "\n".join(
        f"parameters {{\n  key: {_quote(k)}\n  value: {{ string_value: {_quote(v)} }}\n}}" for k, v in items.items()
    )


def _config(name: str, head: list[str], inputs, outputs, facts: EngineFacts, extra: list[str] = (), params=None) -> str:
    parts = [f"name: {_quote(name)}", *head, _tensors("input", inputs), _tensors("output", outputs), *extra]
    parts.append(_parameters(facts, params))
    return "\n".join(parts) + "\n"


def engine_config(
    name: str, manifest, facts: EngineFacts, max_batch: int, gpu: bool, queue_delay_us: int = QUEUE_DELAY_US
) -> str:
    backend, filename = ENGINE_BACKENDS[Path(manifest["engine"]).suffix]
    size = facts.img_size
    in_type = TRITON_TYPES.get(str(manifest["input"].get("dtype", "float32")), "TYPE_FP32")
    out_type = TRITON_TYPES.get(str(manifest["output"].get("dtype", "float32")), "TYPE_FP32")
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return _config(
        name,
        [f"backend: {_quote(backend)}", f"default_model_filename: {_quote(filename)}", f"max_batch_size: {max_batch}"],
        [(manifest["input"]["name"], in_type, [3, size, size])],
        [(manifest["output"]["name"], out_type, [1, size, size])],
        facts,
        [
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}",
            f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]",
        ],
    )


def python_config(name: str, inputs, outputs, facts: EngineFacts, max_batch: int, params=None) -> str:
    return _config(
        name,
        ['backend: "python"', f"max_batch_size: {max_batch}"],
        inputs,
        outputs,
        facts,
        ["instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]"],
        params,
    )


def ensemble_config(name: str, engine: str, manifest, facts: EngineFacts, max_batch: int) -> str:
    in_name, out_name = manifest["input"]["name"], manifest["output"]["name"]
    steps = [
        (f"{name}-pre", {"slices": "slices"}, {"input": "preprocessed"}),
        (engine, {in_name: "preprocessed"}, {out_name: "logits"}),
        (f"{name}-post", {"logits": "logits"}, {"masks": "masks", "probabilities": "probabilities"}),
    ]

    def step(model: str, inputs: dict, outputs: dict) -> str:
        maps = [
            f"    input_map {{\n      key: {_quote(k)}\n      value: {_quote(v)}\n    }}" for k, v in inputs.items()
        ]
        maps += [
            f"    output_map {{\n      key: {_quote(k)}\n      value: {_quote(v)}\n    }}" for k, v in outputs.items()
        ]
        return (
            "  step [\n    {\n    model_name: "
            + _quote(model)
            + "\n    model_version: -1\n"
            + "\n".join(maps)
            + "\n    }\n  ]"
        )

    scheduling = "ensemble_scheduling {\n" + "\n".join(step(*s) for s in steps) + "\n}"
    return _config(
        f"{name}-slice",
        ['platform: "ensemble"', f"max_batch_size: {max_batch}"],
        [("slices", "TYPE_UINT8", [256, 256, 3])],
        [("masks", "TYPE_UINT8", [256, 256]), ("probabilities", "TYPE_FP32", [256, 256])],
        facts,
        [scheduling],
    )


MODEL_PY = '''"""Triton Python model written by `lggdeploy {writer}`: {what}. The code is lggdeploy's own
(lggdeploy.serve.handlers), the one implementation `serve` and `triton-repo` share; install lggdeploy (torch-free)
in the Python backend's environment."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from lggdeploy.serve.handlers import BadRequest, EngineFacts, {imports}


def _parameters(config):
    return {{k: v["string_value"] for k, v in config.get("parameters", {{}}).items()}}


def _facts(config):
    p = _parameters(config)
    backend, precision = p["backend"].split(" ", 1)
    return EngineFacts(p["preset"], p["engine_sha256"], int(p["img_size"]), float(p["threshold"]),
                       json.loads(p["normalization"]), json.loads(p["postprocess"]), backend, precision)


def _engine(config):
    """The engine the config names (beside this file, or an absolute path), opened with the config's threads."""
    from pathlib import Path

    from lggdeploy.backends.base import RunOptions
    from lggdeploy.engines.formats import open_engine, read_manifest

    p = _parameters(config)
    engine = Path(__file__).parent / p["engine_file"]
    return open_engine(engine, read_manifest(engine), RunOptions(threads=int(p.get("threads") or 0) or None))


def _error(exc):
    """A bad request: its reason, one line (INVALID_ARG: HTTP 400); anything else: what failed (INTERNAL: HTTP 500),
    the traceback in Triton's log."""
    if isinstance(exc, BadRequest):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    import traceback

    pb_utils.Logger.log_error("".join(traceback.format_exception(exc)))
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"the server failed on this request: {{reason}}"))


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        self.facts = _facts(self.config)
{init}

    def execute(self, requests):
{execute}
'''

EACH_REQUEST = """        responses = []
        for request in requests:
            try:
{body}
            except Exception as exc:  # refused with its reason; the model stays up
                responses.append(_error(exc))
        return responses"""

PRE_BODY = """                slices = check_slices(pb_utils.get_input_tensor_by_name(request, "slices").as_numpy())
                x = pre(slices, self.facts).astype(self.dtype)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("input", x)]))"""
PRE_INIT = """        self.dtype = pb_utils.triton_string_to_numpy(
            pb_utils.get_output_config_by_name(self.config, "input")["data_type"]
        )"""
POST_BODY = """                logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy()
                masks, probabilities = post(logits.astype(np.float32), self.facts)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("masks", masks), pb_utils.Tensor("probabilities", probabilities)]))"""
VOLUME_INIT = """        slices = int(_parameters(self.config).get("max_slices") or 1024)
        self.handler = VolumeHandler(_engine(self.config), self.facts, max_slices=slices)"""
VOLUME_BODY = """                volume = pb_utils.get_input_tensor_by_name(request, "volume").as_numpy()
                spacing = pb_utils.get_input_tensor_by_name(request, "spacing_mm").as_numpy()
                out = self.handler(volume, spacing)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("masks", out["masks"]), pb_utils.Tensor("volume_ml", out["volume_ml"])]))"""
SLICE_INIT = """        wants = [o["name"] for o in self.config["output"]]
        batch = int(self.config["max_batch_size"])
        self.handler = SliceHandler(_engine(self.config), self.facts, batch, probabilities="probabilities" in wants)"""
SLICE_EXECUTE = """        arrays = [pb_utils.get_input_tensor_by_name(r, "slices").as_numpy() for r in requests]
        try:
            answers = self.handler.each(arrays)  # one engine call for the good requests of this dynamic batch
        except Exception as exc:  # the engine failed: every request of the batch is told so
            return [_error(exc) for _ in requests]
        return [
            _error(a) if isinstance(a, Exception)
            else pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in a.items()])
            for a in answers
        ]"""
INFO_INIT = """        p = _parameters(self.config)
        self.info = np.array([json.dumps({"engine": p["engine_name"], **self.facts.to_parameters()}, sort_keys=True)],
                             dtype=np.object_)"""
INFO_BODY = """                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("engine", self.info)]))"""


def model_py(what: str, imports: str, body="", init="", execute="", writer="triton-repo") -> str:
    return MODEL_PY.format(
        writer=writer,
        what=what,
        imports=imports,
        init=init or "        pass",
        execute=execute or EACH_REQUEST.format(body=body),
    )


def write_repository(
    engines: list[Path], out: Path, max_batch: int = 8, max_queue_delay_us: int = QUEUE_DELAY_US
) -> list[str]:
    """The repository for `engines` under `out` (written in a temporary folder, then moved into place): the model names."""
    from lggdeploy.engines.formats import read_manifest, verify_engine

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LggError(f"{out} exists and is not empty: give a new folder for the model repository")
    loaded = []
    for path in engines:
        path = Path(path)
        manifest = read_manifest(path)
        verify_engine(path, manifest)
        if Path(manifest["engine"]).suffix not in ENGINE_BACKENDS:
            raise LggError(f"{path}: Triton has no backend for {Path(manifest['engine']).suffix} engines")
        loaded.append((path, manifest, EngineFacts.from_manifest(manifest)))
    presets = [f.preset for _, _, f in loaded]
    names = []
    ensure_folder(out.parent)
    with temporary_folder(out.parent, prefix="triton-repo") as tmp:
        root = Path(tmp) / "repository"
        for path, manifest, facts in loaded:
            name = facts.preset if presets.count(facts.preset) == 1 else f"{facts.preset}-{Path(path).stem}"
            names += _write_models(root, name, path, manifest, facts, max_batch, max_queue_delay_us)
        write_text_atomic(root / "README.md", _readme(names))
        if out.exists():
            out.rmdir()  # empty (checked above)
        root.rename(out)  # the whole repository appears at once
    return names


def _write_models(
    root: Path, name: str, path: Path, manifest, facts: EngineFacts, max_batch: int, queue_delay_us: int
) -> list[str]:
    size = facts.img_size
    gpu = manifest["backend"] == "tensorrt"
    engine = f"{name}-engine"
    backend, filename = ENGINE_BACKENDS[Path(path).suffix]
    (root / engine / "1").mkdir(parents=True)
    shutil.copyfile(path, root / engine / "1" / filename)
    if backend == "openvino":
        shutil.copyfile(path.with_suffix(".bin"), root / engine / "1" / "model.bin")
    (root / engine / "config.pbtxt").write_text(engine_config(engine, manifest, facts, max_batch, gpu, queue_delay_us))
    in_type = TRITON_TYPES.get(str(manifest["input"].get("dtype", "float32")), "TYPE_FP32")
    out_type = TRITON_TYPES.get(str(manifest["output"].get("dtype", "float32")), "TYPE_FP32")
    models = {
        f"{name}-pre": (
            python_config(
                f"{name}-pre",
                [("slices", "TYPE_UINT8", [256, 256, 3])],
                [("input", in_type, [3, size, size])],
                facts,
                max_batch,
            ),
            model_py("slices -> the network's input", "check_slices, pre", PRE_BODY, PRE_INIT),
        ),
        f"{name}-post": (
            python_config(
                f"{name}-post",
                [("logits", out_type, [1, size, size])],
                [("masks", "TYPE_UINT8", [256, 256]), ("probabilities", "TYPE_FP32", [256, 256])],
                facts,
                max_batch,
            ),
            model_py("logits -> masks and probabilities", "post", POST_BODY),
        ),
        f"{name}-volume": _volume_model(name, facts, {"engine_file": Path(path).name}, "triton-repo"),
    }
    _write_python_models(root, models)
    volume_dir = root / f"{name}-volume" / "1"
    shutil.copyfile(path, volume_dir / Path(path).name)
    shutil.copyfile(Path(str(path) + ".json"), volume_dir / (Path(path).name + ".json"))
    if backend == "openvino":
        shutil.copyfile(path.with_suffix(".bin"), volume_dir / path.with_suffix(".bin").name)
    (root / f"{name}-slice" / "1").mkdir(parents=True)  # an ensemble has an empty version folder
    (root / f"{name}-slice" / "config.pbtxt").write_text(ensemble_config(name, engine, manifest, facts, max_batch))
    return [engine, f"{name}-pre", f"{name}-post", f"{name}-slice", f"{name}-volume"]


def _volume_model(name: str, facts: EngineFacts, params: dict[str, str], writer: str) -> tuple[str, str]:
    """`<name>-volume` (config, code): one patient's volume and spacing -> post-processed masks and volume_ml; it runs
    the engine `params["engine_file"]` names."""
    config = python_config(
        f"{name}-volume",
        [("volume", "TYPE_UINT8", [-1, 256, 256, 3]), ("spacing_mm", "TYPE_FP32", [3])],
        [("masks", "TYPE_UINT8", [-1, 256, 256]), ("volume_ml", "TYPE_FP32", [1])],
        facts,
        0,
        params,
    )
    what = "one patient's volume -> post-processed masks and volume_ml"
    return config, model_py(what, "VolumeHandler", VOLUME_BODY, VOLUME_INIT, writer=writer)


def _write_python_models(root: Path, models: dict[str, tuple[str, str]]) -> list[str]:
    """Each model's config.pbtxt and 1/model.py under `root`; the model names."""
    for model, (config, code) in models.items():
        (root / model / "1").mkdir(parents=True)
        (root / model / "config.pbtxt").write_text(config)
        (root / model / "1" / "model.py").write_text(code)
    return list(models)


def _readme(names: list[str]) -> str:
    return (
        "# Triton model repository (lggdeploy triton-repo)\n\n"
        "Models: " + ", ".join(f"`{n}`" for n in names) + ".\n\n"
        "Clients call `<name>-slice` (slices [B, 256, 256, 3] UINT8 -> masks, probabilities) or `<name>-volume` (one "
        "patient's volume and spacing_mm -> post-processed masks, volume_ml). The Python models import lggdeploy: "
        "install it in the Triton image's Python environment (`pip install lggdeploy`, torch-free), e.g.\n\n"
        "    docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\\n"
        "      bash -c 'pip install lggdeploy && tritonserver --model-repository=/models'\n\n"
        "Each config.pbtxt carries the engine's sha256, preset, threshold, normalization and post-processing as "
        "parameters.\n"
    )


def write_serve_repository(engine: Path, facts: EngineFacts, root: Path, opts) -> list[str]:
    """What `lggdeploy serve` loads (`opts`: its ServeOptions): three Python models that run the engine inside Triton's
    Python backend — no hop to another process — each opening `engine` where it lies (its sha256 checked before).

    <preset>-slice   slices [B, 256, 256, 3] UINT8 -> masks (and probabilities); dynamic batching, `opts.instances`
                     instances of `threads` threads each
    <preset>-volume  one patient's volume and spacing_mm -> post-processed masks and volume_ml
    <preset>-info    the engine's facts as JSON (they are in every config's parameters too)"""
    name, engine = facts.preset, Path(engine).resolve()
    params = {"engine_file": str(engine), "engine_name": engine.name, "threads": str(opts.threads or 0)}
    masks = ("masks", "TYPE_UINT8", [256, 256])
    outputs = [masks, ("probabilities", "TYPE_FP32", [256, 256])] if opts.probabilities else [masks]
    slice_config = _config(
        f"{name}-slice",
        ['backend: "python"', f"max_batch_size: {opts.max_batch}"],
        [("slices", "TYPE_UINT8", [256, 256, 3])],
        outputs,
        facts,
        [
            f"dynamic_batching {{\n  max_queue_delay_microseconds: {opts.max_queue_delay_us}\n}}",
            f"instance_group [\n  {{\n    count: {opts.instances}\n    kind: KIND_CPU\n  }}\n]",
        ],
        params,
    )
    models = {
        f"{name}-slice": (
            slice_config,
            model_py("batched slices -> masks", "SliceHandler", init=SLICE_INIT, execute=SLICE_EXECUTE, writer="serve"),
        ),
        f"{name}-volume": _volume_model(name, facts, {**params, "max_slices": str(opts.max_volume_slices)}, "serve"),
        f"{name}-info": (
            python_config(
                f"{name}-info", [("request", "TYPE_UINT8", [1])], [("engine", "TYPE_STRING", [1])], facts, 0, params
            ),
            model_py("the engine's facts as JSON", "SliceHandler", INFO_BODY, INFO_INIT, writer="serve"),
        ),
    }
    return _write_python_models(root, models)
