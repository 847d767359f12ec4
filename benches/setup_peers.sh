#!/usr/bin/env bash
# Create (or update) the virtualenv used by the peer benchmarks
# (benches/peer_torch.py, benches/peer_jax.py, benches/gemm_peak.py).
#
# The env lives at benches/.venv-peers (gitignored) and is kept separate from
# the fastvae development environment so that the peers' numpy / BLAS / OpenMP
# builds never leak into fastvae's own builds or tests.
#
# Idempotent: re-running reuses the existing venv and only installs what is
# missing.  Set PYTHON=/path/to/python3 to choose the interpreter (>= 3.10).
#
# Note: torch comes from the default PyPI index.  On Linux x86_64 that wheel
# also pulls in the CUDA runtime wheels (several GB); they are never used
# here (the benchmarks are CPU only) but torch refuses to import without them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HERE}/.venv-peers"
PYTHON="${PYTHON:-python3}"
PKGS=(numpy torch "jax[cpu]" optax)

if [ ! -x "${VENV}/bin/python" ]; then
    echo "[setup_peers] creating virtualenv at ${VENV}"
    "${PYTHON}" -m venv "${VENV}"
else
    echo "[setup_peers] reusing virtualenv at ${VENV}"
fi

PY="${VENV}/bin/python"

if "${PY}" -c 'import numpy, torch, jax, optax' >/dev/null 2>&1; then
    echo "[setup_peers] all peer packages already importable; nothing to install"
else
    "${PY}" -m pip install --disable-pip-version-check --upgrade pip
    "${PY}" -m pip install --disable-pip-version-check "${PKGS[@]}"
fi

"${PY}" - <<'PYEOF'
import numpy, torch, jax, optax
print("[setup_peers] numpy", numpy.__version__,
      "| torch", torch.__version__,
      "| jax", jax.__version__,
      "| optax", optax.__version__)
PYEOF
echo "[setup_peers] done. Use: ${PY} benches/peer_torch.py --help"
