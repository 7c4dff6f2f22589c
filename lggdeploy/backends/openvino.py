"""OpenVINO: the CPU runtime Intel and AMD x86 edge boxes ship. Builds and loads; no torch; optional extra.

The engine file is an ONNX graph that OpenVINO reads directly (one file, so the sha256 in the manifest and the
bundle's checksum list cover the whole engine): the FP32 export for `fp32` and `bf16`, a plain Q/DQ graph for
`int8` (OpenVINO's low-precision transformations turn Q/DQ into int8 kernels; it cannot read ONNX Runtime's
QLinear or com.microsoft operators). BF16 is an execution precision, not a graph: the runner compiles with
INFERENCE_PRECISION_HINT=bf16, refused where the CPU has neither AVX512-BF16 nor AMX. An INT8 engine's float
remainder (what the Q/DQ nodes leave unquantized: activations, pooling, upsampling) runs in BF16 where the CPU has
it — OpenVINO's own default there — and in FP32 elsewhere; the build records the hint in the manifest, the gate
judges the engine with it, and a CPU without BF16 runs that remainder in FP32.

Compiled models are cached per batch size (static shapes are what OpenVINO's CPU plugin runs fastest).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import BuildTarget, RunnerBase, RunOptions
from lggdeploy.common import machine  # machine.cpu_has_bf16 read at call time (tests replace it)
from lggdeploy.common.errors import EngineError

PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the Q/DQ nodes decide; see precision_hint


def precision_hint(precision: str) -> str:
    """The execution precision a new engine is built for: an INT8 graph's float remainder in BF16 where the CPU has it."""
    if precision == "int8":
        return "bf16" if machine.cpu_has_bf16() else "f32"
    return PRECISION_HINT[precision]


def is_available() -> tuple[bool, str]:
    try:
        import openvino as ov
    except ImportError:
        return False, "openvino is not installed (pip install 'lggdeploy[openvino]')"
    return True, f"openvino {ov.__version__.split('-')[0]}"


def supports(precision: str) -> tuple[bool, str]:
    """BF16 needs AVX512-BF16 or AMX (OpenVINO would silently run f32 elsewhere): say so instead."""
    if precision != "bf16":
        return True, ""

    if machine.cpu_has_bf16():
        return True, ""
    return (
        False,
        "this CPU has neither AVX512-BF16 nor AMX, so OpenVINO would run BF16 as FP32: build fp32 or int8 here",
    )


def build(onnx_path: str | Path, fmt, target: str | Path, options: BuildTarget) -> dict:
    """Copy the precision-typed ONNX graph as the engine and prove OpenVINO reads it (refused here, not on the device)."""
    import openvino as ov

    ok, reason = supports(fmt.precision)
    if not ok:
        raise EngineError(f"openvino {fmt.precision}: {reason}")
    shutil.copyfile(onnx_path, target)
    try:
        ov.Core().read_model(str(target))
    except Exception as exc:
        raise EngineError(
            f"OpenVINO cannot read {Path(onnx_path).name} ({str(exc).strip().splitlines()[0][:200]})"
        ) from None
    return {
        "openvino_version": ov.__version__.split("-")[0],
        "inference_precision_hint": precision_hint(fmt.precision),
        "device": "CPU",
    }


class OpenVinoRunner(RunnerBase):
    def __init__(self, path, hint: str, threads: int):
        import openvino as ov

        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(path))
        except Exception as exc:
            raise EngineError(f"{path}: OpenVINO cannot read it ({str(exc).strip().splitlines()[0][:200]})") from None
        self.config = {
            "INFERENCE_PRECISION_HINT": hint,
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.input_name = self.model.inputs[0].get_any_name()
        self.requests: dict[tuple, object] = {}

    def _request(self, shape: tuple):
        request = self.requests.get(shape)
        if request is None:
            model = self.model.clone()
            model.reshape({self.input_name: list(shape)})
            request = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            self.requests[shape] = request
        return request

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        request = self._request(batch.shape)
        request.infer({0: batch})
        return np.array(request.get_output_tensor(0).data, np.float32, copy=True)

    def close(self) -> None:
        self.requests.clear()


def load(path, manifest: dict | None = None, options: RunOptions = RunOptions()) -> OpenVinoRunner:
    precision = (manifest or {}).get("precision", "fp32")
    if precision not in PRECISION_HINT:
        raise EngineError(
            f"{path}: OpenVINO runs fp32, bf16 or int8 engines, its manifest says {precision!r}; rebuild it"
        )
    if options.device.startswith("cuda"):
        raise EngineError(f"{path}: an OpenVINO engine runs on the CPU here; drop --device {options.device}")
    # The hint the engine was built and gated with (engines built before it was recorded: the precision's default).
    hint = (manifest or {}).get("inference_precision_hint", PRECISION_HINT[precision])
    if hint not in ("f32", "bf16") or (hint == "bf16" and precision == "fp32"):
        raise EngineError(
            f"{path}: its manifest asks OpenVINO for inference precision {hint!r} on a {precision} engine; rebuild it"
        )
    if hint == "bf16" and precision == "int8":
        hint = precision_hint(
            "int8"
        )  # a CPU without BF16 runs the float remainder in f32: closer to FP32 than what was gated
    runner = OpenVinoRunner(path, hint, options.cpu_threads())
    size = (manifest or {}).get("img_size")
    shape = runner.model.inputs[0].get_partial_shape()
    if (
        size is not None
        and shape.rank.get_length() == 4
        and shape[2].is_static
        and (shape[2].get_length(), shape[3].get_length()) != (size, size)
    ):
        runner.close()
        raise EngineError(
            f"{path}: the model takes {shape[2]}x{shape[3]} inputs but its manifest says img_size {size}; the manifest belongs to another engine: rebuild it"
        )
    return runner
