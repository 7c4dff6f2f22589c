"""Shared fixtures: the real shared patients (skipped with a reason when absent), a phantom set, a tiny trained run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lggdeploy.data.kaggle import default_data_dir

SMALL_REAL_PATIENT = "TCGA_CS_4943_20000902"  # 20 slices


@pytest.fixture(scope="session")
def real_data() -> Path:
    path = default_data_dir()
    if path is None or not path.is_dir():
        pytest.skip(
            "real kaggle_3m patients not found: set LGG_DATA_DIR or place shared/data/kaggle_3m beside the checkout"
        )
    return path


@pytest.fixture()
def real_patient_copy(real_data, tmp_path) -> Path:
    """A writable kaggle_3m root holding one real patient."""
    root = tmp_path / "kaggle_3m"
    shutil.copytree(real_data / SMALL_REAL_PATIENT, root / SMALL_REAL_PATIENT)
    return root


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from lggdeploy.data.phantom import synthesize

    root = tmp_path_factory.mktemp("phantom") / "kaggle_3m"
    synthesize(root, patients=6, slices=(10, 14), seed=3)
    return root


@pytest.fixture(scope="session")
def trained_run(phantom_dir, tmp_path_factory):
    """pspnet-scratch trained 2 epochs at 64 px on the phantom set: exercises the whole training path."""
    from lggdeploy.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "pspnet-scratch"
    result = train(
        TrainConfig(
            model="pspnet-scratch", data=phantom_dir, out=out, epochs=2, batch_size=8, img_size=64, show_progress=False
        )
    )
    return result


@pytest.fixture(scope="session")
def segmenting_run(phantom_dir, tmp_path_factory):
    """pspnet-scratch trained until it really segments the phantom lesions: gates and parity need a model with Dice > 0."""
    from lggdeploy.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("segmenting") / "pspnet-scratch"
    # The recipe before today's defaults (pooled Dice, no oversampling, no warm-up, threshold 0.5, no post-processing, no missing-sequence
    # fill, fixed normalization): the gate, QAT and
    # bench tests are calibrated on this model's behaviour; tests/test_recipe.py exercises the defaults.
    # No post-processing either, so that the runtime and bench tests compare the network's masks themselves.
    legacy = dict(
        loss="dice",
        tumor_fraction=None,
        warmup_epochs=0.0,
        tune_threshold=False,
        postprocess="none",
        missing_modality=0.0,
        normalization="fixed",
    )
    # FP32 on every machine: `--precision auto` picks bf16 on AMX CPUs, and the INT8 and QAT tests are calibrated on
    # this model's exact behaviour, which must not depend on the CPU the suite runs on.
    result = train(
        TrainConfig(
            model="pspnet-scratch",
            data=phantom_dir,
            out=out,
            epochs=10,
            batch_size=8,
            img_size=128,
            lr=1e-3,
            show_progress=False,
            precision="fp32",
            **legacy,
        )
    )
    assert result.best["val_mean_patient_dice"] > 0.5, result.history
    return result


def manifest_for(engine, source_engine, **changes):
    """A manifest for a hand-made engine file: the source engine's manifest with `changes` and the new file's sha256."""
    from lggdeploy.common.files import sha256_file
    from lggdeploy.engines.formats import read_manifest, write_manifest

    manifest = read_manifest(source_engine)
    return write_manifest(engine, dict(manifest, **changes, sha256=sha256_file(engine)))


class BatchReader:
    """An ONNX Runtime calibration reader over a (N, C, H, W) array, one image per call."""

    def __init__(self, batch):
        self.items, self.position = [{"input": batch[i : i + 1]} for i in range(len(batch))], 0

    def get_next(self):
        self.position += 1
        return self.items[self.position - 1] if self.position <= len(self.items) else None

    def rewind(self):
        self.position = 0
