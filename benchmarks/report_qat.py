"""PTQ vs QAT table from the engine manifests (val gate, build, QAT) and one bench.json (test Dice, latency)."""

import json
import sys
from pathlib import Path

import onnx

from lggdeploy.engines.formats import discover, read_manifest
from lggdeploy.engines.precision.gate import quantized_nodes

runs, bench_json = Path(sys.argv[1]), Path(sys.argv[2])
bench = {str(Path(r["engine"]).resolve()): r for r in json.loads(bench_json.read_text())["rows"] if not r["aa"]}
refs = {}
for r in bench.values():
    if r["backend"] == "torch" and r["precision"] == "fp32":
        refs[str(Path(r["engine"]).resolve())] = r
print(
    "| model | profile | method | val drop (pts, n=5) | val worst patient | least agreement | nodes in float / quantized | gate | test Δ vs FP32 (pts, n=5) | ms/img b1 | ms/img b8 | × PyTorch b8 | build s | QAT s |"
)
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for path in discover(runs):
    m = read_manifest(path)
    if m["precision"] != "int8":
        continue
    g = m["gate"]
    row = bench.get(str(path.resolve()), {})
    lat = row.get("latency", {})
    twin = path.parent / (m.get("portable_qdq") or {}).get("file", path.name)
    ranked = len(quantized_nodes(onnx.load(str(twin)))) + len(
        g["nodes_kept_in_float"]
    )  # quantized in the plain graph + kept in float
    delta = row.get("delta_dice_points") or {}
    qat = m.get("qat")
    print(
        f"| {'pruned 0.3' if m['pruned'] else 'unpruned'} | {m['int8_profile']} | {'QAT' if qat else 'PTQ'} | {g['drop_points']:.2f} | {g['worst_patient_drop_points']:.2f} | {g['min_agreement']:.4f} | "
        f"{len(g['nodes_kept_in_float'])} / {ranked if ranked else '—'} | {'passed' if g['passed'] else 'FAILED (forced)'} | "
        f"{delta.get('mean', float('nan')):+.2f} | {lat.get('1', {}).get('p50_ms', float('nan')):.1f} | {lat.get('8', {}).get('p50_ms', float('nan')) / 8:.1f} | "
        f"{row.get('speedup', {}).get('8', float('nan')):.2f} | {m['build_seconds']:.0f} | {qat['seconds'] if qat else '—'} |"
    )
