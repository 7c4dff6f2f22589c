"""The backend contract: every backend module implements it, and a backend from outside lggdeploy is its module plus
one row — build, the gate, the manifest, bench's discovery and the runtime then work with it unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from lggdeploy.backends.base import BACKENDS, CONTRACT, check_backend_module, register_backend
from lggdeploy.common.errors import BackendUnavailable


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_module_implements_the_contract(name):
    assert check_backend_module(name) == []
    module = __import__(BACKENDS[name].module, fromlist=["load"])
    for precision in BACKENDS[name].precisions:
        ok, reason = module.supports(precision)
        assert isinstance(ok, bool) and isinstance(reason, str)


def test_a_module_that_lacks_part_of_the_contract_is_named(monkeypatch):
    from lggdeploy.backends.base import BackendSpec

    monkeypatch.setitem(BACKENDS, "broken", BackendSpec("broken", "lggdeploy.backends.base", ".x", "cpu", ("fp32",)))
    assert check_backend_module("broken") == list(CONTRACT)  # base.py defines none of the four


@pytest.fixture()
def onethread_backend(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent / "plugins"))
    import onethread_backend

    monkeypatch.setitem(BACKENDS, "onethread", BACKENDS.get("onethread"))  # restored (removed) after the test
    register_backend(onethread_backend.SPEC)
    return onethread_backend


def test_a_new_backend_is_its_module_plus_one_row(onethread_backend, segmenting_run, phantom_dir, tmp_path):
    from lggdeploy.engines.build import BuildOptions, build_engines
    from lggdeploy.engines.formats import discover, open_engine, read_manifest, select_formats
    from lggdeploy.runtime import Segmenter

    assert [f.name for f in select_formats("onethread", "all")] == ["onethread-fp32"]
    with pytest.raises(Exception, match="has no int8 engines"):
        select_formats("onethread", "int8")
    report = build_engines(
        [segmenting_run.best_path], BuildOptions(out_dir=tmp_path, data=phantom_dir, backend="onethread")
    )
    (engine,) = [e["engine"] for e in report.engines]
    manifest = read_manifest(engine)
    assert manifest["backend"] == "onethread" and manifest["gate"]["passed"] and manifest["threads"] == 1
    assert discover(tmp_path) == [__import__("pathlib").Path(engine)]
    with open_engine(engine) as runner:  # the contract's context manager
        logits = runner.infer(np.zeros((2, 3, 128, 128), np.float32))
    assert logits.shape == (2, 1, 128, 128) and runner.closed
    masks = Segmenter.load(engine).predict(np.zeros((3, 256, 256, 3), np.uint8)).masks
    assert masks.shape == (3, 256, 256)


def test_a_backend_that_cannot_run_a_precision_here_is_refused_before_any_work(
    onethread_backend, monkeypatch, tmp_path
):
    from lggdeploy.engines.build import BuildOptions, build_engines

    monkeypatch.setattr(onethread_backend, "supports", lambda precision: (False, "not on this CPU"))
    with pytest.raises(BackendUnavailable, match="onethread-fp32: not on this CPU"):
        build_engines([tmp_path / "never-read.pt"], BuildOptions(out_dir=tmp_path, backend="onethread"))
