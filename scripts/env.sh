# shellcheck shell=bash
# Source this file: it makes libtorch (PyPI torch==2.11.0) available to cargo, creating the venv on
# first use. Idempotent; a second call costs well under a second.
#   FUSION_BENCH_TORCH_VENV  where the venv lives (default: ~/.cache/fusion_bench/torch-2.11.0,
#                            outside the clone, so every clone and CI run on this machine shares it)
_fb_torch_version="2.11.0"
_fb_venv="${FUSION_BENCH_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fusion_bench/torch-${_fb_torch_version}}"
if ! "$_fb_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '${_fb_torch_version}')" 2>/dev/null; then
    echo "[setup] installing torch==${_fb_torch_version} from PyPI into $_fb_venv (once per machine)" >&2
    python3 -m venv "$_fb_venv" || return 1
    "$_fb_venv/bin/pip" install --quiet --disable-pip-version-check "torch==${_fb_torch_version}" || return 1
fi
export PATH="$_fb_venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
FUSION_BENCH_TORCH_LIB="$("$_fb_venv/bin/python" -c "import importlib.util, os; print(os.path.join(importlib.util.find_spec('torch').submodule_search_locations[0], 'lib'))")"
export FUSION_BENCH_TORCH_LIB
unset _fb_venv _fb_torch_version
