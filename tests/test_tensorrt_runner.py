"""The TensorRT runner against a stub `tensorrt` and a fake CUDA runtime that really copies bytes: buffer growth
and reuse, host<->device copies, thread binding and the optimization-profile range. No GPU needed."""

import ctypes
import threading
import types

import numpy as np
import pytest

from lggdeploy.backends import tensorrt as trt_backend
from lggdeploy.common.errors import EngineError


class FakeCudart:
    """cuda-python's runtime calls, on host memory: every call returns (error, value) as cuda-python does."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.memory: dict[int, ctypes.Array] = {}
        self.mallocs = self.frees = 0
        self.device = 1

    def cudaGetDevice(self):
        return 0, self.device

    def cudaGetDeviceCount(self):
        return 0, 2

    def cudaGetDeviceProperties(self, device):
        names = {0: b"GPU zero", 1: b"NVIDIA H100 80GB HBM3"}
        return 0, types.SimpleNamespace(name=names[device], major=9 if device else 8, minor=0)

    def cudaMalloc(self, nbytes):
        block = (ctypes.c_char * nbytes)()
        self.memory[ctypes.addressof(block)] = block
        self.mallocs += 1
        return 0, ctypes.addressof(block)

    def cudaFree(self, pointer):
        self.memory.pop(pointer)
        self.frees += 1
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaStreamDestroy(self, stream):
        return (0,)


class FakeContext:
    """Accepts shapes inside the profile only (as TensorRT does: set_input_shape returns False otherwise) and keeps
    the last accepted shape, so a runner that ignored the refusal would read the wrong output shape."""

    def __init__(self, engine):
        self.engine, self.shape, self.addresses, self.shapes_set = engine, None, {}, []

    def set_input_shape(self, name, shape):
        self.shapes_set.append(shape)
        if not self.engine.profile[0] <= shape[0] <= self.engine.profile[1]:
            return False
        self.shape = shape
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], 1, *self.shape[2:]) if name == "logits" else self.shape

    def set_tensor_address(self, name, pointer):
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream):
        n = int(np.prod(self.shape))
        source = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["input"])).reshape(self.shape)
        out = np.ctypeslib.as_array((ctypes.c_float * (n // 3)).from_address(self.addresses["logits"])).reshape(
            self.get_tensor_shape("logits")
        )
        out[:] = 2 * source[:, :1]  # "logits": twice the first channel
        return True


class FakeEngine:
    num_io_tensors = 2

    def __init__(self, profile=(1, 32), context_ok=True):
        self.profile, self.context_ok = profile, context_ok

    def get_tensor_name(self, i):
        return ("input", "logits")[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "input" else "OUTPUT"

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_shape(self, name):
        return (-1, 3, 8, 8)

    def get_tensor_profile_shape(self, name, index):
        return [(self.profile[0], 3, 8, 8), (8, 3, 8, 8), (self.profile[1], 3, 8, 8)]

    def create_execution_context(self):
        return FakeContext(self) if self.context_ok else None


def stub_tensorrt(engine):
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda blob: engine)
    return types.SimpleNamespace(
        __version__="10.16.0.72",
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None}),
        Runtime=lambda logger: runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
        nptype=lambda dtype: np.float32,
    )


@pytest.fixture()
def runner_for(monkeypatch, tmp_path):
    cudart = FakeCudart()
    plan = tmp_path / "tensorrt-fp32.plan"
    plan.write_bytes(b"plan")
    manifest = {"tensorrt_version": "10.16.0.72", "compute_capability": "9.0", "gpu": "NVIDIA H100 80GB HBM3"}

    def make(engine):
        monkeypatch.setattr(trt_backend, "_import_trt", lambda: stub_tensorrt(engine))
        monkeypatch.setattr(trt_backend, "_cudart", lambda: cudart)
        return trt_backend.TensorRTRunner(plan, manifest), cudart

    return make


def test_a_batch_above_the_profile_is_split_not_silently_wrong(runner_for):
    runner, _ = runner_for(FakeEngine(profile=(1, 32)))
    batch = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    out = runner.infer(batch)
    assert out.shape == (64, 1, 8, 8) and np.array_equal(out, 2 * batch[:, :1])
    assert runner.context.shapes_set == [(32, 3, 8, 8), (32, 3, 8, 8)]
    small = runner.infer(batch[:5])  # after a full profile, a smaller batch gets its own shape
    assert small.shape == (5, 1, 8, 8) and np.array_equal(small, 2 * batch[:5, :1])


def test_a_batch_below_the_profile_and_a_refused_shape_are_errors(runner_for):
    runner, _ = runner_for(FakeEngine(profile=(4, 32)))
    with pytest.raises(EngineError, match="batch 2 is below the engine's optimization profile \\(4..32\\)"):
        runner.infer(np.zeros((2, 3, 8, 8), np.float32))
    runner.context.set_input_shape = lambda name, shape: False
    with pytest.raises(EngineError, match="refused input shape"):
        runner.infer(np.zeros((8, 3, 8, 8), np.float32))


def test_device_buffers_grow_once_and_are_reused(runner_for):
    runner, cudart = runner_for(FakeEngine())
    for n in (2, 8, 4, 8, 1):
        x = np.full((n, 3, 8, 8), float(n), np.float32)
        assert np.array_equal(runner.infer(x), 2 * x[:, :1])
    assert cudart.mallocs == 4 and cudart.frees == 2  # input+output at 2, grown once at 8, reused for 4, 8 and 1
    runner.close()
    assert cudart.memory == {} and cudart.frees == 4


def test_the_runner_is_bound_to_its_thread(runner_for):
    runner, _ = runner_for(FakeEngine())
    errors = []
    thread = threading.Thread(
        target=lambda: errors.append(pytest.raises(EngineError, runner.infer, np.zeros((1, 3, 8, 8), np.float32)))
    )
    thread.start()
    thread.join()
    assert errors and "bound to the thread" in str(errors[0].value)


def test_no_execution_context_is_a_clear_error(runner_for):
    with pytest.raises(EngineError, match="could not create an execution context"):
        runner_for(FakeEngine(context_ok=False))


def test_gpu_identity_is_the_current_device_and_keys_the_timing_cache(runner_for, tmp_path):
    _, cudart = runner_for(FakeEngine())
    identity = trt_backend.gpu_identity()
    assert identity == {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}  # device 1, the current one, not 0
    path = trt_backend.timing_cache_path(tmp_path / "tensorrt.timing-cache", "10.16.0.72", identity)
    assert path.name == "tensorrt-trt10.16.0.72-sm90-NVIDIA-H100-80GB-HBM3.timing-cache"
    cudart.device = 0
    assert (
        trt_backend.timing_cache_path(tmp_path / "tensorrt.timing-cache", "11.1.0.106", trt_backend.gpu_identity())
        != path
    )
