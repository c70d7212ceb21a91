"""Robustness sweep benchmark: the seed's corrupted and clean experiments for the data-free
methods of its table (task arithmetic λ 0.3, TIES λ 0.3 / top 20 %) on the bundled fixtures,
fusion_bench (Rust) against FusionBench 0.2.33, both as one `-m` sweep on CPU:

  fusion_bench --config-name clip-vit-base-patch32_robustness_corrupted -m \\
      corruption=test,contrast,gaussian_noise,impulse_noise,jpeg_compression,motion_blur,pixelate,spatter \\
      method=task_arithmetic,ties_merging

(16 cells; `test` is the clean test set). FusionBench runs through scripts/fixtures/fb_offline.py
(its v0.1 task pool loads datasets by repository id: mapped to the bundled snapshots), a Hydra
multirun in one process. Ours runs in a fresh sweep folder each time (no cell reused). Printed:
each side's whole-process seconds (median of `--repeats`), per cell, and FusionBench / ours.
Both sides' reports of every cell are checked to agree (accuracies equal).

usage: python scripts/bench_robustness.py [--repeats 3] [--work DIR]
       (python from scripts/fixtures/ref-venv.sh; build first: cargo build --release)
"""
import argparse
import csv
import glob
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_tta import med, timed  # noqa: E402

SPLITS = ["test", "contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur",
          "pixelate", "spatter"]
METHODS = ["task_arithmetic", "ties_merging"]


def words(report_dir):
    return ["--config-name", "clip-vit-base-patch32_robustness_corrupted", "-m",
            "corruption=" + ",".join(SPLITS), "method=" + ",".join(METHODS),
            "fabric.accelerator=cpu", "print_config=false"]


def fb_reports(root):
    """FusionBench's multirun reports, by (corruption, method): its report_save_path default is
    per run under the Hydra multirun folder, so read the reports its runs wrote."""
    out = {}
    for path in glob.glob(os.path.join(root, "**", "program_report.json"), recursive=True):
        run_dir = os.path.dirname(path)
        # FusionBench's hydra config sets output_subdir "": the run's overrides.yaml sits in its folder.
        ov_file = next(p for p in (os.path.join(run_dir, ".hydra", "overrides.yaml"),
                                   os.path.join(run_dir, "overrides.yaml")) if os.path.exists(p))
        with open(ov_file) as f:
            ov = dict(line.strip()[2:].split("=", 1) for line in f if line.startswith("- ") and "=" in line)
        with open(path) as f:
            out[(ov["corruption"], ov["method"])] = json.load(f)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    env = dict(os.environ, HF_HOME=os.path.join(ROOT, "tests/fixtures/hf_home"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RUST_LOG="warn",
               FUSION_BENCH_IMAGE_CACHE_GB="0")
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    times = {"ours": [], "theirs": []}
    cells = len(SPLITS) * len(METHODS)
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        # `datasets` would otherwise cache under HF_HOME, i.e. inside tests/fixtures.
        env["HF_DATASETS_CACHE"] = os.path.join(tmp, "datasets-cache")
        for r in range(a.repeats):
            d = os.path.join(tmp, f"ours{r}")
            os.makedirs(d)
            dt, _, _, _ = timed([ours_bin] + words(d) + [f"sweep_dir={d}/sweep"], env, d)
            times["ours"].append(dt)
            ours = {}
            with open(os.path.join(d, "sweep", "summary.csv")) as f:
                rows = list(csv.DictReader(f))
            for row in rows:
                with open(os.path.join(d, "sweep", "cells", row["key"], "report.json")) as f:
                    ours[(row["corruption"], row["method"])] = json.load(f)
            d = os.path.join(tmp, f"theirs{r}")
            os.makedirs(d)
            fb = [sys.executable, os.path.join(ROOT, "scripts/fixtures/fb_offline.py"), "--"]
            dt, _, _, _ = timed(fb + words(d) + ["report_save_path=${hydra:runtime.output_dir}/program_report.json",
                                                 f"hydra.sweep.dir={d}/multirun"], env, d)
            times["theirs"].append(dt)
            theirs = fb_reports(os.path.join(d, "multirun"))
            if len(theirs) != cells:
                sys.exit(f"FusionBench wrote {len(theirs)} reports, not {cells}")
            for key, rep in ours.items():
                for task, v in theirs[key].items():
                    if task != "model_info" and v["accuracy"] != rep[task]["accuracy"]:
                        sys.exit(f"{key} {task}: ours {rep[task]['accuracy']} vs FusionBench {v['accuracy']}")
    o, t = med(times["ours"]), med(times["theirs"])
    print(f"robustness sweep on the fixtures: {len(SPLITS)} splits x {len(METHODS)} methods = {cells} cells, "
          f"median of {a.repeats}")
    print(f"  ours        {o:7.2f} s  ({o / cells:6.3f} s per cell)")
    print(f"  FusionBench {t:7.2f} s  ({t / cells:6.3f} s per cell)")
    print(f"  FusionBench / ours: {t / o:5.2f}x")


if __name__ == "__main__":
    main()
