"""`lggdeploy optimize` on a tiny ladder (phantom set, small model): skip, resume and the choice. No timing asserted."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lggdeploy import optimize as optimize_module
from lggdeploy.cli import app
from lggdeploy.common.errors import GateFailed, LggError, SearchStopped
from lggdeploy.engines.formats import read_manifest
from lggdeploy.engines.precision.criteria import FIDELITY, LABELS, rule_for
from lggdeploy.models.checkpoint import load_checkpoint
from lggdeploy.optimize import OptimizeOptions, optimize

LADDER = (("onnxruntime", "fp32"), ("onnxruntime", "int8"))


@pytest.fixture(scope="module")
def optimized(segmenting_run, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimized")
    opts = OptimizeOptions(
        out=out,
        data=phantom_dir,
        prune_ratios=(0.3,),
        prune_epochs=1,
        qat="off",
        calib_samples=8,
        batch=2,
        batch_sizes=(1, 2),
        iters=3,
        ladder=LADDER,
    )
    return optimize(segmenting_run.best_path, opts), opts


def test_the_ladder_is_gated_timed_and_the_fastest_passing_engine_chosen(optimized, segmenting_run):
    summary, opts = optimized
    candidates = summary["candidates"]
    assert [(c["model"], c["backend"], c["precision"]) for c in candidates] == [
        ("unpruned", "onnxruntime", "fp32"),
        ("unpruned", "onnxruntime", "int8"),
        ("pruned 30%", "onnxruntime", "fp32"),
        ("pruned 30%", "onnxruntime", "int8"),
    ]
    passed = [c for c in candidates if c["status"] == "passed"]
    assert passed and all(c["latency_ms_per_image"].keys() == {"1", "2"} for c in passed)
    chosen = summary["chosen"]
    assert chosen["latency_ms_per_image"]["2"] == min(c["latency_ms_per_image"]["2"] for c in passed)
    front = summary["front"]
    assert optimize_module.candidate_key(chosen) in front and chosen["engine"].endswith(
        chosen["engine_format"] + ".onnx"
    )
    for c in passed:  # every candidate spent one budget against the unpruned FP32 model, by the rule of its model
        gate = read_manifest(c["engine"])["gate"]
        assert gate["rule"] == rule_for(c["precision"], retrained=c["model"] != "unpruned") == c["judged_with"]["rule"]
        unpruned = gate.get("labels_reference") or gate["reference"]
        assert unpruned == str(segmenting_run.best_path) and gate["total_drop_points"] <= opts.max_drop
    pruned = read_manifest(candidates[2]["engine"]) if candidates[2]["engine"] else None
    if pruned:
        assert pruned["pruned"] and pruned["pruning"][-1]["distillation"]["teacher"] == str(segmenting_run.best_path)
    chosen_files = sorted(p.name for p in (opts.out / "chosen").iterdir())
    engine_name = chosen["engine"].split("/")[-1]
    assert engine_name in chosen_files and f"{engine_name}.json" in chosen_files
    record = read_manifest(opts.out / "chosen" / engine_name)["optimize"]
    assert record["batch"] == 2 and record["latency_ms_per_image"] == chosen["latency_ms_per_image"]
    assert record["judged_with"] == {
        "rule": rule_for(chosen["precision"], retrained=chosen["model"] != "unpruned"),
        "max_drop": 0.5,
        "max_patient_drop": 2.0,
        "min_agreement": 0.9,
        **({"calib_samples": 8, "qat": "off", "qat_epochs": 1} if chosen["precision"] == "int8" else {}),
    }
    written = json.loads(
        (opts.out / "chosen" / record["report"]).read_text()
    )  # paths inside --out relative to it, as in ladder.json
    assert written["paths"] == optimize_module.PATHS_RELATIVE and not written["chosen"]["engine"].startswith("/")
    assert (opts.out / written["chosen"]["engine"]).resolve() == Path(chosen["engine"]).resolve()
    assert (opts.out / "optimize.md").read_text().count("[chosen]") == 1 and (opts.out / "front.png").is_file()
    assert summary["pytorch_fp32_ms_per_image"].keys() == {"1", "2"} and summary["noise_floor"]["aa_ratios"]
    torch_test = summary["pytorch_fp32_test"]  # test drops against the unpruned PyTorch model on the same test patients
    test_patients = load_checkpoint(segmenting_run.best_path)["split"]["test"]
    assert torch_test["patients"] == len(test_patients) and torch_test["mean_patient_dice"] is not None
    for c in passed:
        assert c["test"]["patients"] == torch_test["patients"] and c["test"]["worst_patient"] in test_patients
        assert c["test"]["drop_points"] == pytest.approx(
            100 * (torch_test["mean_patient_dice"] - c["test"]["mean_patient_dice"]), abs=1e-9
        )
        assert c["test"]["worst_patient_drop_points"] >= c["test"]["drop_points"] - 1e-9
    assert "| test drop (pts): mean, worst patient |" in (opts.out / "optimize.md").read_text()


def test_the_test_drop_is_per_patient_against_the_reference():
    drop = optimize_module.drop_on_test(
        {"a": 0.8, "b": 0.6}, {"a": 0.7, "b": 0.65, "c": 0.9}
    )  # c: not scored by the reference
    assert drop == {
        "drop_points": pytest.approx(2.5),
        "worst_patient": "a",
        "worst_patient_drop_points": pytest.approx(10.0),
    }
    assert optimize_module.drop_on_test({}, {"a": 0.7}) == {}


@pytest.mark.slow
def test_a_second_run_reuses_everything(optimized, segmenting_run, monkeypatch):
    summary, opts = optimized

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a candidate the first run had built")

    def no_prune(*args, **kwargs):
        raise AssertionError("pruned again")

    monkeypatch.setattr(optimize_module, "_build", no_build)
    monkeypatch.setattr("lggdeploy.models.prune.prune_checkpoint", no_prune)
    again = optimize(segmenting_run.best_path, opts)
    assert [c["status"] for c in again["candidates"]] == [c["status"] for c in summary["candidates"]]
    assert all("reused" in c["reason"] for c in again["candidates"] if c["status"] == "passed")
    third = optimize(segmenting_run.best_path, opts)  # reused twice: still said once
    assert [c["reason"] for c in third["candidates"]] == [c["reason"] for c in again["candidates"]]


def test_a_pruned_model_fine_tuned_otherwise_is_not_reused(optimized, segmenting_run, monkeypatch):
    """A rerun that asks for another fine-tune must not take the first run's pruned model (nor its verdicts) for it."""
    summary, opts = optimized

    def no_work(*args, **kwargs):
        raise AssertionError("built or pruned before refusing")

    monkeypatch.setattr(optimize_module, "_build", no_work)
    monkeypatch.setattr("lggdeploy.models.prune.prune_checkpoint", no_work)
    for change in ({"prune_epochs": 10}, {"prune_lr": 3e-4}, {"distill": False}, {"distill_weight": 1.0}):
        with pytest.raises(LggError) as err:
            optimize(segmenting_run.best_path, dataclasses.replace(opts, **change))
        message = str(err.value)
        assert (
            "was fine-tuned with --prune-epochs 1 --prune-lr 0.0001 --distill --distill-weight 0.5;" in message
            and "choose another --out" in message
        )
    older = opts.out.parent / (opts.out.name + "-older")  # a done.json from before the weight was recorded: it was 0.5
    shutil.copytree(opts.out, older)
    done = older / "pruned" / "ratio30" / "done.json"
    record = json.loads(done.read_text())
    del record["finetune"]["distill_weight"]
    done.write_text(json.dumps(record))
    optimize_module.check_pruned_models(dataclasses.replace(opts, out=older))
    with pytest.raises(LggError, match="--distill-weight 0.5; this run asks for .*--distill-weight 0.9"):
        optimize_module.check_pruned_models(dataclasses.replace(opts, out=older, distill_weight=0.9))
    shutil.rmtree(older)
    assert [c["status"] for c in optimize(segmenting_run.best_path, opts)["candidates"]] == [
        c["status"] for c in summary["candidates"]
    ]


