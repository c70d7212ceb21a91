"""Test-time adaptation benchmark: fusion_bench (Rust) against FusionBench 0.2.33, same inputs, same run.

Layer-wise and task-wise AdaMerging on the bundled fixtures (tiny CLIP, eight tasks), 20 steps
with seed=42 and `taskpool=dummy` (adaptation only), whole processes, both sides on CPU with their
defaults (FusionBench: DataLoaders with 8 workers). The two sides run alternately `--repeats`
times; medians are compared and their ratio printed (FusionBench's time / ours: > 1 means we are
faster), with ours' in-process adaptation time (the `method done` log line) and seconds per step.
The learned λ of both sides is checked to agree (the parity test's tolerance, k_proj biases aside).

usage: python scripts/bench_tta.py [--repeats 3] [--steps 20]
       (python from scripts/fixtures/ref-venv.sh; build first: cargo build --release)
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def args(flavour, steps, out_pt):
    return ["method=adamerging/clip", f"method.name=clip_{flavour}_adamerging",
            f"method.save_merging_weights={out_pt}", f"method.max_steps={steps}",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8", "taskpool=dummy",
            "fabric.accelerator=cpu", "print_config=false", "seed=42"]


def timed(cmd, env, cwd):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return dt, ANSI.sub("", p.stderr)


def method_seconds(stderr):
    m = re.findall(r"method done\b.*?\bseconds=([0-9.eE+-]+)", stderr)
    return float(m[-1]) if m else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    import torch

    hf_home = os.path.join(ROOT, "tests", "fixtures", "hf_home")
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", RUST_LOG="info")
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    theirs_bin = os.path.join(os.path.dirname(sys.executable), "fusion_bench")
    for flavour in ["layer_wise", "task_wise"]:
        ours, theirs, inproc = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            env["HF_DATASETS_CACHE"] = os.path.join(tmp, "ds-cache")
            for r in range(a.repeats):
                for side in ["ours", "theirs"]:
                    cwd = os.path.join(tmp, f"{side}{r}")
                    os.makedirs(cwd)
                    pt = os.path.join(cwd, "lambda.pt")
                    extra = [f"path.cache_dir={os.path.join(cwd, 'cache')}"] if side == "ours" else []
                    cmd = [ours_bin if side == "ours" else theirs_bin] + args(flavour, a.steps, pt) + extra
                    dt, err = timed(cmd, env, cwd)
                    (ours if side == "ours" else theirs).append(dt)
                    if side == "ours":
                        inproc.append(method_seconds(err))
            lo = torch.load(os.path.join(tmp, "ours0", "lambda.pt"), weights_only=True)
            lt = torch.load(os.path.join(tmp, "theirs0", "lambda.pt"), weights_only=True)
            diff = (lo.float() - lt.float()).abs().max().item()
        mo, mt, mi = statistics.median(ours), statistics.median(theirs), statistics.median(inproc)
        print(f"{flavour} AdaMerging, {a.steps} steps on the fixtures (median of {a.repeats}):")
        print(f"  fusion_bench (Rust)  whole process {mo:7.2f} s; adaptation in-process {mi:6.2f} s "
              f"({mi / a.steps * 1000:6.1f} ms/step)")
        print(f"  FusionBench 0.2.33   whole process {mt:7.2f} s")
        print(f"  ratio (FusionBench / ours, whole process): {mt / mo:5.2f}x;  max |λ ours - λ FusionBench| = {diff:.2e}")


if __name__ == "__main__":
    main()
