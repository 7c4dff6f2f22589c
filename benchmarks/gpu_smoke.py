"""The TensorRT runner's CUDA calls on a real GPU, with a stub engine (no TensorRT needed): cuda-python's
cudaMalloc / cudaMemcpyAsync / cudaStreamCreate / cudaGetDevice as TensorRTRunner makes them, buffers grown and
reused, a batch above the optimization profile split. The stub engine's "inference" is a device-to-device copy
of the first input channel, so the host result proves the round trip.

usage: python benchmarks/gpu_smoke.py OUT_JSON
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np

from lggdeploy.backends import tensorrt as trt_backend


def main() -> None:
    cudart = trt_backend._cudart()

    class Context:
        def __init__(self):
            self.shape, self.addresses = None, {}

        def set_input_shape(self, name, shape):
            if not 1 <= shape[0] <= 32:
                return False
            self.shape = shape
            return True

        def get_tensor_shape(self, name):
            return (self.shape[0], 1, *self.shape[2:]) if name == "logits" else self.shape

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = pointer
            return True

        def execute_async_v3(self, stream):
            n, _, h, w = self.shape
            plane = h * w * 4
            for i in range(n):  # the first channel of each image, device to device
                trt_backend._check(
                    cudart.cudaMemcpyAsync(
                        self.addresses["logits"] + i * plane,
                        self.addresses["input"] + i * 3 * plane,
                        plane,
                        cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                        stream,
                    )
                )
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("input", "logits")[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_shape(self, name):
            return (-1, 3, 64, 64)

        def get_tensor_profile_shape(self, name, index):
            return [(1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64)]

        def create_execution_context(self):
            return Context()

    identity = trt_backend.gpu_identity()
    stub = types.SimpleNamespace(
        __version__="10.16.0.72",
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=None: None}),
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda blob: Engine()),
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
        nptype=lambda dtype: np.float32,
    )
    trt_backend._import_trt = lambda: stub
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "stub.plan"
        plan.write_bytes(b"stub")
        runner = trt_backend.TensorRTRunner(plan, {"tensorrt_version": "10.16.0.72", **identity})
        results = {"gpu": identity}
        for n in (2, 8, 4, 64):
            x = np.random.default_rng(n).standard_normal((n, 3, 64, 64)).astype(np.float32)
            out = runner.infer(x)
            results[f"batch_{n}"] = bool(np.array_equal(out, x[:, :1]))
        results["buffers"] = {name: size for name, (_, size) in runner.buffers.items()}
        runner.close()
    Path(sys.argv[1]).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    assert all(v for k, v in results.items() if k.startswith("batch_")), results


if __name__ == "__main__":
    main()