def test_a_moved_output_folder_is_reused_and_timed_from_where_it_now_lies(
    optimized, segmenting_run, tmp_path, monkeypatch
):
    """ladder.json keeps the paths inside --out relative to it: a copied or moved folder reuses its own engines."""
    summary, opts = optimized
    moved = tmp_path / "moved"
    shutil.copytree(opts.out, moved)
    stored = json.loads((moved / "ladder.json").read_text())["candidates"]
    assert all(not c["engine"] or c["engine"].startswith("engines/") for c in stored)

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a candidate the copied folder holds")

    monkeypatch.setattr(optimize_module, "_build", no_build)
    monkeypatch.setattr("lggdeploy.models.prune.prune_checkpoint", no_build)
    shutil.rmtree(opts.out / "engines")  # what the original folder held is gone: only the copy's files can serve
    try:
        again = optimize(segmenting_run.best_path, dataclasses.replace(opts, out=moved))
    finally:
        shutil.copytree(moved / "engines", opts.out / "engines")
    passed = [c for c in again["candidates"] if c["status"] == "passed"]
    assert [c["status"] for c in again["candidates"]] == [c["status"] for c in summary["candidates"]]
    assert passed and all(
        c["engine"].startswith(str(moved.resolve())) and c["latency_ms_per_image"].keys() == {"1", "2"} for c in passed
    )


