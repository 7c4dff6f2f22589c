"""First INT8 graph (no node in float) of the 34-patient pspnet-scratch under each calibration method and profile, judged by the gate.

usage: .venv/bin/python benchmarks/calibration_methods.py   (after benchmarks/gate_34p.sh; prints markdown rows)
"""

import sys
from pathlib import Path

from lggdeploy.common.files import temporary_folder
from lggdeploy.engines.build import BuildOptions, Int8Graph, _Context
from lggdeploy.engines.formats import select_formats

for profile in ("tensorrt", "cpu"):
    for method in ("minmax", "entropy", "percentile"):
        opts = BuildOptions(
            out_dir=Path("benchmarks/runs/34p/engines"),
            data=Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/kaggle_3m"),
            precision="int8",
            int8_profile=profile,
            calib_method=method,
        )
        ctx = _Context(Path("benchmarks/runs/34p/pspnet-scratch/best.pt"), opts)
        fmt = select_formats("onnxruntime", "int8", profile)[0]
        with temporary_folder(ctx.folder) as tmp:
            graph = Int8Graph(ctx, fmt, Path(tmp), ctx.ptq).graph
            path = Path(tmp) / f"e{fmt.suffix}"
            facts = fmt.module.build(graph([]), fmt, path, ctx.build_target(fmt))
            r = ctx.reference.judge(ctx.run_engine(path, fmt, facts))
            print(
                f"| {profile} | {method} | {r.drop_points:.2f} | {r.worst['drop_points']:.2f} ({r.worst['patient']}) | {r.least_agreement['agreement']:.4f} | {'pass' if r.passed else 'fail'} |",
                flush=True,
            )
