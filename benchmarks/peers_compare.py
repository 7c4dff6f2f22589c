"""The field's CPU optimizers side by side with `lggdeploy optimize`: same FP32 ONNX, same val patients, same machine.

usage: bash benchmarks/peers_setup.sh     # benchmarks/runs/.venv-peers: NNCF + Olive beside .venv (no dependency)
       benchmarks/runs/.venv-peers/bin/python benchmarks/peers_compare.py OPTIMIZE_DIR --data DATA --out OUT

OPTIMIZE_DIR is a finished `lggdeploy optimize` run. Every peer starts from that run's unpruned ONNX Runtime FP32
engine (the project's parity-checked export) and calibrates on the 32 val slices `build` picks; every peer's accuracy
goal is the gate's mean: the mean per-patient val Dice (raw masks, the manifest's threshold) at most 0.5 points below
the FP32 model's. The peers, each as its documentation sets it up for a CPU:

- **OpenVINO BF16**: the FP32 ONNX read by OpenVINO, compiled with INFERENCE_PRECISION_HINT bf16 (CPUs with
  AVX512-BF16 or AMX only).
- **NNCF** `quantize_with_accuracy_control` (OpenVINO backend, max_drop 0.005 absolute, default preset): NNCF
  validates in f32; its output is timed with the float remainder in f32 and in bf16 (both scored), the faster one
  that keeps the goal on val is its best.
- **Microsoft Olive**: `OnnxStaticQuantization` over its own search space (format QDQ/QOperator, int8/uint8,
  per-channel, reduce-range, calibration MinMax/Entropy/Percentile, quantization pre-processing) under a TPE search
  of --olive-trials trials, with a custom metric: the same val Dice as the goal (`max-degradation` 0.005) and b8
  latency as the second objective. Every output that met the goal is listed; the fastest is its best.

Then every best output, optimize's chosen engine, ONNX Runtime FP32 and PyTorch eager FP32 are scored on val and
test (post-processed as the engine's manifest says, and raw) and timed at batch 1 and 8 interleaved in one run
(medians, with an A/A row of the chosen engine). Writes OUT/peers.json and OUT/peers.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from lggdeploy.backends.base import RunOptions
from lggdeploy.backends.onnxruntime import OnnxRuntimeRunner
from lggdeploy.backends.openvino import OpenVinoRunner
from lggdeploy.bench.run import interleaved_times
from lggdeploy.common.files import write_json_atomic, write_text_atomic
from lggdeploy.common.machine import cpu_has_bf16, cpu_line, machine_info
from lggdeploy.data.arrays import load_slices
from lggdeploy.data.kaggle import load_dataset
from lggdeploy.data.transforms import Normalization, logits_to_masks, preprocess
from lggdeploy.engines.formats import discover, open_engine, read_manifest
from lggdeploy.engines.precision.calibration import pick_calibration_slices
from lggdeploy.metrics import confusion_counts, summarize
from lggdeploy.postprocess import PostProcess
from lggdeploy.scoring import score_runner

MAX_DROP = 0.005  # the goal: 0.5 points of mean per-patient val Dice
CALIB = 32  # build's --calib-samples default
BATCHES = (1, 8)


# ---------------------------------------------------------------- the shared metric (also Olive's custom metric)


def mean_patient_dice(infer, x: np.ndarray, masks: np.ndarray, patients: np.ndarray, threshold: float) -> float:
    """The gate's metric: mean per-patient Dice of the raw masks, batches of 8."""
    predicted = np.concatenate([logits_to_masks(infer(x[i : i + 8]), threshold=threshold) for i in range(0, len(x), 8)])
    return float(summarize(confusion_counts(predicted, masks), patients)["aggregates"]["mean_patient_dice"])


@functools.lru_cache(maxsize=1)
def _val_arrays(npz: str):
    z = np.load(npz, allow_pickle=False)
    return z["x"], z["masks"], z["patients"], float(z["threshold"])