def test_a_rung_whose_default_engine_format_changed_is_built_again(optimized, segmenting_run, tmp_path, monkeypatch):
    """A ladder saved when this rung's INT8 engine had another profile (as OpenVINO's did before its own profile) or
    before formats were recorded: that rung is built again in today's format; the FP32 rung before it is reused."""
    summary, opts = optimized
    assert [c["engine_format"] for c in summary["candidates"][:2]] == ["onnxruntime-fp32", "onnxruntime-int8-cpu"]

    class Rebuilt(Exception):
        pass

    def rebuild(checkpoint, reference, backend, precision, *args, **kwargs):
        raise Rebuilt(backend, precision)

    monkeypatch.setattr(optimize_module, "_build", rebuild)
    for saved_format in ("onnxruntime-int8-tensorrt", None):
        out = tmp_path / f"optimized-{saved_format}"
        shutil.copytree(opts.out, out)
        ladder = json.loads((out / "ladder.json").read_text())
        if saved_format:
            ladder["candidates"][1]["engine_format"] = saved_format
        else:  # saved before formats (and verdicts' criteria) were recorded: the FP32 rung is known by its engine file, a failed rung by nothing
            for c in ladder["candidates"]:
                del c["engine_format"], c["judged_with"]
            ladder["candidates"][1].update(status="failed gate", engine=None)
        (out / "ladder.json").write_text(json.dumps(ladder))
        rerun = dataclasses.replace(
            opts, out=out, max_drop=opts.max_drop if saved_format else 1.0
        )  # no record: its criteria are not known to differ
        with pytest.raises(Rebuilt) as rebuilt:  # the first build call: the FP32 rung was reused
            optimize(segmenting_run.best_path, rerun)
        assert rebuilt.value.args == ("onnxruntime", "int8")


