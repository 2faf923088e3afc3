#!/usr/bin/env bash
# Shared set-up for the README's two commands: create .venv (once) and install the package in
# editable mode with its dev/example extras, pinned by constraints.txt (CPU torch, fast).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${OPTIMUS_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.optimus-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | cksum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/constraints.txt" -e "$root[dev]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  "$venv/bin/python" -c "import optimus_ckpt, torch, hydra" || { echo "install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