def olive_evaluate(model, device, execution_providers, npz: str, log: str):
    """Olive's custom metric: val mean per-patient Dice and b8 ms/image of the ONNX model Olive hands over."""
    x, masks, patients, threshold = _val_arrays(npz)
    runner = OnnxRuntimeRunner(model.model_path, ["CPUExecutionProvider"], RunOptions().cpu_threads())
    dice = mean_patient_dice(runner.infer, x, masks, patients, threshold)
    batch = x[:8]
    for _ in range(2):
        runner.infer(batch)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        runner.infer(batch)
        times.append(time.perf_counter() - t0)
    ms = 1000 * float(np.median(times)) / 8
    with open(log, "a") as f:
        f.write(json.dumps({"model_path": str(model.model_path), "val_dice": dice, "ms_per_image_b8": ms}) + "\n")
    return {"mean_patient_dice": dice, "ms_per_image_b8": ms}


def _register_olive_dataset():
    from olive.data.registry import Registry

    @Registry.register_dataset("lgg_calibration")
    def lgg_calibration(npz: str, **kwargs):
        import torch

        x = np.load(npz)["x"]
        return [({"input": torch.from_numpy(x[i])}, 0) for i in range(len(x))]


try:  # Olive imports this file as its user script
    _register_olive_dataset()
except ImportError:
    pass


# ---------------------------------------------------------------- the peers


def openvino_bf16(fp32_onnx: Path, threads: int) -> dict:
    if not cpu_has_bf16():
        return {"peer": "OpenVINO BF16", "status": "unavailable: this CPU has neither AVX512-BF16 nor AMX"}
    return {"peer": "OpenVINO BF16", "status": "ok", "outputs": [{"name": "OpenVINO BF16", "path": str(fp32_onnx),
            "kind": "openvino", "hint": "bf16", "seconds": 0.0}]}  # fmt: skip


def nncf_accuracy_control(fp32_onnx: Path, calib_x: np.ndarray, val: dict, out: Path) -> dict:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    x, masks, patients, threshold = val["x"], val["masks"], val["patients"], val["threshold"]

    def validate(compiled, _items) -> float:
        return mean_patient_dice(lambda b: compiled(b)[0], x, masks, patients, threshold)

    started = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        quantized = nncf.quantize_with_accuracy_control(
            model,
            calibration_dataset=nncf.Dataset([calib_x[i : i + 1] for i in range(len(calib_x))]),
            validation_dataset=nncf.Dataset([0]),  # validate() reads the val arrays itself, per patient
            validation_fn=validate,
            max_drop=MAX_DROP,
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(calib_x),
        )
    seconds = time.perf_counter() - started
    path = out / "nncf" / "model.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(path))
    hints = ["f32", "bf16"] if cpu_has_bf16() else ["f32"]
    return {"peer": "NNCF accuracy control", "status": "ok", "seconds": round(seconds, 1), "outputs": [
        {"name": f"NNCF INT8 ({hint} remainder)", "path": str(path), "kind": "openvino", "hint": hint,
         "seconds": round(seconds, 1)} for hint in hints]}  # fmt: skip


def _none_or(original, self, value):
    return None if value is None else original(self, value)


def _olive_custom_metric_workaround() -> None:
    """olive-ai 0.13 cannot serialize a run config with a custom metric (Metric's field serializers call model_dump() on
    the None backend and data config that its own validators leave for a custom metric); and a metric's user config is dumped as
    its declared base class, which loses evaluate_func). Here: None stays None, and configs are dumped as what they are
    (pydantic's serialize_as_any)."""
    import sys

    import pydantic
    from olive.common.config_utils import ConfigBase
    from olive.workflows.run.config import RunConfig  # noqa: F401  (every config class imported before the rebuild)

    models = {
        obj
        for name, module in list(sys.modules.items())
        if name.startswith("olive.")
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, pydantic.BaseModel) and obj.__module__.startswith("olive.")
    }
    for model in models:
        for serializer in model.__pydantic_decorators__.field_serializers.values():
            if not isinstance(serializer.func, functools.partial):
                serializer.func = functools.partial(_none_or, serializer.func)
    base_dump = ConfigBase.model_dump
    ConfigBase.model_dump = lambda self, **kw: base_dump(self, **({"serialize_as_any": True} | kw))
    for _ in range(4):  # nested configs embed their fields' schemas: rebuild until the outermost holds the new one
        for model in models:
            model.model_rebuild(force=True)


