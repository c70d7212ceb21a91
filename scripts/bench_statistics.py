"""Statistics benchmark (Fisher merging, RegMean): fusion_bench (Rust) against FusionBench 0.2.33,
same inputs, in one run.

On the ViT-B/32-size pool of bench_tta.py (a random CLIP, six perturbed vision towers for six
`tanganke/*` tasks; svhn and mnist left out) with a 64-image train split per task (a copy of the
test split's random JPEGs, made here once), `taskpool=dummy`, both sides on CPU, seed=42:
  1. each method's whole process and its statistics time (ours: the sum of the per-model
     `Fisher computed` / `RegMean Grams computed` log lines; FusionBench: its profiler's
     `computing fisher weights` / `computing regmean weights` total), the main process's peak RSS
     (`wait4`'s ru_maxrss: mapped checkpoints count) and peak anonymous RSS (RssAnon sampled every
     0.1 s), FusionBench's time / ours as ratios (> 1: we are faster);
  2. a sweep of RegMean over reduce_non_diagonal_ratio 0.95, 0.9, 0.8: FusionBench recomputes the
     Grams each time; ours computes them in the first run (the one of part 1) and reuses them from
     path.cache_dir in the other two. Printed: each side's sweep total and their ratio, and our
     reuse runs against our first;
  3. ours alone at ViT-L/14 size (bench_tta.py's L/14 pool, 8 train images per task, the seed's
     L/14 `method.dataloader_kwargs.batch_size=8`): the same figures.
Each measurement runs once (`--repeats` for more; medians then).

usage: python scripts/bench_statistics.py [--repeats 1] [--parts b32,l14] [--work DIR]
       (python from scripts/fixtures/ref-venv.sh; build first: cargo build --release)
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_tta import ANSI, DATASET, SIX, make_pool, med, pool_overrides  # noqa: E402

METHODS = {
    "fisher": ("fisher_merging/clip_fisher_merging", "num_fisher_examples",
               "Fisher computed", "computing fisher weights"),
    "regmean": ("regmean/clip_regmean", "num_regmean_examples",
                "RegMean Grams computed", "computing regmean weights"),
}


def snapshot(hf_home, task):
    d = os.path.join(hf_home, "hub", "datasets--tanganke--" + DATASET.get(task, task))
    with open(os.path.join(d, "refs", "main")) as f:
        return os.path.join(d, "snapshots", f.read().strip())


def ensure_train_splits(hf_home):
    """Each task's train split: a copy of its test split (64 random JPEGs), made once."""
    for task in SIX:
        data = os.path.join(snapshot(hf_home, task), "data")
        train = os.path.join(data, "train-00000-of-00001.parquet")
        if not os.path.exists(train):
            shutil.copy(os.path.join(data, "test-00000-of-00001.parquet"), train)


def run(cmd, env, cwd):
    """Wall seconds, stdout+stderr, peak RSS and peak anonymous RSS (MiB) of a whole process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=out)
        anon = 0
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            anon = max(anon, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.1)
        dt = time.perf_counter() - t0
        out.seek(0)
        text = ANSI.sub("", out.read().decode(errors="replace"))
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{text[-3000:]}")
    return dt, text, usage.ru_maxrss / 1024, anon / 1024


def statistics_seconds(text, side, method):
    """Ours: the per-model log lines summed; FusionBench: its profiler's total for the action."""
    _, _, ours_line, fb_action = METHODS[method]
    if side == "ours":
        found = re.findall(rf"{ours_line}\b.*?\bseconds=([0-9.eE+-]+)", text)
        return sum(float(s) for s in found) if found else float("nan")
    m = re.findall(rf"{fb_action}\s*\|\s*([0-9.eE+-]+)\s*\|\s*(\d+)\s*\|\s*([0-9.eE+-]+)", text)
    return float(m[-1][2]) if m else float("nan")


def command(side, method, size, hf_home, cwd, examples, ratio=None):
    option, key, _, _ = METHODS[method]
    pool, *drop = pool_overrides(size)
    words = [f"method={option}", f"method.{key}={examples}", pool, "taskpool=dummy",
             "fabric.accelerator=cpu", "print_config=false", "seed=42"] + drop
    if size == "l14":
        words.append("method.dataloader_kwargs.batch_size=8")
    if ratio is not None:
        words.append(f"method.reduce_non_diagonal_ratio={ratio}")
    if side == "ours":
        return [os.path.join(ROOT, "target", "release", "fusion_bench")] + words + [
            f"path.cache_dir={os.path.join(cwd, 'cache')}"]
    # FusionBench's `datasets` does not read the hub cache offline: each train split's folder.
    return [os.path.join(os.path.dirname(sys.executable), "fusion_bench")] + words + [
        f"modelpool.train_datasets.{t}.path={snapshot(hf_home, t)}" for t in SIX]


