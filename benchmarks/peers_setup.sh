#!/usr/bin/env bash
# The peer optimizers' environment for benchmarks/peers_compare.py: NNCF and Microsoft Olive installed beside the
# project's .venv (a .pth file puts .venv's packages behind the new ones), so that neither becomes a dependency of
# lggdeploy and .venv is left as `make install` made it. Usage: bash benchmarks/peers_setup.sh (after make install).
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=benchmarks/runs/.venv-peers
test -x .venv/bin/python || { echo "benchmarks/peers_setup.sh: run 'make install' first (.venv is missing)"; exit 2; }
python3 -m venv "$PEERS"
site=$("$PEERS/bin/python" -c "import site; print(site.getsitepackages()[0])")
base=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
echo "import site; site.addsitedir('$base')" >"$site/lggdeploy-base.pth"  # addsitedir: .venv's own .pth files (the editable install) too
"$PEERS/bin/pip" install --quiet nncf==3.4.0 olive-ai==0.13.0
"$PEERS/bin/python" -c "import nncf, olive, openvino, onnxruntime, lggdeploy; print('peers:', 'nncf', nncf.__version__, 'olive-ai', olive.__version__, 'openvino', openvino.__version__, 'onnxruntime', onnxruntime.__version__)"
