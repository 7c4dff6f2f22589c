"""Every TensorRT name the backend uses exists in TensorRT 10 and 11 (or in the version its guard names)."""

import ast
import json
import re
from pathlib import Path

import pytest

from lggdeploy.backends import tensorrt as tensorrt_backend
from lggdeploy.data.kaggle import default_data_dir

SOURCE = Path(tensorrt_backend.__file__).read_text()


def api_dir() -> Path:
    data = default_data_dir()
    candidates = [data.parent.parent / "tensorrt-api"] if data else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "tensorrt-api")
    for candidate in candidates:
        if (candidate / "trt10.json").is_file():
            return candidate
    pytest.skip("shared/tensorrt-api name lists not found beside the checkout")


def has(api: dict, dotted: str) -> bool:
    if "." not in dotted:
        return dotted in api["module_attributes"] or dotted in api["functions"] or dotted in api["classes"]
    cls, attr = dotted.rsplit(".", 1)
    seen, todo = set(), [cls]
    while todo:  # inherited members are listed on the base classes only
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if attr in api["classes"].get(name, []):
            return True
        todo.extend(api["bases"].get(name, []))
    return False


@pytest.mark.parametrize("version", ["10", "11"])
def test_every_used_name_exists_in_its_versions(version):
    api = json.loads((api_dir() / f"trt{version}.json").read_text())
    assert api["version"].startswith(version + ".")
    missing = [
        name for name, versions in tensorrt_backend.TRT_NAMES.items() if version in versions and not has(api, name)
    ]
    assert missing == []


def test_version_guarded_names_really_differ():
    trt10 = json.loads((api_dir() / "trt10.json").read_text())
    trt11 = json.loads((api_dir() / "trt11.json").read_text())
    for name, versions in tensorrt_backend.TRT_NAMES.items():
        if versions == ("10",):
            assert has(trt10, name)
    # the precision flags TensorRT 11 removed are never used: precision lives in the ONNX graph
    tree = ast.parse(SOURCE)
    identifiers = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
    }
    for removed in ("BuilderFlag", "int8_calibrator", "IInt8EntropyCalibrator2", "set_dynamic_range", "EXPLICIT_BATCH"):
        assert removed not in identifiers
    assert not has(trt11, "BuilderFlag.FP16") and has(trt10, "BuilderFlag.FP16")


def test_the_declared_list_covers_the_source():
    """No trt.X access and no method of a TensorRT object outside TRT_NAMES."""
    tree = ast.parse(SOURCE)
    module_attrs = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt"
    }
    declared_tops = {name.split(".")[0] for name in tensorrt_backend.TRT_NAMES}
    assert module_attrs <= declared_tops, module_attrs - declared_tops
    declared_members = {name.split(".")[-1] for name in tensorrt_backend.TRT_NAMES}
    trt_objects = r"\b(?:builder|network|parser|config|profile|cache|engine|context|runtime|self\.engine|self\.context|self\.runtime|e|trt\.\w+)\.(\w+)"
    used = set(re.findall(trt_objects, SOURCE))
    assert used <= declared_members | {"Logger", "WARNING", "INPUT", "STRONGLY_TYPED", "WORKSPACE"}, (
        used - declared_members
    )


def test_importing_lggdeploy_does_not_import_tensorrt():
    import subprocess
    import sys

    code = "import sys, lggdeploy, lggdeploy.backends, lggdeploy.engines.build, lggdeploy.cli; print('tensorrt' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_missing_tensorrt_is_a_clear_reason():
    ok, reason = tensorrt_backend.is_available()
    if ok:
        pytest.skip("TensorRT is installed here")
    assert "TensorRT" in reason or "cuda-python" in reason or "GPU" in reason