OLIVE_SEARCHED = ("quant_format", "precision", "activation_type", "per_channel", "reduce_range", "calibrate_method",
                  "quant_preprocess")  # fmt: skip


def olive_trial_settings(model_path: Path) -> dict:
    """What Olive's search chose for the trial that made `model_path` (its cache's runs/<id>/run.json)."""
    run = model_path.parent.parent / "run.json"
    if not run.is_file():
        return {}
    config = json.loads(run.read_text()).get("pass_config", {})
    return {k: config.get(k) for k in OLIVE_SEARCHED}


def olive_search(fp32_onnx: Path, calib_npz: Path, val_npz: Path, out: Path, trials: int, seed: int) -> dict:
    from olive.workflows import run as olive_run

    log = out / "olive" / "evaluations.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    script = str(Path(__file__).resolve())
    config = {
        "input_model": {"type": "ONNXModel", "model_path": str(fp32_onnx)},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [{"name": "calib", "type": "DataContainer", "user_script": script,
                          "load_dataset_config": {"type": "lgg_calibration", "params": {"npz": str(calib_npz)}},
                          "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": 1}}}],
        "evaluators": {"goal": {"type": "OnnxEvaluator", "metrics": [{
            "name": "val", "type": "custom",
            "sub_types": [
                {"name": "mean_patient_dice", "priority": 1, "higher_is_better": True,
                 "goal": {"type": "max-degradation", "value": MAX_DROP}},
                {"name": "ms_per_image_b8", "priority": 2, "higher_is_better": False},
            ],
            "user_config": {"user_script": script, "evaluate_func": "olive_evaluate",
                            "evaluate_func_kwargs": {"npz": str(val_npz), "log": str(log)}},
        }]}},
        "passes": {"quantization": {"type": "OnnxStaticQuantization", "data_config": "calib"}},
        "search_strategy": {"execution_order": "joint", "sampler": "tpe", "sampler_config": {"max_samples": trials, "seed": seed}},
        "evaluator": "goal",
        "host": "local",
        "target": "local",
        "cache_dir": str(out / "olive" / "cache"),
        "output_dir": str(out / "olive" / "output"),
        "log_severity_level": 3,
    }  # fmt: skip
    _olive_custom_metric_workaround()
    started = time.perf_counter()
    olive_run(config)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if not rows:
        return {"peer": "Olive", "status": "no evaluation ran", "seconds": round(seconds, 1), "outputs": []}
    base = rows[0]  # Olive evaluates the input model first (evaluate_input_model)
    trials_ = [r | {"settings": olive_trial_settings(Path(r["model_path"]))} for r in rows[1:]]
    passing = [r for r in trials_ if r["val_dice"] >= base["val_dice"] - MAX_DROP - 1e-12]
    record = {"peer": "Olive", "status": "ok" if passing else "nothing met the goal", "seconds": round(seconds, 1),
              "input_model": base, "trials": trials_, "outputs": []}  # fmt: skip
    if passing:
        best = min(passing, key=lambda r: r["ms_per_image_b8"])
        record["outputs"] = [{"name": "Olive INT8 (best passing trial)", "path": best["model_path"],
                              "kind": "onnxruntime", "seconds": round(seconds, 1)}]  # fmt: skip
    return record


# ---------------------------------------------------------------- scoring and timing, side by side


def open_output(o: dict, threads: int):
    if o["kind"] == "openvino":
        return OpenVinoRunner(o["path"], o["hint"], threads)
    return OnnxRuntimeRunner(o["path"], ["CPUExecutionProvider"], threads)