def measure(a, tmp, env, hf_home, size, side, method, examples, ratio=None):
    """`a.repeats` runs; medians of (whole, statistics) and peaks. The runs of one side and method
    share their working directory (FusionBench's joblib cache of zero-shot heads) and ours its
    path.cache_dir (heads and statistics), as a researcher's sweep in one folder would."""
    rows = []
    for r in range(a.repeats):
        cwd = os.path.join(tmp, f"{size}-{side}-{method}-{r}")
        os.makedirs(cwd, exist_ok=True)
        dt, text, peak, anon = run(command(side, method, size, hf_home, cwd, examples, ratio), env, cwd)
        rows.append((dt, statistics_seconds(text, side, method), peak, anon))
    return (med([x[0] for x in rows]), med([x[1] for x in rows]),
            max(x[2] for x in rows), max(x[3] for x in rows))


def show(name, fig):
    whole, stats, peak, anon = fig
    print(f"  {name}  whole process {whole:7.1f} s;  statistics {stats:7.1f} s;  "
          f"peak RSS {peak:7.0f} MiB (anonymous {anon:6.0f} MiB)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--parts", default="b32,l14", help="b32 (parts 1-2), l14 (part 3)")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/fusion_bench/bench_tta"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    parts = a.parts.split(",")
    hf_home = make_pool(a.work, "b32")
    ensure_train_splits(hf_home)
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", RUST_LOG="info")
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        env["HF_DATASETS_CACHE"] = os.path.join(tmp, "ds-cache")
        first = {}
        if "b32" in parts:
            print(f"ViT-B/32-size pool, six tasks, 64 train images each (median of {a.repeats}):")
        for method in METHODS if "b32" in parts else []:
            figs = {}
            for side in ["ours", "theirs"]:
                figs[side] = measure(a, tmp, env, hf_home, "b32", side, method, 64)
            first[method] = figs
            print(f" {method}:")
            show("fusion_bench (Rust)", figs["ours"])
            show("FusionBench 0.2.33 ", figs["theirs"])
            (wo, so, po, ao), (wt, st, pt, at) = figs["ours"], figs["theirs"]
            print(f"  ratios (FusionBench / ours): whole process {wt / wo:5.2f}x;  statistics {st / so:5.2f}x;  "
                  f"peak RSS {pt / po:5.2f}x;  peak anonymous RSS {at / ao:5.2f}x")
        if "b32" in parts:
            print(" RegMean sweep over reduce_non_diagonal_ratio 0.95, 0.9, 0.8 (the 0.95 run is the one above):")
        totals = {}
        for side in ["ours", "theirs"] if "b32" in parts else []:
            rest = [measure(a, tmp, env, hf_home, "b32", side, "regmean", 64, ratio=r) for r in (0.9, 0.8)]
            whole = [first["regmean"][side][0]] + [x[0] for x in rest]
            totals[side] = sum(whole)
            name = "fusion_bench (Rust)" if side == "ours" else "FusionBench 0.2.33 "
            print(f"  {name}  runs {' + '.join(f'{w:.1f}' for w in whole)} = {totals[side]:.1f} s")
            if side == "ours":
                print(f"   a rerun reusing the Grams: {med(whole[1:]):.1f} s against {whole[0]:.1f} s computing them "
                      f"({whole[0] / med(whole[1:]):.2f}x)")
        if totals:
            print(f"  sweep ratio (FusionBench / ours): {totals['theirs'] / totals['ours']:5.2f}x")
        if "l14" in parts:
            l14 = make_pool(a.work, "l14")
            ensure_train_splits(l14)
            env_l = dict(env, HF_HOME=l14)
            print("ViT-L/14-size pool, six tasks, 8 train images each, batch 8, ours only:")
            for method in METHODS:
                show(f"{method:8s} fusion_bench (Rust)",
                     measure(a, tmp, env_l, l14, "l14", "ours", method, 8))


if __name__ == "__main__":
    main()
