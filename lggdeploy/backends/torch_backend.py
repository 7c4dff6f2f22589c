"""The PyTorch FP32 reference runner: what every engine is compared against."""

from __future__ import annotations

import numpy as np


def is_available() -> tuple[bool, str]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False, "torch is not installed (pip install torch)"
    return True, "torch " + __import__("torch").__version__


class TorchRunner:
    def __init__(self, model, device: str = "cpu", autocast_fp16: bool = False):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.autocast_fp16 = autocast_fp16 and self.device.type == "cuda"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast_fp16):
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def load(path, manifest: dict | None = None, device: str = "cpu") -> TorchRunner:
    """`path` is a checkpoint; the manifest is not needed (the checkpoint describes itself)."""
    from lggdeploy.checkpoint import load_checkpoint, model_from_checkpoint

    return TorchRunner(model_from_checkpoint(load_checkpoint(path)), device)
