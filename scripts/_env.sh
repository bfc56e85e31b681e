# Shared by the scripts in this folder (sourced, not run): where Python 3.12 and the venv are.
#   COMET_PYTHON  a Python >= 3.12 to build the venv with (default: python3.12 on PATH, else pyenv's)
#   COMET_VENV    the venv to use (default: ~/.cache/comet-megatron/venv-<hash of pyproject deps>)

COMET_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_comet_python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

comet_find_python() {
    if [[ -n "${COMET_PYTHON:-}" ]]; then
        if _comet_python_ok "$COMET_PYTHON"; then echo "$COMET_PYTHON"; return 0; fi
        echo "comet-megatron: COMET_PYTHON=$COMET_PYTHON is not a working Python >= 3.12." >&2
        return 1
    fi
    local candidate
    # python3.12 on PATH (it may be a pyenv shim that does not run: then try pyenv's installs)
    for candidate in "$(command -v python3.12 2>/dev/null)" \
            $(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do
        if [[ -n "$candidate" ]] && _comet_python_ok "$candidate"; then
            echo "$candidate"; return 0
        fi
    done
    echo "comet-megatron: Python 3.12 not found (megatron-core 0.19 needs Python >= 3.12)." >&2
    echo "  Install it (e.g. 'pyenv install 3.12' or your OS package python3.12), or set COMET_PYTHON=/path/to/python3.12." >&2
    return 1
}

# Hash of everything the venv's contents depend on: the dependency lists of pyproject.toml.
comet_deps_hash() {
    local py="$1"
    "$py" - "$COMET_ROOT/pyproject.toml" <<'PYEOF'
import hashlib, json, sys, tomllib
data = tomllib.load(open(sys.argv[1], "rb"))
project = data.get("project", {})
key = {
    "python": sys.version_info[:2],
    "requires-python": project.get("requires-python"),
    "dependencies": sorted(project.get("dependencies", [])),
    "optional": {k: sorted(v) for k, v in sorted(project.get("optional-dependencies", {}).items())},
    "build": sorted(data.get("build-system", {}).get("requires", [])),
}
print(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])
PYEOF
}

# The dependency requirements (runtime + every extra + build backend), one per line.
comet_requirements() {
    local py="$1"
    "$py" - "$COMET_ROOT/pyproject.toml" <<'PYEOF'
import sys, tomllib
data = tomllib.load(open(sys.argv[1], "rb"))
project = data.get("project", {})
reqs = list(data.get("build-system", {}).get("requires", []))
reqs += project.get("dependencies", [])
for extra in project.get("optional-dependencies", {}).values():
    reqs += extra
print("\n".join(reqs))
PYEOF
}

comet_venv_path() {
    if [[ -n "${COMET_VENV:-}" ]]; then
        echo "$COMET_VENV"; return 0
    fi
    local py hash
    py="$(comet_find_python)" || return 1
    hash="$(comet_deps_hash "$py")" || return 1
    echo "$HOME/.cache/comet-megatron/venv-$hash"
}

# The Python the example scripts run: the bootstrap venv's when it exists, else python3 on PATH.
comet_run_python() {
    local venv
    venv="$(comet_venv_path 2>/dev/null || true)"
    if [[ -n "$venv" && -x "$venv/bin/python" ]]; then echo "$venv/bin/python"; else echo python3; fi
}
