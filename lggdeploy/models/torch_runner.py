"""The PyTorch FP32 reference runner (the Runner protocol of lggdeploy.backends): what every engine is compared against."""

from __future__ import annotations

import numpy as np

from lggdeploy.common.errors import LggError


def resolve_device(name: str, local_rank: int = 0):
    """auto / cpu / cuda / cuda:N -> torch.device, or one clear line when it cannot be had here."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise LggError(f"--device {name} was asked for but no CUDA GPU is visible here; use --device cpu")
        index = local_rank if name == "cuda" else int(name[5:])
        if index >= torch.cuda.device_count():
            raise LggError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
        return torch.device(f"cuda:{index}")
    raise LggError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")


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


def load(path, device: str = "cpu", autocast_fp16: bool = False) -> TorchRunner:
    """The FP32 reference of a checkpoint (it describes itself: no manifest needed)."""
    from lggdeploy.models.checkpoint import load_checkpoint, model_from_checkpoint

    return TorchRunner(model_from_checkpoint(load_checkpoint(path)), device, autocast_fp16)