def test_a_verdict_is_reused_only_under_the_criteria_it_was_reached_with(
    optimized, segmenting_run, tmp_path, monkeypatch
):
    """A rerun with a looser or stricter gate judges the FP32 rungs again from their stored per-patient rows (the same
    engine under any criteria) and builds the INT8 rungs again (their fallback and QAT depend on the criteria); other
    INT8 calibration or QAT settings only the INT8 rungs."""
    summary, opts = optimized
    saved = json.loads((opts.out / "ladder.json").read_text())["candidates"]
    assert saved[0]["judged_with"] == {"rule": FIDELITY, "max_drop": 0.5, "max_patient_drop": 2.0, "min_agreement": 0.9}
    assert saved[2]["judged_with"] == {**saved[0]["judged_with"], "rule": LABELS}  # the pruned model's FP32 rung
    assert saved[1]["judged_with"] == {**saved[0]["judged_with"], "calib_samples": 8, "qat": "off", "qat_epochs": 1}
    assert (
        saved[0]["status"] == "passed" and saved[0]["gate"]["min_agreement"] >= 0.95
    )  # so that it passes every gate below

    class Rebuilt(Exception):
        pass

    def rebuild(checkpoint, reference, backend, precision, build_opts, deadline=None, **kwargs):
        raise Rebuilt(precision, build_opts.max_drop, build_opts.min_agreement, build_opts.calib_samples)

    monkeypatch.setattr(optimize_module, "_build", rebuild)
    monkeypatch.setattr(
        "lggdeploy.models.prune.prune_checkpoint", rebuild
    )  # the pruned model is reused: its fine-tune did not change
    for change, first_rebuilt in (
        ({"max_drop": 5.0}, ("int8", 5.0, 0.9, 8)),
        ({"min_agreement": 0.95}, ("int8", 0.5, 0.95, 8)),
        ({"calib_samples": 16}, ("int8", 0.5, 0.9, 16)),
        ({"qat": "always"}, ("int8", 0.5, 0.9, 8)),
    ):
        out = tmp_path / "-".join(map(str, change.values()))
        shutil.copytree(opts.out, out)
        with pytest.raises(Rebuilt) as rebuilt:
            optimize(segmenting_run.best_path, dataclasses.replace(opts, out=out, **change))
        assert rebuilt.value.args == first_rebuilt, change
        fp32 = json.loads((out / "ladder.json").read_text())["candidates"][0]
        assert (
            fp32["status"] == "passed"
            and fp32["engine"]
            and fp32["judged_with"]
            == {**saved[0]["judged_with"], **{k: v for k, v in change.items() if k in fp32["judged_with"]}}
        )


def test_a_stricter_gate_fails_a_stored_fp32_verdict_from_its_rows_without_a_build(
    optimized, segmenting_run, tmp_path, monkeypatch
):
    """An FP32 rung whose stored per-patient rows fail the rerun's gate is failed without a build, and (its FP32 failing)
    the INT8 rung after it is skipped; a rung that failed before is built again under a looser gate (it wrote no engine)."""
    summary, opts = optimized
    built = []

    def rebuild(checkpoint, reference, backend, precision, build_opts, deadline=None, **kwargs):
        built.append((precision, build_opts.min_agreement))
        raise GateFailed("not built in this test", None)

    monkeypatch.setattr(optimize_module, "_build", rebuild)
    out = tmp_path / "stricter"
    shutil.copytree(opts.out, out)
    ladder = json.loads((out / "ladder.json").read_text())
    rows = ladder["candidates"][0]["gate"]["per_patient"]
    rows[0]["agreement"] = 0.93  # as if one val patient's masks had agreed less
    (out / "ladder.json").write_text(json.dumps(ladder))
    with pytest.raises(GateFailed, match="no candidate kept accuracy"):
        optimize(segmenting_run.best_path, dataclasses.replace(opts, out=out, prune_ratios=(), min_agreement=0.95))
    assert built == []
    fp32, int8 = json.loads((out / "ladder.json").read_text())["candidates"]
    assert (
        fp32["status"] == "failed gate"
        and f"patient {rows[0]['patient']}" in fp32["reason"]
        and "stored rows" in fp32["reason"]
    )
    assert (
        fp32["gate"]["passed"] is False and fp32["gate"]["criteria"]["min_agreement"] == 0.95 and fp32["engine"] is None
    )
    assert int8["status"] == "skipped"
    with pytest.raises(GateFailed):  # looser again: the failed rung has no engine to reuse, so it is built
        optimize(segmenting_run.best_path, dataclasses.replace(opts, out=out, prune_ratios=(), min_agreement=0.9))
    assert built[0] == ("fp32", 0.9)


