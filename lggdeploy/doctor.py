"""`lggdeploy doctor`: what this machine can build and run, and why not."""

from __future__ import annotations

from lggdeploy.backends import BACKENDS, availability
from lggdeploy.machine import machine_info


def report() -> dict:
    from lggdeploy.precision.int8 import recipe_for

    backends = []
    for name in BACKENDS:
        ok, detail = availability(name)
        backends.append({"backend": name, "usable": "yes" if ok else "no", "detail": detail})
    recipe = recipe_for("cpu")
    summary = f"{recipe.activation_type} activations / {recipe.weight_type} weights" + (", reduce_range" if recipe.reduce_range else "")
    return {"backends": backends, "machine": machine_info(), "int8_cpu_recipe": summary}
