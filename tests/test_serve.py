"""Serving on Triton: the request handlers against the Segmenter, the model repository for a stock Triton, the one-line
refusals; and (slow, with the serving venv's Python: LGG_SERVE_PYTHON or .venv-serve) a real tritonserver started by
`lggdeploy serve`, driven by tritonclient: answers, bad requests beside good traffic, SIGTERM, restart."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lggdeploy.cli import app
from lggdeploy.engines.build import BuildOptions, build_engines
from lggdeploy.engines.formats import open_engine, read_manifest
from lggdeploy.runtime import PostProcess, Segmenter
from lggdeploy.serve.handlers import BadRequest, EngineFacts, SliceHandler, VolumeHandler, pre
from lggdeploy.serve.repository import write_repository
from lggdeploy.serve.server import free_ports

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
runner = CliRunner()


@pytest.fixture(scope="module")
def engine(segmenting_run, phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_engine")
    built = build_engines([segmenting_run.best_path], BuildOptions(out_dir=out, data=phantom_dir, precision="fp32"))
    return Path(built.engines[0]["engine"])


@pytest.fixture(scope="module")
def slices(real_data):
    from scanner_fixtures import patient_slices

    return patient_slices(real_data, "TCGA_CS_4943_20000902")


def handlers(engine: Path, max_batch: int = 8):
    manifest = read_manifest(engine)
    facts = EngineFacts.from_manifest(manifest)
    run = open_engine(engine, manifest)
    return SliceHandler(run, facts, max_batch), VolumeHandler(run, facts), facts


def test_the_handlers_compute_what_the_segmenter_computes(engine, slices):
    slice_handler, volume_handler, facts = handlers(engine)
    with Segmenter.load(engine, threshold=0.05, postprocess=PostProcess()) as low:
        pass
    with Segmenter.load(engine, postprocess=PostProcess()) as plain, Segmenter.load(engine) as stored:
        out = slice_handler(slices[:8])
        expected = plain.predict(slices[:8])
        assert np.array_equal(out["masks"].astype(bool), expected.masks) and out["masks"].dtype == np.uint8
        assert np.allclose(out["probabilities"], expected.probabilities, atol=1e-6)
        volume = volume_handler(slices, np.array([0.9375, 0.9375, 5.5], np.float32))
        reference = stored.predict(slices).masks  # the manifest's post-processing, on the whole volume
        assert np.array_equal(volume["masks"].astype(bool), reference)
        assert volume["volume_ml"][0] == pytest.approx(reference.sum() * 0.9375**2 * 5.5 / 1000, rel=1e-6)
    assert low.threshold == 0.05 and facts.threshold == read_manifest(engine)["threshold"]


def test_bad_requests_are_refused_with_their_reason(engine, slices):
    slice_handler, volume_handler, _ = handlers(engine, max_batch=4)
    cases = [
        (slices[:2].astype(np.float32), "expected UINT8"),
        (slices[:2, :128], "expected shape [batch, 256, 256, 3]"),
        (slices[:0], "an empty batch"),
        (slices[:5], "above the maximum 4"),
    ]
    for bad, reason in cases:
        with pytest.raises(BadRequest, match=re.escape(reason)):
            slice_handler(bad)
    for spacing, reason in (([1, np.nan, 5], "finite positive"), ([1, 1, -5], "finite positive"), ([1, 1], "3 values")):
        with pytest.raises(BadRequest, match=reason):
            volume_handler(slices[:2], np.array(spacing, np.float32))


def test_one_dynamic_batch_answers_each_request_and_refuses_only_the_bad_one(engine, slices):
    """What the served slice model does with a dynamic batch (`SliceHandler.each`): the good requests through the
    engine together, answered as each would be alone; a bad one refused with its reason, failing no other."""
    slice_handler, _, _ = handlers(engine, max_batch=4)
    requests = [slices[:1], slices[2:4].astype(np.float32), slices[4:7], slices[:0], slices[7:8]]
    answers = slice_handler.each(requests)
    assert [type(a).__name__ for a in answers] == ["dict", "BadRequest", "dict", "BadRequest", "dict"]
    assert "expected UINT8" in str(answers[1]) and "an empty batch" in str(answers[3])
    for request, answer in zip(requests, answers):
        if isinstance(answer, dict):
            assert np.array_equal(answer["masks"], slice_handler(request)["masks"])
    assert slice_handler.each([slices[:3], slices[3:6]])[1]["masks"].shape == (3, 256, 256)  # 6 > 4: two engine calls


def test_triton_repo_writes_one_model_per_stage_with_the_engines_facts(engine, tmp_path):
    names = write_repository([engine], tmp_path / "repo")
    preset = read_manifest(engine)["model"]["name"]
    assert names == [f"{preset}-{m}" for m in ("engine", "pre", "post", "slice", "volume")]
    repo = tmp_path / "repo"
    assert (repo / f"{preset}-engine" / "1" / "model.onnx").read_bytes() == engine.read_bytes()
    for name in names:
        config = (repo / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config and read_manifest(engine)["sha256"] in config
    assert 'platform: "ensemble"' in (repo / f"{preset}-slice" / "config.pbtxt").read_text()
    assert "from lggdeploy.serve.handlers import" in (repo / f"{preset}-pre" / "1" / "model.py").read_text()
    again = runner.invoke(app, ["triton-repo", str(engine), "-o", str(repo)])
    assert again.exit_code == 2 and "not empty" in again.output and "Traceback" not in again.output
    assert "max_queue_delay_microseconds: 0\n" in (repo / f"{preset}-engine" / "config.pbtxt").read_text()
    delayed = runner.invoke(
        app, ["triton-repo", str(engine), "-o", str(tmp_path / "r2"), "--max-queue-delay-us", "250"]
    )
    assert delayed.exit_code == 0, delayed.output
    assert "max_queue_delay_microseconds: 250\n" in (tmp_path / "r2" / f"{preset}-engine" / "config.pbtxt").read_text()


def tampered(engine: Path, folder: Path) -> Path:
    folder.mkdir()
    copy = folder / engine.name
    copy.write_bytes(engine.read_bytes() + b"\0")
    (folder / (engine.name + ".json")).write_text((engine.parent / (engine.name + ".json")).read_text())
    return copy


def test_serve_refuses_in_one_line_before_starting(engine, tmp_path):
    result = runner.invoke(app, ["serve", str(tampered(engine, tmp_path / "t"))])
    assert (
        result.exit_code == 2 and "is not the engine its manifest" in result.output and "Traceback" not in result.output
    )
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", str(engine), "--http-port", str(port)])
        assert result.exit_code == 2 and f"--http-port {port} is already in use" in result.output
    same = runner.invoke(app, ["serve", str(engine), "--http-port", "9000", "--grpc-port", "9000"])
    assert same.exit_code == 2 and "must differ" in same.output
    result = runner.invoke(app, ["triton-repo", str(tampered(engine, tmp_path / "u")), "-o", str(tmp_path / "r")])
    assert result.exit_code == 2 and "is not the engine its manifest" in result.output


# --- a real server (the serving venv) -------------------------------------------------------------------------------


def serve_python() -> Path:
    path = Path(os.environ.get("LGG_SERVE_PYTHON") or ROOT / ".venv-serve" / "bin" / "python")
    if not path.is_file():
        pytest.skip("no serving venv: `make install-serve` (or LGG_SERVE_PYTHON) — `make test-slow` makes it")
    return path


class Server:
    """`lggdeploy serve` in the serving venv; ready when Triton and its three models are."""

    def __init__(self, engine: Path, log: Path, *flags: str):
        self.models = [f"{read_manifest(engine)['model']['name']}-{m}" for m in ("slice", "volume", "info")]
        self.http, self.grpc, self.metrics = free_ports(3)
        python = serve_python()
        cmd = [str(python.parent / "lggdeploy"), "serve", str(engine)]
        cmd += [
            "--http-port",
            str(self.http),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
            *flags,
        ]
        self.log = open(log, "w")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not become ready: {log.read_text()[-2000:]}")
            time.sleep(0.5)

    def ready(self) -> bool:
        urls = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self.models)]
        try:
            for url in urls:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{url}", timeout=2) as r:
                    if r.status != 200:
                        return False
            return True
        except OSError:
            return False

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=90)
        self.log.close()
        return code


def client(job: dict, tmp_path: Path, name: str, inputs: dict, background: bool = False):
    np.savez(tmp_path / f"{name}-in.npz", **inputs)
    job = {**job, "inputs": str(tmp_path / f"{name}-in.npz"), "out": str(tmp_path / name)}
    (tmp_path / f"{name}.job.json").write_text(json.dumps(job))
    command = [str(serve_python()), str(HERE / "serve_client.py"), str(tmp_path / f"{name}.job.json")]
    if background:
        return subprocess.Popen(command)
    subprocess.run(command, check=True, timeout=300)
    return result_of(tmp_path, name)


def result_of(tmp_path: Path, name: str):
    report = json.loads((tmp_path / f"{name}.json").read_text())
    answers = dict(np.load(tmp_path / f"{name}.npz")) if (tmp_path / f"{name}.npz").is_file() else {}
    return report, answers


@pytest.mark.slow
def test_serve_answers_as_the_segmenter_refuses_bad_requests_beside_good_traffic_and_stops_on_sigterm(
    engine, slices, tmp_path
):
    preset = read_manifest(engine)["model"]["name"]
    server = Server(engine, tmp_path / "serve.log", "--probabilities")
    try:
        url = f"127.0.0.1:{server.http}"
        report, out = client(
            {"url": url, "model": f"{preset}-slice", "outputs": ["masks", "probabilities"], "mode": "once"},
            tmp_path,
            "slice",
            {"slices": slices[:6]},
        )
        assert report["errors"] == []
        with Segmenter.load(engine, postprocess=PostProcess()) as plain, Segmenter.load(engine) as stored:
            expected = plain.predict(slices[:6])
            assert np.array_equal(out["masks"].astype(bool), expected.masks)
            assert np.allclose(out["probabilities"], expected.probabilities, atol=1e-6)
            spacing = np.array([0.9375, 0.9375, 5.5], np.float32)
            report, vol = client(
                {
                    "url": f"127.0.0.1:{server.grpc}",
                    "protocol": "grpc",
                    "model": f"{preset}-volume",
                    "outputs": ["masks", "volume_ml"],
                    "mode": "once",
                },
                tmp_path,
                "volume",
                {"volume": slices, "spacing_mm": spacing},
            )
            expected = stored.predict(slices).masks
            assert report["errors"] == [] and np.array_equal(vol["masks"].astype(bool), expected)
            assert vol["volume_ml"][0] == pytest.approx(expected.sum() * float(np.prod(spacing)) / 1000, rel=1e-5)
        report, info = client(
            {"url": url, "model": f"{preset}-info", "outputs": ["engine"], "mode": "once"},
            tmp_path,
            "info",
            {"request": np.zeros(1, np.uint8)},
        )
        assert json.loads(info["engine"][0])["engine_sha256"] == read_manifest(engine)["sha256"]
        good = client(
            {
                "url": url,
                "model": f"{preset}-slice",
                "outputs": ["masks"],
                "mode": "load",
                "concurrency": 4,
                "requests": 6,
            },
            tmp_path,
            "good",
            {"slices": slices[:1]},
            background=True,
        )
        bad_inputs = {
            "dtype": {"slices": slices[:2].astype(np.float32)},
            "shape": {"slices": slices[:2, :128]},
            "batch": {"slices": np.repeat(slices[:1], 9, axis=0)},
        }
        for name, inputs in bad_inputs.items():
            report, _ = client(
                {"url": url, "model": f"{preset}-slice", "outputs": ["masks"], "mode": "once"}, tmp_path, name, inputs
            )
            assert report["errors"], name
        report, _ = client(
            {"url": url, "model": f"{preset}-volume", "outputs": ["masks"], "mode": "once"},
            tmp_path,
            "nan",
            {"volume": slices[:2], "spacing_mm": np.array([1, np.nan, 5], np.float32)},
        )
        assert report["errors"] and "spacing_mm: expected finite positive" in report["errors"][0]
        assert "Traceback" not in report["errors"][0] and "400" in report["errors"][0]  # one line, a client error
        with socket.create_connection(("127.0.0.1", server.http)) as gone:  # a client that disconnects mid-request
            head = f"POST /v2/models/{preset}-slice/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
            gone.sendall(head.encode() + b'{"inputs": [')
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=5) as r:
            assert b"nv_inference_request_success" in r.read()  # Triton's Prometheus metrics
        assert good.wait(timeout=300) == 0
        report, _ = result_of(tmp_path, "good")
        assert report["errors"] == [] and len(report["latencies_ms"]) == 24  # no good request failed
        assert server.ready()
        burst = client(  # a burst far above the queue while SIGTERM comes: nothing crashes, clients get errors
            {
                "url": url,
                "model": f"{preset}-slice",
                "outputs": ["masks"],
                "mode": "load",
                "concurrency": 16,
                "requests": 20,
            },
            tmp_path,
            "burst",
            {"slices": slices[:8]},
            background=True,
        )
        time.sleep(3)
    finally:
        code = server.stop()
    assert code == 143
    assert burst.wait(timeout=300) == 0
    report, _ = result_of(tmp_path, "burst")
    assert report["errors"] and len(report["latencies_ms"]) + len(report["errors"]) == 16 * 20
    again = Server(engine, tmp_path / "again.log")  # a restart serves again
    try:
        report, _ = client(
            {"url": f"127.0.0.1:{again.http}", "model": f"{preset}-slice", "outputs": ["masks"], "mode": "once"},
            tmp_path,
            "again",
            {"slices": slices[:1]},
        )
        assert report["errors"] == []
    finally:
        assert again.stop() == 143


@pytest.mark.slow
def test_triton_repo_configs_parse_with_tritons_own_schema(engine, tmp_path):
    write_repository([engine], tmp_path / "repo")
    code = (
        "import sys, pathlib; from google.protobuf import text_format; "
        "from tritonclient.grpc import model_config_pb2 as pb; "
        "[print(text_format.Parse(p.read_text(), pb.ModelConfig()).name) for p in sorted(pathlib.Path(sys.argv[1]).glob('*/config.pbtxt'))]"
    )
    out = subprocess.run(
        [str(serve_python()), "-c", code, str(tmp_path / "repo")], capture_output=True, text=True, check=True
    )
    preset = read_manifest(engine)["model"]["name"]
    assert out.stdout.split() == sorted(f"{preset}-{m}" for m in ("engine", "post", "pre", "slice", "volume"))


ENGINE_STAND_IN = '''"""Stands in for Triton's ONNX Runtime backend, which PyTriton's tritonserver lacks: the same engine file, the same
tensors, so that the ensemble and its pre/post models run as a stock Triton runs them."""
import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from lggdeploy.engines.formats import open_engine, read_manifest


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        engine = Path(config["parameters"]["engine_file"]["string_value"])
        self.runner = open_engine(engine, read_manifest(engine))
        self.input, self.output = config["input"][0]["name"], config["output"][0]["name"]
        self.dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(
                self.output, self.runner.infer(pb_utils.get_input_tensor_by_name(r, self.input).as_numpy()).astype(self.dtype)
            )])
            for r in requests
        ]
'''

LAUNCH = (
    "import signal, sys; from pathlib import Path; "
    "from lggdeploy.serve.server import ServeOptions, find_tritonserver, run_tritonserver; "
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); "
    "ports = dict(zip(('http_port', 'grpc_port', 'metrics_port'), map(int, sys.argv[2:5]))); "
    "run_tritonserver(find_tritonserver(), Path(sys.argv[1]), sys.argv[5:], ServeOptions(**ports), lambda: None)"
)


@pytest.mark.slow
def test_the_repositorys_models_and_ensemble_run_under_the_bundled_tritonserver(engine, slices, tmp_path):
    """PyTriton's tritonserver carries only the Python backend: the repository's pre, post and volume models run on it
    as written, and the ensemble `<preset>-slice` (pre -> engine -> post) with a Python model in the engine's place
    (same file, same tensors); they answer what the handlers answer, and a bad value is one line."""
    import shutil

    names = write_repository([engine], tmp_path / "repo")
    preset = read_manifest(engine)["model"]["name"]
    stand_in = tmp_path / "repo" / f"{preset}-engine"
    config = (stand_in / "config.pbtxt").read_text()
    config = re.sub(r'backend: "\w+"\ndefault_model_filename: "[^"]+"\n', 'backend: "python"\n', config)
    config += f'parameters {{\n  key: "engine_file"\n  value: {{ string_value: {json.dumps(str(engine))} }}\n}}\n'
    (stand_in / "config.pbtxt").write_text(config)
    shutil.rmtree(stand_in / "1")
    (stand_in / "1").mkdir()
    (stand_in / "1" / "model.py").write_text(ENGINE_STAND_IN)
    http, grpc, metrics = free_ports(3)
    command = [str(serve_python()), "-c", LAUNCH, str(tmp_path / "repo"), str(http), str(grpc), str(metrics), *names]
    log = open(tmp_path / "tritonserver.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                for model in names:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/{model}/ready", timeout=2):
                        pass
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "tritonserver.log"
                ).read_text()[-3000:]
                time.sleep(0.5)
        slice_handler, volume_handler, facts = handlers(engine)
        url = f"127.0.0.1:{http}"
        x = slices[:4]
        report, out = client(
            {"url": url, "model": f"{preset}-pre", "outputs": ["input"], "mode": "once"}, tmp_path, "pre", {"slices": x}
        )
        assert report["errors"] == [] and np.allclose(out["input"], pre(x, facts))
        logits = slice_handler.runner.infer(out["input"]).astype(np.float32)
        report, out = client(
            {"url": url, "model": f"{preset}-post", "outputs": ["masks"], "mode": "once"},
            tmp_path,
            "post",
            {"logits": logits},
        )
        assert report["errors"] == [] and np.array_equal(out["masks"], slice_handler(x)["masks"])
        report, out = client(
            {"url": url, "model": f"{preset}-slice", "outputs": ["masks", "probabilities"], "mode": "once"},
            tmp_path,
            "ensemble",
            {"slices": x},
        )
        expected = slice_handler(x)
        assert report["errors"] == [] and np.array_equal(out["masks"], expected["masks"])
        assert np.allclose(out["probabilities"], expected["probabilities"], atol=1e-6)
        spacing = np.array([0.9375, 0.9375, 5.5], np.float32)
        report, out = client(
            {"url": url, "model": f"{preset}-volume", "outputs": ["masks", "volume_ml"], "mode": "once"},
            tmp_path,
            "vol",
            {"volume": slices, "spacing_mm": spacing},
        )
        expected = volume_handler(slices, spacing)
        assert report["errors"] == [] and np.array_equal(out["masks"], expected["masks"])
        report, _ = client(
            {"url": url, "model": f"{preset}-volume", "outputs": ["masks"], "mode": "once"},
            tmp_path,
            "nan",
            {"volume": x, "spacing_mm": np.array([1, np.nan, 5], np.float32)},
        )
        error = report["errors"][0]
        assert "[400] spacing_mm: expected finite positive millimetres" in error and "Traceback" not in error
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=90) == 143
        log.close()


@pytest.mark.slow
def test_serve_refuses_an_engine_its_environment_cannot_run(segmenting_run, phantom_dir, tmp_path):
    """The serving venv has no OpenVINO: an OpenVINO engine is refused in one line before tritonserver starts."""
    python = serve_python()
    if subprocess.run([str(python), "-c", "import openvino"], capture_output=True).returncode == 0:
        pytest.skip("the serving venv has OpenVINO")
    built = build_engines(
        [segmenting_run.best_path],
        BuildOptions(out_dir=tmp_path, data=phantom_dir, backend="openvino", precision="fp32"),
    )
    http, grpc, metrics = free_ports(3)
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    result = subprocess.run(
        [str(python.parent / "lggdeploy"), "serve", built.engines[0]["engine"], *ports],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "openvino" in result.stderr and "this environment" in result.stderr and "Traceback" not in result.stderr


def test_serve_needs_the_serve_extra_in_its_own_environment(engine):
    try:
        import pytriton  # noqa: F401
    except ImportError:
        result = runner.invoke(
            app,
            [
                "serve",
                str(engine),
                "--http-port",
                str(free_ports(1)[0]),
                "--grpc-port",
                str(free_ports(1)[0]),
                "--metrics-port",
                str(free_ports(1)[0]),
            ],
        )
        assert result.exit_code == 2 and "own environment" in result.output and "Traceback" not in result.output
    else:
        pytest.skip("PyTriton is installed in this environment")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
