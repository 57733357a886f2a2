#!/usr/bin/env bash
# Build the wheel, install it into a clean venv (reusing the dev venv's packages), and run the CLI
# from outside the repository, so a subpackage missing from the wheel fails here.
set -euo pipefail
PY=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m build --wheel --no-isolation --outdir "$work/dist" . >/dev/null
"$PY" -m venv --system-site-packages "$work/venv"
# the clean venv sees the dev venv's dependencies but not its editable cladapt
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$site" > "$(ls -d "$work"/venv/lib/python3*/site-packages)/deps.pth"
"$work/venv/bin/python" -m pip install -q --no-deps --force-reinstall "$work"/dist/*.whl
cd "$work"
PYTHONSAFEPATH=1 "$work/venv/bin/python" - <<'PY'
import cladapt, cladapt.adapters, cladapt.registry, cladapt.train, cladapt.serve, cladapt.configs
from importlib import resources
assert "site-packages" in cladapt.__file__ and "/venv/" in cladapt.__file__, cladapt.__file__
assert resources.files("cladapt.configs").joinpath("train/default.yaml").is_file()
print("wheel imports from", cladapt.__file__)
PY
"$work/venv/bin/cladapt" --help >/dev/null
"$work/venv/bin/cladapt" methods >/dev/null
echo "wheel check OK"
