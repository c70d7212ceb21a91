# shellcheck shell=bash
# Sourced by the sbatch recipes: which fusion_bench binary a job runs. The Python FusionBench
# installs a command of the same name, so whatever is first on PATH is not trusted blindly.
#   fusion_bench_binary   prints the binary to run, or explains and returns 1. In order:
#     1. $FUSION_BENCH, when set;
#     2. <submit folder>/target/release/fusion_bench (a checkout you submitted from);
#     3. <this recipe's checkout>/target/release/fusion_bench;
#     4. ~/.cargo/bin/fusion_bench (`cargo install --path .`);
#     5. fusion_bench on PATH.
#   The one found must answer `--version` with "fusion_bench (Rust)".
fusion_bench_binary() {
    local here candidates=() c
    if [[ -n "${FUSION_BENCH:-}" ]]; then
        candidates=("$FUSION_BENCH")
    else
        here=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." 2>/dev/null && pwd || true)
        [[ -n "${SLURM_SUBMIT_DIR:-}" ]] && candidates+=("$SLURM_SUBMIT_DIR/target/release/fusion_bench")
        [[ -n "$here" ]] && candidates+=("$here/target/release/fusion_bench")
        candidates+=("${CARGO_HOME:-$HOME/.cargo}/bin/fusion_bench")
        c=$(command -v fusion_bench 2>/dev/null || true)
        [[ -n "$c" ]] && candidates+=("$c")
    fi
    for c in "${candidates[@]}"; do
        [[ -x "$c" ]] || continue
        if "$c" --version 2>/dev/null | grep -q '^fusion_bench (Rust)'; then
            echo "$c"
            return 0
        fi
        echo "$c is not this project's fusion_bench (\`$c --version\` does not say \"fusion_bench (Rust)\"; the Python FusionBench has a command of the same name)" >&2
        [[ -n "${FUSION_BENCH:-}" ]] && return 1
    done
    echo "no fusion_bench (Rust) binary found (tried: ${candidates[*]:-nothing}); build it (cargo build --release) or set FUSION_BENCH=/path/to/fusion_bench" >&2
    return 1
}
