"""`lggdeploy doctor`: what this machine can build and run, and why not."""

from __future__ import annotations

from lggdeploy.backends.base import BACKENDS, availability
from lggdeploy.common.machine import cpu_has_bf16, machine_info
from lggdeploy.engines.formats import all_formats
from lggdeploy.engines.precision.int8 import recipe_for


def report() -> dict:
    from lggdeploy.bench.run import torch_available

    backends = []
    for name in BACKENDS:
        ok, detail = availability(name)
        formats = ", ".join(f.name.removeprefix(name + "-") for f in all_formats() if f.backend == name)
        backends.append({"backend": name, "usable": "yes" if ok else "no", "formats": formats, "detail": detail})
    ok, detail = torch_available()
    backends.append(
        {
            "backend": "torch (FP32 reference, training)",
            "usable": "yes" if ok else "no",
            "formats": "checkpoints",
            "detail": detail,
        }
    )
    from lggdeploy.engines.precision.qat import modelopt_version

    version = modelopt_version()
    backends.append(
        {
            "backend": "nvidia-modelopt (INT8 QAT)",
            "usable": "yes" if version else "no",
            "formats": "QAT for int8",
            "detail": f"nvidia-modelopt {version}"
            if version
            else "not installed (pip install 'lggdeploy[qat]'); post-training INT8 still works",
        }
    )
    from lggdeploy.outline import INSTALL_HINT, densecrf_available

    crf = densecrf_available()
    backends.append(
        {
            "backend": "pydensecrf2 (outline post-processing)",
            "usable": "yes" if crf else "no",
            "formats": "post-processing +crf",
            "detail": "installed"
            if crf
            else f"not installed ({INSTALL_HINT}); engines whose rule redraws outlines "
            "are refused, training's auto needs it",
        }
    )
    backends.append(
        {
            "backend": "bf16 (OpenVINO)",
            "usable": "yes" if cpu_has_bf16() else "no",
            "formats": "openvino-bf16",
            "detail": "AVX512-BF16 or AMX present" if cpu_has_bf16() else "this CPU has neither AVX512-BF16 nor AMX",
        }
    )
    recipe = recipe_for("cpu")
    summary = f"{recipe.activation_type} activations / {recipe.weight_type} weights" + (
        ", reduce_range" if recipe.reduce_range else ""
    )
    return {"backends": backends, "machine": machine_info(), "int8_cpu_recipe": summary}