def score(runner, slices, size: int, norm: Normalization, threshold: float, post: PostProcess) -> dict:
    s = score_runner(runner, slices, size, norm, threshold=threshold, show_progress=False, postprocess=post)
    agg = s["aggregates"]
    return {
        "patients": len(slices.patient_ids),
        "mean_patient_dice": agg["mean_patient_dice"],
        "mean_patient_dice_raw": agg.get("mean_patient_dice_without_postprocess", agg["mean_patient_dice"]),
        "per_patient": {p["patient"]: p["dice"] for p in s["per_patient"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("optimize_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=20, help="timing rounds per batch size")
    parser.add_argument("--olive-trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers", default="openvino,nncf,olive")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((args.optimize_dir / "optimize.json").read_text())
    fp32_row = next(c for c in summary["candidates"]
                    if c["model"] == "unpruned" and c["backend"] == "onnxruntime" and c["precision"] == "fp32")  # fmt: skip
    fp32_onnx = (args.optimize_dir / fp32_row["engine"]).resolve()
    chosen_engine = discover(args.optimize_dir / "chosen")[0]
    manifest = read_manifest(fp32_onnx)
    size, threshold = manifest["img_size"], manifest["threshold"]
    norm = Normalization.from_json(manifest["normalization"])
    post = PostProcess.from_json(manifest.get("postprocess"))
    split = manifest["split"]
    dataset = load_dataset(args.data)
    val, test = load_slices(dataset, split["val"]), load_slices(dataset, split["test"])
    threads = RunOptions().cpu_threads()

    calib = pick_calibration_slices(val, CALIB)
    calib_x = preprocess(calib.images, size, norm)
    val_x = preprocess(val.images, size, norm)
    calib_npz, val_npz = args.out / "calib.npz", args.out / "val.npz"
    np.savez(calib_npz, x=calib_x)
    np.savez(val_npz, x=val_x, masks=val.masks, patients=val.patients, threshold=threshold)
    val_arrays = {"x": val_x, "masks": val.masks, "patients": val.patients, "threshold": threshold}

    peers = []
    wanted = args.peers.split(",")
    if "openvino" in wanted:
        peers.append(openvino_bf16(fp32_onnx, threads))
    if "nncf" in wanted:
        peers.append(nncf_accuracy_control(fp32_onnx, calib_x, val_arrays, args.out))
    if "olive" in wanted:
        peers.append(olive_search(fp32_onnx, calib_npz, val_npz, args.out, args.olive_trials, args.seed))
    for p in peers:
        print(json.dumps({k: v for k, v in p.items() if k != "trials"})[:2000], flush=True)

    import torch

    from lggdeploy.models.torch_runner import load as load_torch

    torch.set_num_threads(threads)
    checkpoint = Path(fp32_row["checkpoint"])
    checkpoint = checkpoint if checkpoint.is_absolute() else args.optimize_dir / checkpoint
    rows = [
        {"name": "PyTorch eager FP32", "runner": load_torch(checkpoint)},
        {"name": "ONNX Runtime FP32", "runner": open_engine(fp32_onnx)},
        {"name": f"lggdeploy optimize: {chosen_engine.name}", "runner": open_engine(chosen_engine)},
        {"name": "same, A/A", "runner": open_engine(chosen_engine), "twin": True},
    ]  # fmt: skip
    for p in peers:
        for o in p.get("outputs", []):
            rows.append(
                {"name": o["name"], "runner": open_output(o, threads), "peer": p["peer"], "seconds": o["seconds"]}
            )
    for r in rows:
        if r.get("twin"):
            continue
        r["val"] = score(r["runner"], val, size, norm, threshold, post)
        r["test"] = score(r["runner"], test, size, norm, threshold, post)
        print(
            r["name"], round(r["val"]["mean_patient_dice_raw"], 4), round(r["test"]["mean_patient_dice"], 4), flush=True
        )
    rng = np.random.default_rng(args.seed)
    for b in BATCHES:
        x = val_x[np.arange(b) % len(val_x)]
        for r in rows:
            for _ in range(3):
                r["runner"].infer(x)
        times = interleaved_times([functools.partial(r["runner"].infer, x) for r in rows], args.iters, rng)
        for r, seconds in zip(rows, times):
            r.setdefault("ms_per_image", {})[b] = 1000 * float(np.median(seconds)) / b
    write_report(args, rows, peers, fp32_onnx, chosen_engine)


def write_report(args, rows, peers, fp32_onnx: Path, chosen_engine: Path) -> None:
    by = {r["name"]: r for r in rows}
    torch_ms = by.get("PyTorch eager FP32", {}).get("ms_per_image", {})
    ort_ms = by["ONNX Runtime FP32"]["ms_per_image"]
    fp32 = by["ONNX Runtime FP32"]
    machine = machine_info()
    out_rows = []
    for r in rows:
        val, test = r.get("val"), r.get("test")
        out_rows.append({
            "name": r["name"], "peer": r.get("peer"), "optimizer_seconds": r.get("seconds"),
            "ms_per_image": r["ms_per_image"],
            "x_pytorch": {b: torch_ms[b] / r["ms_per_image"][b] for b in BATCHES} if torch_ms else None,
            "x_ort_fp32": {b: ort_ms[b] / r["ms_per_image"][b] for b in BATCHES},
            "val": val, "test": test,
            "val_drop_points_raw": 100 * (fp32["val"]["mean_patient_dice_raw"] - val["mean_patient_dice_raw"]) if val else None,
            "val_drop_points": 100 * (fp32["val"]["mean_patient_dice"] - val["mean_patient_dice"]) if val else None,
            "test_drop_points": 100 * (fp32["test"]["mean_patient_dice"] - test["mean_patient_dice"]) if test else None,
            "meets_goal_on_val": (100 * (fp32["val"]["mean_patient_dice_raw"] - val["mean_patient_dice_raw"]) <= 100 * MAX_DROP + 1e-9) if val else None,
        })  # fmt: skip
    record = {"date": dt.date.today().isoformat(), "optimize_dir": str(args.optimize_dir), "fp32_onnx": str(fp32_onnx),
              "chosen": str(chosen_engine), "machine": machine, "iters": args.iters, "rows": out_rows,
              "peers": peers}  # fmt: skip
    write_json_atomic(args.out / "peers.json", record)
    n_val, n_test = fp32["val"]["patients"], fp32["test"]["patients"]
    lines = [
        f"Peers beside `lggdeploy optimize` on {args.optimize_dir} — {cpu_line(machine['cpu'])}, {record['date']}; "
        f"n = {n_val} val / {n_test} test patients; ms per image, medians of {args.iters} interleaved rounds.",
        "",
        "| engine | optimizer s | val Dice raw (drop pts) | val Dice post-proc. | test Dice post-proc. (drop pts) | ms b1 | ms b8 | × PyTorch b1 / b8 | × ORT FP32 b1 / b8 | val goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out_rows:
        v, t = r["val"], r["test"]
        xp = f"{r['x_pytorch'][1]:.2f} / {r['x_pytorch'][8]:.2f}" if r["x_pytorch"] else "—"
        xo = f"{r['x_ort_fp32'][1]:.2f} / {r['x_ort_fp32'][8]:.2f}"
        cells = (
            f"{v['mean_patient_dice_raw']:.4f} ({-r['val_drop_points_raw']:+.2f})", f"{v['mean_patient_dice']:.4f}",
            f"{t['mean_patient_dice']:.4f} ({-r['test_drop_points']:+.2f})", "met" if r["meets_goal_on_val"] else "not met",
        ) if v else ("(A/A)", "", "", "")  # fmt: skip
        secs = "—" if r["optimizer_seconds"] is None else f"{r['optimizer_seconds']:.0f}"
        lines.append(
            f"| {r['name']} | {secs} | {cells[0]} | {cells[1]} | {cells[2]} | {r['ms_per_image'][1]:.2f} | "
            f"{r['ms_per_image'][8]:.2f} | {xp} | {xo} | {cells[3]} |"
        )
    for p in peers:
        if p.get("status") != "ok":
            lines.append(f"\n{p['peer']}: {p['status']}")
        if p["peer"] == "Olive" and p.get("trials"):
            lines += ["", f"Olive's trials (input model: val {p['input_model']['val_dice']:.4f}):", "",
                      "| trial | settings | val Dice raw | ms b8 (Olive's own timing) | goal |", "|---|---|---|---|---|"]  # fmt: skip
            for i, tr in enumerate(p["trials"], 1):
                ok = tr["val_dice"] >= p["input_model"]["val_dice"] - MAX_DROP - 1e-12
                settings = ", ".join(f"{k}={v}" for k, v in tr.get("settings", {}).items())
                lines.append(
                    f"| {i} | {settings} | {tr['val_dice']:.4f} | {tr['ms_per_image_b8']:.2f} | {'met' if ok else 'not met'} |"
                )
    write_text_atomic(args.out / "peers.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
