"""The package's shape (README "Design"): no import circle, arrows only point down the stage layers, and the
edge runtime stays torch-free. Every import counts, also the ones inside functions."""

import ast
import subprocess
import sys
from pathlib import Path

import lggdeploy

ROOT = Path(lggdeploy.__file__).parent
# Lowest first; a module may import its own layer and the layers below it, never one above.
LAYERS = [
    {"lggdeploy", "lggdeploy.common"},
    {"lggdeploy.metrics"},
    {"lggdeploy.data"},
    {"lggdeploy.scanner"},
    {"lggdeploy.scoring", "lggdeploy.postprocess", "lggdeploy.outline"},
    {"lggdeploy.backends"},
    {"lggdeploy.models"},
    {"lggdeploy.engines"},
    {"lggdeploy.runtime", "lggdeploy.serve"},
    {"lggdeploy.bench"},
    {
        "lggdeploy.cli",
        "lggdeploy.demo",
        "lggdeploy.doctor",
        "lggdeploy.train",
        "lggdeploy.evaluate",
        "lggdeploy.optimize",
        "lggdeploy.optimize_options",
    },
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every lggdeploy module a file imports, anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lggdeploy"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(
                    candidate
                    if (ROOT.parent / (candidate.replace(".", "/") + ".py")).is_file()
                    or (ROOT.parent / candidate.replace(".", "/")).is_dir()
                    else node.module
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lggdeploy"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in ROOT.rglob("*.py")}


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and to the README's design section"
    return best[0]


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == "lggdeploy" or nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_arrows_point_down_the_layers():
    wrong = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert wrong == []


def test_a_circle_is_found_when_there_is_one(monkeypatch):
    """The circle check itself can fail: feed it a two-module loop."""
    import pytest

    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: {"a": {"b"}, "b": {"a"}})
    with pytest.raises(AssertionError, match="import circle: a -> b -> a"):
        test_no_import_circle()


def test_runtime_and_cli_import_no_torch():
    code = (
        "import sys, lggdeploy.runtime, lggdeploy.runtime.predict, lggdeploy.cli, lggdeploy.engines.formats, lggdeploy.backends; "
        "import lggdeploy.scanner.predict, lggdeploy.scanner.outputs, highdicom, nibabel; "
        "import lggdeploy.serve.server, lggdeploy.serve.handlers, lggdeploy.serve.repository; "
        "print(sorted(m for m in ('torch', 'segmentation_models_pytorch', 'tensorrt', 'onnx') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )


def test_every_format_row_has_a_backend_module_that_builds_and_loads():
    from lggdeploy.engines.formats import FORMATS

    for fmt in FORMATS:
        module = fmt.module
        assert callable(module.is_available) and callable(module.build) and callable(module.load), fmt
        ok, reason = fmt.available()
        assert isinstance(ok, bool) and reason


def test_documented_python_api_paths():
    from lggdeploy.data.kaggle import check_dataset  # noqa: F401
    from lggdeploy.data.split import make_split  # noqa: F401
    from lggdeploy.evaluate import evaluate_checkpoint
    from lggdeploy.models.evaluate import evaluate_checkpoint as implementation
    from lggdeploy.runtime import Segmenter  # noqa: F401
    from lggdeploy.train import TrainConfig, train  # noqa: F401

    assert evaluate_checkpoint is implementation


def test_large_freed_tensors_stay_in_the_heap_after_keep_freed_memory():
    """eval's system time came from glibc mmapping and unmapping every large tensor; with keep_freed_memory a
    64 MB array comes from the heap, without it from an mmap."""
    import platform

    import pytest

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = """
import ctypes, sys, numpy as np
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = Info
if sys.argv[1] == "on":
    from lggdeploy.common.machine import keep_freed_memory
    assert keep_freed_memory()
block = np.ones(64 << 20, np.uint8)
print(libc.mallinfo2().hblkhd)
"""
    mapped = {
        mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout)
        for mode in ("off", "on")
    }
    assert mapped["off"] >= 64 << 20 and mapped["on"] < 64 << 20  # (blocks mapped at import time may remain)
