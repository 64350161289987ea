#!/usr/bin/env bash
# Builds the mb_kernels wheel with .venv's python (compiled extension included), installs it into a fresh
# temporary venv next to the same torch version, and runs a smoke test from outside the source tree: the compiled
# CPU backend is picked by MetaBalance(fused=True) and agrees with the pure-torch reference on one step.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
[ -x "$py" ] || { echo "[wheel_smoke] $py missing: run scripts/bootstrap.sh first" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
torch_version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"

echo "[wheel_smoke] building the wheel"
(cd "$root" && MAX_JOBS="${MAX_JOBS:-2}" "$py" -m pip wheel . --no-build-isolation --no-deps -q -w "$tmp/dist")
wheel="$(ls "$tmp"/dist/mb_kernels-*.whl)"
echo "[wheel_smoke] built $(basename "$wheel")"
"$py" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
if not any(name.startswith("mb_kernels/_C") for name in names):
    sys.exit(f"[wheel_smoke] the wheel lacks the compiled extension mb_kernels/_C: {names}")
# The library only: no application code, tests or benchmarks.
stray = [n for n in names if not (n.startswith("mb_kernels/") or n.startswith("mb_kernels-"))]
if stray:
    sys.exit(f"[wheel_smoke] the wheel ships files outside the library: {stray}")
print(f"[wheel_smoke] wheel holds {len(names)} files, all under mb_kernels/ (library, extension, metadata)")
wheel = zipfile.ZipFile(sys.argv[1])
metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
for field in ("Summary: MetaBalance", "License", "Description-Content-Type: text/markdown", "# mb_kernels"):
    if field not in metadata:
        sys.exit(f"[wheel_smoke] the wheel's METADATA lacks {field!r}")
if not any(n.endswith("LICENSE") for n in names):
    sys.exit(f"[wheel_smoke] the wheel does not ship the LICENSE file: {names}")
print("[wheel_smoke] METADATA has the summary, the licence and the README as long description; LICENSE shipped")
PY

echo "[wheel_smoke] installing it into a fresh venv with torch==$torch_version"
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --no-compile "torch==$torch_version" 2>&1 | grep -v "is ignored" >&2 || true
"$tmp/venv/bin/pip" install -q --no-compile --no-deps "$wheel"

cd "$tmp"
"$tmp/venv/bin/python" - "$root" <<'PY'
import sys
from pathlib import Path

import torch

import mb_kernels
from mb_kernels import MetaBalance

source_tree = Path(sys.argv[1]).resolve()
installed = Path(mb_kernels.__file__).resolve()
assert source_tree not in installed.parents, f"imported from the source tree: {installed}"

def one_step(**kwargs):
    torch.manual_seed(0)
    shared = torch.nn.Linear(16, 8)
    heads = [torch.nn.Linear(8, 1) for _ in range(3)]
    mb = MetaBalance(shared.parameters(), relax_factor=0.7, beta=0.9, **kwargs)
    x = torch.randn(32, 16)
    hidden = torch.relu(shared(x))
    mb.step([head(hidden).pow(2).mean() * scale for head, scale in zip(heads, (1.0, 10.0, 0.1))])
    return mb, [p.grad.clone() for p in shared.parameters()]

fused, fused_grads = one_step(fused=True)
assert fused.backends == {"cpu": "cpu"}, f"fused=True picked {fused.backends}, expected the compiled CPU backend"
_, reference_grads = one_step(fused=False)
for got, want in zip(fused_grads, reference_grads):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
print(f"[wheel_smoke] ok: mb_kernels {mb_kernels.__version__} from {installed.parent}, backend {fused.backends}")
PY