def test_verdicts_reached_before_the_pruned_rules_are_judged_again(optimized, segmenting_run, tmp_path, monkeypatch):
    """A ladder saved when every rung was judged for fidelity to the unpruned model (no rule recorded, no detection
    flags): the unpruned rungs are reused as they are, the pruned FP32 rung is judged again from its stored rows by the
    labels rule (no build), and a pruned BF16 / INT8 rung would be built again (its fidelity to the pruned model was
    never measured)."""
    summary, opts = optimized
    out = tmp_path / "old-rules"
    shutil.copytree(opts.out, out)
    ladder = json.loads((out / "ladder.json").read_text())
    for c in ladder["candidates"]:
        c["judged_with"].pop("rule")
        for row in (c.get("gate") or {}).get("per_patient", []):
            row.pop("fp32_detected"), row.pop("engine_detected")
    (out / "ladder.json").write_text(json.dumps(ladder))
    pruned_fp32 = ladder["candidates"][2]
    assert pruned_fp32["status"] == "failed gate"  # one fine-tuning epoch: it lost the val patient

    def no_build(*args, **kwargs):
        raise AssertionError("nothing should be built")

    monkeypatch.setattr(optimize_module, "_build", no_build)
    optimize(segmenting_run.best_path, dataclasses.replace(opts, out=out))
    again = json.loads((out / "ladder.json").read_text())["candidates"]
    assert [c["status"] for c in again] == [c["status"] for c in ladder["candidates"]]
    assert again[0]["judged_with"]["rule"] == FIDELITY and again[0]["reason"].endswith("(reused)")
    assert again[2]["judged_with"]["rule"] == LABELS and again[2]["gate"]["rule"] == LABELS
    assert "judged again from stored rows with the labels rule" in again[2]["reason"]
    assert any("missed, which the unpruned FP32 model found" in f for f in again[2]["gate"]["failures"])
    old_bf16 = {**pruned_fp32, "precision": "bf16", "judged_with": ladder["candidates"][0]["judged_with"]}
    assert optimize_module._stored_result(old_bf16, optimize_module.judged_with(opts, "bf16", True), "bf16") is None


def test_engines_of_an_older_export_form_are_built_again(optimized, segmenting_run, tmp_path, monkeypatch):
    summary, opts = optimized
    out = tmp_path / "optimized"
    shutil.copytree(opts.out, out)
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["export_graph"] == optimize_module.EXPORT_GRAPH
    ladder["export_graph"] = 1  # written before smp's pyramid pooling was exported as bin means
    (out / "ladder.json").write_text(json.dumps(ladder))

    class Rebuilt(Exception):
        pass

    def rebuild(*args, **kwargs):
        raise Rebuilt

    monkeypatch.setattr(optimize_module, "_build", rebuild)
    with pytest.raises(Rebuilt):
        optimize(segmenting_run.best_path, dataclasses.replace(opts, out=out))


