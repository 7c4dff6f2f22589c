"""TensorRT backend: builds a serialized engine (.plan) from a typed ONNX graph, and runs it.

Written against the documented Python API of TensorRT 10 and 11 and imported lazily (importing lggdeploy
never imports tensorrt). Precision lives in the ONNX graph: every network is strongly typed (TensorRT 11
removed BuilderFlag.FP16/INT8 and the INT8 calibrators; on 10 we ask for STRONGLY_TYPED explicitly), so
FP16 comes from a typed FP16 graph and INT8 from Q/DQ nodes.

Execution uses the I/O tensor API (set_input_shape, set_tensor_address, execute_async_v3) with device
buffers and a stream from cuda-python, reused across calls; one Runner per thread.

Every TensorRT name this module touches is listed in TRT_NAMES ("Class.attr" or a module attribute),
with the versions it must exist in; tests check the list against shared/tensorrt-api/trt10.json and
trt11.json, and check that the source uses no trt name outside the list.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import BuildTarget, RunnerBase, RunOptions
from lggdeploy.common.errors import BackendUnavailable, EngineError
from lggdeploy.common.files import atomic_path

BOTH, V10, V11 = ("10", "11"), ("10",), ("11",)
TRT_NAMES: dict[str, tuple[str, ...]] = {
    "__version__": BOTH,
    "Logger": BOTH,
    "Logger.WARNING": BOTH,
    "Builder": BOTH,
    "Builder.create_network": BOTH,
    "Builder.create_builder_config": BOTH,
    "Builder.create_optimization_profile": BOTH,
    "Builder.build_serialized_network": BOTH,
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED": V10,  # 11: always strongly typed (flag deprecated)
    "INetworkDefinition.num_inputs": BOTH,
    "INetworkDefinition.get_input": BOTH,
    "ITensor.name": BOTH,
    "OnnxParser": BOTH,
    "OnnxParser.parse_from_file": BOTH,
    "OnnxParser.num_errors": BOTH,
    "OnnxParser.get_error": BOTH,
    "ParserError.desc": BOTH,
    "ParserError.node_name": BOTH,
    "IBuilderConfig.set_memory_pool_limit": BOTH,
    "MemoryPoolType.WORKSPACE": BOTH,
    "IBuilderConfig.add_optimization_profile": BOTH,
    "IBuilderConfig.create_timing_cache": BOTH,
    "IBuilderConfig.set_timing_cache": BOTH,
    "IBuilderConfig.get_timing_cache": BOTH,
    "IBuilderConfig.builder_optimization_level": BOTH,
    "ITimingCache.serialize": BOTH,
    "IOptimizationProfile.set_shape": BOTH,
    "Runtime": BOTH,
    "Runtime.deserialize_cuda_engine": BOTH,
    "ICudaEngine.num_io_tensors": BOTH,
    "ICudaEngine.get_tensor_name": BOTH,
    "ICudaEngine.get_tensor_mode": BOTH,
    "ICudaEngine.get_tensor_dtype": BOTH,
    "ICudaEngine.create_execution_context": BOTH,
    "ICudaEngine.get_tensor_profile_shape": BOTH,
    "ICudaEngine.get_tensor_shape": BOTH,
    "TensorIOMode.INPUT": BOTH,
    "IExecutionContext.set_input_shape": BOTH,
    "IExecutionContext.get_tensor_shape": BOTH,
    "IExecutionContext.set_tensor_address": BOTH,
    "IExecutionContext.execute_async_v3": BOTH,
    "nptype": BOTH,
}


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(
            "TensorRT is not installed (pip install tensorrt, on a machine with an NVIDIA GPU and driver)"
        ) from None
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendUnavailable("cuda-python is not installed (pip install cuda-python)") from None
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA call failed with error {int(err)} ({err})")
    return rest[0] if len(rest) == 1 else rest


def major_version(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def gpu_identity() -> dict:
    """Name and compute capability of the current CUDA device (cudaGetDevice: CUDA_VISIBLE_DEVICES and
    cudaSetDevice respected, not always device 0), through the CUDA runtime (no torch)."""
    cudart = _cudart()
    device = _check(cudart.cudaGetDevice())
    props = _check(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}"}


def is_available() -> tuple[bool, str]:
    try:
        trt = _import_trt()
        cudart = _cudart()
    except BackendUnavailable as exc:
        return False, str(exc)
    try:
        count = _check(cudart.cudaGetDeviceCount())
    except EngineError as exc:
        return False, f"no usable NVIDIA GPU ({exc})"
    if not count:
        return False, "no NVIDIA GPU visible"
    if major_version(trt) not in (10, 11):
        return False, f"TensorRT {trt.__version__} is not supported (10.x or 11.x)"
    return True, f"TensorRT {trt.__version__}, {gpu_identity()['gpu']}"


def supports(precision: str) -> tuple[bool, str]:
    """TensorRT 10 and 11 build FP32, FP16 and INT8 on every GPU they support; is_available says whether one is here."""
    return True, ""


def build(
    onnx_path: str | os.PathLike, fmt, plan_path: str | os.PathLike, options: BuildTarget, optimization_level: int = 3
) -> dict:
    """Parse a typed ONNX graph and write a serialized engine atomically. Returns build facts for the manifest."""

    batch, img_size, workspace_gib, timing_cache = (
        options.batch,
        options.img_size,
        options.workspace_gib,
        options.timing_cache,
    )

    ok, reason = is_available()
    if not ok:
        raise BackendUnavailable(f"cannot build a TensorRT engine here: {reason}")
    trt = _import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major_version(trt) == 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        detail = "; ".join(f"{e.node_name()}: {e.desc()}" for e in errors[:3])
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph ({len(errors)} error(s)): {detail}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = optimization_level
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, (lo, 3, img_size, img_size), (opt, 3, img_size, img_size), (hi, 3, img_size, img_size))
    config.add_optimization_profile(profile)
    identity = gpu_identity()
    cache_file = timing_cache_path(timing_cache, str(trt.__version__), identity) if timing_cache else None
    cache_blob = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    if cache is None or not config.set_timing_cache(
        cache, False
    ):  # a cache of another TensorRT or GPU is refused: start empty
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise EngineError("TensorRT refused an empty timing cache (create_timing_cache/set_timing_cache failed)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above)")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    built_cache = config.get_timing_cache() if cache_file else None
    if built_cache is not None:
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(bytes(built_cache.serialize()))
    return {
        "tensorrt_version": str(trt.__version__),
        **identity,
        "batch_profile": list(batch),
        "workspace_gib": workspace_gib,
        "timing_cache": cache_file.name if cache_file else None,
    }


def timing_cache_path(base: str | os.PathLike, version: str, identity: dict) -> Path:
    """One timing cache per TensorRT version and GPU architecture: tactics timed on one are meaningless on another."""
    base = Path(base)
    gpu = "".join(c if c.isalnum() else "-" for c in identity["gpu"]).strip("-")
    return base.with_name(
        f"{base.stem}-trt{version}-sm{identity['compute_capability'].replace('.', '')}-{gpu}{base.suffix}"
    )


def check_compatible(manifest: dict, path) -> None:
    """A plan runs only on the TensorRT version and GPU architecture it was built for."""
    trt = _import_trt()
    built = manifest.get("tensorrt_version")
    if built != str(trt.__version__):
        raise EngineError(
            f"{path} was built with TensorRT {built}, this machine has {trt.__version__}: rebuild it here with `lggdeploy build`"
        )
    here = gpu_identity()
    if manifest.get("compute_capability") != here["compute_capability"]:
        raise EngineError(
            f"{path} was built for compute capability {manifest.get('compute_capability')} ({manifest.get('gpu')}), "
            f"this GPU is {here['compute_capability']} ({here['gpu']}): rebuild it here"
        )


class TensorRTRunner(RunnerBase):
    """One engine, one execution context, device buffers grown on demand and reused. Not thread-safe: one per thread.

    Batches larger than the engine's optimization profile allows are split into chunks it accepts; a batch
    smaller than its minimum is refused (TensorRT would reject the shape, and padding would change nothing a
    caller could see but the time)."""

    def __init__(self, path, manifest: dict):
        trt = _import_trt()
        self.cudart = _cudart()
        check_compatible(manifest, path)
        self.trt = trt
        self.path = path
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{path}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if n != self.input)
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output)))
        lowest, _, highest = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.max_batch = int(lowest[0]), int(highest[0])
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self.owner = threading.get_ident()

    def _buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _check(self.cudart.cudaFree(pointer))
            pointer = _check(self.cudart.cudaMalloc(nbytes))
            self.buffers[name] = (pointer, nbytes)
        return pointer

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if threading.get_ident() != self.owner:
            raise EngineError("a TensorRTRunner is bound to the thread that created it: make one Segmenter per thread")
        batch = np.ascontiguousarray(batch, np.float32)
        if len(batch) < self.min_batch:
            raise EngineError(
                f"{self.path}: batch {len(batch)} is below the engine's optimization profile ({self.min_batch}..{self.max_batch}); rebuild with --min-batch {len(batch)}"
            )
        if len(batch) > self.max_batch:
            return np.concatenate(
                [self._infer(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            )
        return self._infer(batch)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        if not self.context.set_input_shape(self.input, tuple(batch.shape)):
            raise EngineError(
                f"{self.path}: TensorRT refused input shape {tuple(batch.shape)} (profile batch {self.min_batch}..{self.max_batch}, {self.engine.get_tensor_shape(self.input)})"
            )
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        if out_shape[0] != len(batch):
            raise EngineError(f"{self.path}: TensorRT reports output shape {out_shape} for a batch of {len(batch)}")
        out = np.empty(out_shape, self.out_dtype)
        d_in, d_out = self._buffer(self.input, batch.nbytes), self._buffer(self.output, out.nbytes)
        self.context.set_tensor_address(self.input, d_in)
        self.context.set_tensor_address(self.output, d_out)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(d_in, batch.ctypes.data, batch.nbytes, h2d, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise EngineError("TensorRT execution failed")
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        for pointer, _ in self.buffers.values():
            self.cudart.cudaFree(pointer)
        self.buffers.clear()
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = self.engine = self.runtime = None


def load(path, manifest: dict, options: RunOptions = RunOptions()) -> TensorRTRunner:
    """A plan runs on the GPU it was built for; `options.threads` does not apply (one Runner per thread)."""
    return TensorRTRunner(path, manifest)
