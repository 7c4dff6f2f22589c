"""A retrained (pruned, fine-tuned) model is judged as the new model it is: its FP32 engine on labels against the
unpruned model, its quantized engines for fidelity to its own FP32 model and on labels against the unpruned one.

The gate-level tests use the real shared patients' masks: the "unpruned model" undersegments them (eroded masks, a
weaker model that still finds every tumor), the "retrained model" segments them better."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.engines.formats import read_manifest
from lggdeploy.engines.precision.criteria import (
    FIDELITY,
    LABELS,
    LABELS_TOTAL,
    RETRAINED_QUANTIZED,
    GateCriteria,
    rule_for,
)
from lggdeploy.engines.precision.gate import Outputs, Reference, RetrainedReference
from lggdeploy.models.checkpoint import load_checkpoint, save_checkpoint

PATIENTS = 4


@pytest.fixture(scope="module")
def val(real_data):
    dataset = load_dataset(real_data)
    slices = load_slices(dataset, sorted(dataset.patients)[:PATIENTS])
    assert all(slices.masks[slices.patients == p].any() for p in slices.patient_ids)  # every one has a tumor
    return slices


def outputs(masks: np.ndarray) -> Outputs:
    return Outputs(np.where(masks, 4.0, -4.0).astype(np.float32), masks.astype(bool))


def eroded(masks: np.ndarray, iterations: int) -> np.ndarray:
    return np.stack([ndimage.binary_erosion(m, iterations=iterations) for m in masks])


def reference(masks: np.ndarray, slices) -> Reference:
    return Reference(outputs(masks), slices, GateCriteria())


def test_the_rule_of_each_engine():
    assert rule_for("fp32", retrained=False) == rule_for("int8", retrained=False) == FIDELITY
    assert rule_for("fp32", retrained=True) == LABELS
    assert rule_for("bf16", retrained=True) == rule_for("int8", retrained=True) == RETRAINED_QUANTIZED


def test_a_retrained_but_better_model_passes_on_labels_and_fails_agreement(val):
    unpruned = reference(eroded(val.masks, 4), val)
    retrained = outputs(val.masks.copy())  # better on every patient, a different function
    assert not unpruned.judge(retrained).passed  # the fidelity rule would refuse it ...
    assert any("masks agree" in f for f in unpruned.judge(retrained).failures())
    result = RetrainedReference(unpruned, lambda: pytest.fail("FP32 needs no own reference"), "fp32").judge(retrained)
    assert result.rule == LABELS and result.passed, result.failures()  # ... the labels rule passes it
    assert result.drop_points < 0 and result.least_agreement["agreement"] < GateCriteria().min_agreement
    assert result.to_json()["min_agreement"] < 0.9  # agreement recorded beside the verdict, not judged


def test_a_retrained_model_that_loses_a_val_patient_fails(val):
    unpruned = reference(eroded(val.masks, 1), val)
    masks = val.masks.copy()
    lost = val.patient_ids[1]
    masks[val.patients == lost] = False
    loose = GateCriteria(max_drop=100, max_patient_drop=100)  # only the missed patient can fail it
    unpruned.criteria = loose
    result = RetrainedReference(unpruned, lambda: None, "fp32").judge(outputs(masks))
    assert not result.passed and result.missed == [lost]
    assert result.failures() == [f"val patient(s) {lost} missed, which the unpruned FP32 model found"]


def test_a_retrained_models_quantized_engine_is_judged_for_fidelity_to_its_own_fp32(val):
    unpruned = reference(eroded(val.masks, 4), val)
    own = reference(val.masks.copy(), val)
    judge = RetrainedReference(unpruned, lambda: own, "int8")
    as_weak_as_the_unpruned = judge.judge(outputs(eroded(val.masks, 4)))
    assert as_weak_as_the_unpruned.labels.passed  # no drop against the unpruned model ...
    assert not as_weak_as_the_unpruned.passed  # ... but it lost its own model's function
    assert all(not f.startswith("against the unpruned") for f in as_weak_as_the_unpruned.failures())
    faithful = judge.judge(outputs(val.masks.copy()))
    assert faithful.passed and faithful.rule_name == RETRAINED_QUANTIZED and faithful.labels.rule == LABELS_TOTAL
    assert faithful.total_drop_points == faithful.labels.drop_points < 0
    record = faithful.to_json()
    assert record["rule"] == RETRAINED_QUANTIZED and record["labels"]["rule"] == LABELS_TOTAL
    too_weak = RetrainedReference(reference(val.masks.copy(), val), lambda: own, "int8").judge(
        outputs(eroded(val.masks, 4))
    )
    assert any(f.startswith("against the unpruned model: mean drop") for f in too_weak.failures())


def shifted(run, path, shift: float) -> None:
    """A copy of the run's model with its head bias moved by `shift` (negative: it undersegments)."""
    ckpt = load_checkpoint(run.best_path)
    ckpt.pop("path")
    state = dict(ckpt["state_dict"])
    bias = next(k for k in state if k.startswith("segmentation_head") and k.endswith("bias"))
    state[bias] = state[bias] + shift
    save_checkpoint(path, dict(ckpt, state_dict=state))


def test_build_with_a_reference_judges_a_retrained_model_by_its_rules(segmenting_run, phantom_dir, tmp_path):
    """`build BETTER --reference WEAKER`: FP32 on labels against the weaker model, INT8 for fidelity to BETTER's own FP32
    model and on labels against the weaker one; the manifests say which rule judged each."""
    shifted(segmenting_run, tmp_path / "weaker.pt", -3.0)
    args = [
        "build",
        str(segmenting_run.best_path),
        "--data",
        str(phantom_dir),
        "--reference",
        str(tmp_path / "weaker.pt"),
    ]
    result = CliRunner().invoke(app, [*args, "--precision", "fp32", "-o", str(tmp_path / "e")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "labels" in result.output and "unpruned" in result.output  # the rule column and the drop against it
    extra = ["--precision", "int8", "--qat", "off", "--calib-samples", "8", "-o", str(tmp_path / "e")]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    fp32 = read_manifest(next((tmp_path / "e").rglob("onnxruntime-fp32.onnx")))["gate"]
    int8 = read_manifest(next((tmp_path / "e").rglob("onnxruntime-int8-cpu.onnx")))["gate"]
    assert fp32["rule"] == LABELS and fp32["reference"] == str(tmp_path / "weaker.pt") and fp32["passed"]
    assert int8["rule"] == RETRAINED_QUANTIZED and int8["reference"] == str(segmenting_run.best_path)
    assert int8["labels_reference"] == str(tmp_path / "weaker.pt") and int8["labels"]["rule"] == LABELS_TOTAL
    assert int8["labels"]["fp32_dice"] == pytest.approx(fp32["fp32_dice"])  # the weaker model's val Dice, both times
    assert int8["fp32_dice"] == pytest.approx(
        fp32["engine_dice"], abs=2e-3
    )  # its own FP32: what its FP32 engine scored
    assert int8["total_drop_points"] == int8["labels"]["drop_points"]