@pytest.mark.slow
def test_a_pruning_ratio_whose_fp32_fails_is_not_quantized_and_larger_ratios_are_not_pruned(
    segmenting_run, phantom_dir, tmp_path, monkeypatch
):
    from lggdeploy.models import prune

    built, pruned = [], []
    real_prune = prune.prune_checkpoint

    def counting_prune(checkpoint, ratio, *args, **kwargs):
        pruned.append(ratio)
        return real_prune(checkpoint, ratio, *args, **kwargs)

    monkeypatch.setattr(prune, "prune_checkpoint", counting_prune)
    real = optimize_module._build

    def pruned_fp32_fails(checkpoint, reference, backend, precision, opts, deadline=None, **kwargs):
        built.append((checkpoint != reference, precision))
        if checkpoint != reference:  # no drop at all on any val patient: the real build fails it (labels rule)
            opts = dataclasses.replace(opts, max_drop=0.0, max_patient_drop=0.0)
        return real(checkpoint, reference, backend, precision, opts, deadline, **kwargs)

    monkeypatch.setattr(optimize_module, "_build", pruned_fp32_fails)
    opts = OptimizeOptions(
        out=tmp_path,
        data=phantom_dir,
        prune_ratios=(0.5, 0.3),
        prune_epochs=1,
        qat="off",
        calib_samples=8,
        batch=1,
        batch_sizes=(1,),
        iters=2,
        ladder=LADDER,
    )
    summary = optimize(segmenting_run.best_path, opts)
    assert built == [(False, "fp32"), (False, "int8"), (True, "fp32")]  # the pruned int8 was never built
    assert pruned == [0.3]  # smallest ratio first; 50 % was never pruned once 30 % failed at FP32
    statuses = {(c["model"], c["precision"]): (c["status"], c["reason"]) for c in summary["candidates"]}
    assert statuses[("pruned 30%", "fp32")][0] == "failed gate"
    failed = next(c for c in summary["candidates"] if c["model"] == "pruned 30%" and c["precision"] == "fp32")
    gate = failed["gate"]  # the failed rung's figures are kept although no engine was written
    val = load_checkpoint(segmenting_run.best_path)["split"]["val"]
    assert (
        gate["passed"] is False
        and gate["criteria"]["max_patient_drop_points"] == 0.0
        and gate["reference"] == str(segmenting_run.best_path)
        and gate["rule"] == "labels"
    )
    assert gate["per_patient"] and all(row.keys() == set(optimize_module.PATIENT_FIELDS) for row in gate["per_patient"])
    assert sorted(row["patient"] for row in gate["per_patient"]) == sorted(val)
    assert any(" dropped " in f for f in gate["failures"]) and gate["worst_patient_drop_points"] > 0
    report = (tmp_path / "optimize.md").read_text()  # the table says why in full, below it
    assert f"pruned 30%, onnxruntime fp32: {'; '.join(gate['failures'])}  \n" in report and "| failed gate [" in report
    assert (
        "pruned 30%, onnxruntime int8 (cpu profile): its FP32 engine already fails the gate against the unpruned model  \n"
        in report
    )
    passed_gate = summary["candidates"][0]["gate"]
    assert passed_gate["passed"] and len(passed_gate["per_patient"]) == len(gate["per_patient"])
    assert statuses[("pruned 30%", "int8")] == (
        "skipped",
        "its FP32 engine already fails the gate against the unpruned model",
    )
    assert (
        statuses[("pruned 50%", "fp32")]
        == statuses[("pruned 50%", "int8")]
        == ("skipped", "pruning 30% already fails the gate at FP32")
    )
    saved = json.loads((tmp_path / "ladder.json").read_text())
    assert [c["status"] for c in saved["candidates"]] == [c["status"] for c in summary["candidates"]]


def test_bad_options_are_one_line(segmenting_run, tmp_path):
    runner = CliRunner()
    for args, message in (
        (["--prune-ratios", "1.5"], "1.5 must lie in (0, 1)"),
        (["--batch", "4"], "must be one of the timed batch sizes"),
        (["--prune-ratios", "a,b"], "give comma-separated floats"),
        (["--prune-lr", "0"], "--prune-lr 0.0: must lie in (0, 10]"),
        (["--distill-weight", "1.5"], "--distill-weight 1.5: must lie in (0, 1]"),
    ):
        result = runner.invoke(app, ["optimize", str(segmenting_run.best_path), "-o", str(tmp_path / "o"), *args])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    out = tmp_path / "other"  # a folder holding the ladder of another checkpoint, or of an earlier version of this one
    out.mkdir()
    for saved, message in (
        ({"checkpoint": "elsewhere/best.pt"}, "the optimization of elsewhere/best.pt, not"),
        (
            {"checkpoint": str(segmenting_run.best_path), "checkpoint_sha256": "0" * 64},
            "another version of it (its sha256 differs)",
        ),
    ):
        (out / "ladder.json").write_text(json.dumps({**saved, "candidates": []}))
        result = runner.invoke(app, ["optimize", str(segmenting_run.best_path), "-o", str(out)])
        assert (
            result.exit_code != 0
            and message in " ".join(result.output.split())
            and "choose another --out" in " ".join(result.output.split())
        )
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_candidate_stopped_by_the_budget_is_searched_again_by_a_rerun(
    segmenting_run, phantom_dir, tmp_path, monkeypatch
):
    """A failing INT8 search that --budget-minutes stopped is `stopped (budget)`, not `failed gate`: a rerun builds it again."""
    real = optimize_module._build
    calls = []

    def int8_runs_out_of_time(checkpoint, reference, backend, precision, opts, deadline=None, **kwargs):
        calls.append((precision, deadline is not None))
        if precision == "int8":
            raise SearchStopped(
                "onnxruntime-int8-cpu: --budget-minutes ran out during the INT8 fallback search (simulated)"
            )
        return real(checkpoint, reference, backend, precision, opts, deadline, **kwargs)

    monkeypatch.setattr(optimize_module, "_build", int8_runs_out_of_time)
    opts = OptimizeOptions(
        out=tmp_path,
        data=phantom_dir,
        prune_ratios=(),
        qat="off",
        calib_samples=8,
        batch=1,
        batch_sizes=(1,),
        iters=2,
        ladder=LADDER,
        budget_minutes=60,
    )
    summary = optimize(segmenting_run.best_path, opts)
    assert calls == [("fp32", True), ("int8", True)]  # the budget reaches the builds as a deadline
    assert [(c["precision"], c["status"]) for c in summary["candidates"]] == [
        ("fp32", "passed"),
        ("int8", "stopped (budget)"),
    ]
    assert summary["chosen"]["precision"] == "fp32"
    calls.clear()

    def int8_fails_this_time(checkpoint, reference, backend, precision, opts, deadline=None, **kwargs):
        calls.append((precision, deadline is not None))
        raise GateFailed("onnxruntime-int8-cpu: failed the accuracy gate (simulated)")

    monkeypatch.setattr(optimize_module, "_build", int8_fails_this_time)
    again = optimize(segmenting_run.best_path, opts)
    assert calls == [("int8", True)]  # FP32's pass is reused, the stopped INT8 is searched again
    assert [c["status"] for c in again["candidates"]] == ["passed", "failed gate"]


def test_a_probe_verdict_gives_up_only_well_beyond_the_noise():
    passed = {"unpruned openvino bf16": 10.0, "unpruned onnxruntime fp32": 20.0}
    assert optimize_module.probe_verdict(10.5, passed, 8) is None  # within the margin: it might still win
    assert optimize_module.probe_verdict(8.0, passed, 8) is None
    assert optimize_module.probe_verdict(5.0, {}, 8) is None  # nothing passed yet: nothing to beat
    why = optimize_module.probe_verdict(13.0, passed, 8)
    assert why.startswith(
        "fully quantized it ran at 13.0 ms/image at batch 8, 1.30× the time of unpruned openvino bf16, which passed (10.0 ms"
    )


def _int8_fails_post_training(real):
    """The real build, its INT8 gate asking for masks identical to the FP32 model's (a quantized engine's differ: asserted below)."""

    def build(checkpoint, reference, backend, precision, opts, deadline=None, **kwargs):
        if precision == "int8":
            opts = dataclasses.replace(opts, min_agreement=1.0)
        return real(checkpoint, reference, backend, precision, opts, deadline, **kwargs)

    return build


@pytest.mark.slow
def test_an_int8_rung_that_cannot_win_is_not_searched_and_a_rerun_keeps_the_verdict(
    segmenting_run, phantom_dir, tmp_path, monkeypatch
):
    """INT8 fails its gate fully quantized; the speed probe really opens and runs it beside the passed FP32 engine (its
    measured time is scaled here, no timing asserted): slower than the margin, neither the fallback nor QAT runs."""
    from lggdeploy.engines import build as build_module

    monkeypatch.setattr(optimize_module, "_build", _int8_fails_post_training(optimize_module._build))
    measured = []
    real_verdict = optimize_module.probe_verdict

    def slower(probe_ms, passed_ms, batch):
        measured.append((probe_ms, dict(passed_ms), batch))
        return real_verdict(probe_ms * 100, passed_ms, batch)

    def no_qat(*args, **kwargs):
        raise AssertionError("quantization-aware fine-tuning ran for an engine that cannot win")

    monkeypatch.setattr(optimize_module, "probe_verdict", slower)
    monkeypatch.setattr(build_module, "_quantization_aware", no_qat)
    opts = OptimizeOptions(
        out=tmp_path,
        data=phantom_dir,
        prune_ratios=(),
        qat="auto",
        calib_samples=8,
        batch=2,
        batch_sizes=(1, 2),
        iters=2,
        ladder=LADDER,
    )
    summary = optimize(segmenting_run.best_path, opts)
    [(probe_ms, passed_ms, batch)] = measured
    assert (
        probe_ms > 0
        and list(passed_ms) == ["unpruned onnxruntime fp32"]
        and passed_ms["unpruned onnxruntime fp32"] > 0
        and batch == 2
    )
    fp32, int8 = summary["candidates"]
    assert fp32["status"] == "passed" and int8["status"] == "cannot win" and int8["engine"] is None
    assert "not searched — fully quantized it ran at" in int8["reason"] and "only adds float work" in int8["reason"]
    assert (
        int8["reason"].endswith("no engine written") and int8["beaten_by"] == "unpruned|onnxruntime-fp32"
    )  # in full, and by whom
    assert (
        int8["gate"]["passed"] is False and int8["gate"]["min_agreement"] < 1
    )  # the real gate failed it, fully quantized
    assert not list((tmp_path / "engines").rglob("onnxruntime-int8-cpu.onnx"))
    report = (tmp_path / "optimize.md").read_text()  # the note says why: the probe, not the gate's lines
    assert (
        "| cannot win [1] |" in report
        and "[1] unpruned, onnxruntime int8 (cpu profile): " in report
        and "not searched — fully quantized" in report
    )

    def no_build(*args, **kwargs):
        raise AssertionError("a settled verdict was built again")

    monkeypatch.setattr(optimize_module, "_build", no_build)
    again = optimize(segmenting_run.best_path, opts)
    assert [c["status"] for c in again["candidates"]] == ["passed", "cannot win"] and again["candidates"][1][
        "reason"
    ].endswith("(reused)")
    shutil.copy(tmp_path / "ladder.json", tmp_path / "ladder.json.kept")

    built = []

    def searched(checkpoint, reference, backend, precision, build_opts, deadline=None, worth_searching=None):
        built.append((precision, worth_searching))
        raise GateFailed("not built in this test", None)

    monkeypatch.setattr(
        optimize_module, "_build", searched
    )  # a rerun without the engine that beat it: the rung is judged again
    with pytest.raises(GateFailed, match="no candidate kept accuracy"):
        optimize(segmenting_run.best_path, dataclasses.replace(opts, ladder=(("onnxruntime", "int8"),)))
    assert built == [("int8", None)]  # nothing passed in this run, so nothing to probe against: searched
    built.clear()
    kept = json.loads(
        (tmp_path / "ladder.json.kept").read_text()
    )  # beaten by an engine this run does not pass: probed again
    kept["candidates"][1]["beaten_by"] = "unpruned|openvino-bf16"
    (tmp_path / "ladder.json").write_text(json.dumps(kept))
    optimize(segmenting_run.best_path, opts)
    assert [(precision, probe is not None) for precision, probe in built] == [("int8", True)]
    built.clear()
    shutil.copy(tmp_path / "ladder.json.kept", tmp_path / "ladder.json")  # the ladder as the cannot-win run left it
    optimize(
        segmenting_run.best_path, dataclasses.replace(opts, search_all=True)
    )  # --search-all: searched, without a probe
    assert built == [("int8", None)]


@pytest.mark.slow
def test_an_int8_rung_that_might_win_is_searched(segmenting_run, phantom_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(optimize_module, "_build", _int8_fails_post_training(optimize_module._build))
    monkeypatch.setattr(optimize_module, "probe_verdict", lambda probe_ms, passed_ms, batch: None)
    opts = OptimizeOptions(
        out=tmp_path,
        data=phantom_dir,
        prune_ratios=(),
        qat="off",
        calib_samples=8,
        batch=1,
        batch_sizes=(1,),
        iters=2,
        ladder=LADDER,
    )
    summary = optimize(segmenting_run.best_path, opts)
    int8 = summary["candidates"][1]
    if int8["status"] == "passed":  # searched: the fallback kept nodes in float
        assert read_manifest(int8["engine"])["gate"]["nodes_kept_in_float"]
    else:
        assert (
            int8["status"] == "failed gate"
            and "node(s) kept in float" in int8["reason"]
            and "even with 0 node(s)" not in int8["reason"]
        )
