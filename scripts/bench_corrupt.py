"""Corruption benchmark: `fusion_bench corrupt --threads 1` against FusionBench 0.2.33's own
corruption functions (scripts/fixtures/corruption_ref.py), one core each (`taskset -c 0`).

Input: the fixture eurosat test split (64 PNGs of 64x64) and dtd test split (64 JPEGs of
20-64 px), replicated to --images rows, written as a dataset `bench/corrupt` in a scratch hub
cache. Per corruption (severity 3, FusionBench's parameters):
  ours:   the whole command (process start, parquet read, decode, corrupt, PNG encode, parquet
          write, card), wall time; and in-process, the `seconds` of its `wrote split` log line
          (the same work without the process start, ~0.4 s of which is loading libtorch);
  theirs: in one Python process pinned to the same core (imports excluded), per image
          `Image.open(bytes)` -> `corrupt(name, img, 3)` -> PNG encode, as a split writer would.
Each pair runs alternately --repeats times; medians are compared (ratio = theirs / ours seconds,
> 1 means we are faster).

usage: $(scripts/fixtures/ref-venv.sh) scripts/bench_corrupt.py [--images 640] [--repeats 3]
       (build first: cargo build --release)
"""
import argparse
import glob
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts", "fixtures"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from corruption_ref import CORRUPTIONS, corrupt  # noqa: E402

BIN = os.path.join(ROOT, "target", "release", "fusion_bench")
CORE = 0


def fixture_rows():
    rows = []
    for repo in ["eurosat", "dtd"]:
        (path,) = glob.glob(os.path.join(ROOT, "tests/fixtures/hf_home/hub", f"datasets--tanganke--{repo}",
                                         "snapshots", "*", "data", "test-*.parquet"))
        rows += pq.read_table(path).to_pylist()
    return rows


def make_dataset(work, n):
    rows = fixture_rows()
    rows = [rows[i % len(rows)] for i in range(n)]
    snap = os.path.join(work, "hub", "datasets--bench--corrupt", "snapshots", "bench")
    os.makedirs(os.path.join(snap, "data"))
    os.makedirs(os.path.join(work, "hub", "datasets--bench--corrupt", "refs"))
    with open(os.path.join(work, "hub", "datasets--bench--corrupt", "refs", "main"), "w") as f:
        f.write("bench")
    table = pa.table({"image": [{"bytes": r["image"]["bytes"], "path": None} for r in rows],
                      "label": pa.array([r["label"] for r in rows], pa.int64())})
    pq.write_table(table, os.path.join(snap, "data", "test-00000-of-00001.parquet"))
    return [r["image"]["bytes"] for r in rows]


def ours(work, name):
    """(whole process seconds, in-process seconds)"""
    env = dict(os.environ, HF_HOME=work, RUST_LOG="info", NO_COLOR="1")
    t = time.perf_counter()
    out = subprocess.run(["taskset", "-c", str(CORE), BIN, "corrupt", "--dataset", "bench/corrupt", "--corruption",
                          name, "--severity", "3", "--threads", "1", "--name", f"b_{name}", "--overwrite"],
                         env=env, check=True, capture_output=True, text=True)
    whole = time.perf_counter() - t
    (inner,) = re.findall(r"seconds=([0-9.e-]+)", out.stderr)
    return whole, float(inner)


def theirs(images, name):
    np.random.seed(0)
    t = time.perf_counter()
    for b in images:
        arr = corrupt(name, Image.open(io.BytesIO(b)), 3)
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.sched_setaffinity(0, {CORE})
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as work:
        images = make_dataset(work, args.images)
        n = len(images)
        print(f"{n} images (fixture eurosat 64x64 PNG + dtd 20-64 px JPEG), severity 3, cifar10c, "
              f"one core (taskset -c {CORE}), median of {args.repeats}")
        print(f"{'corruption':18s} {'FusionBench':>11s} {'ours whole':>11s} {'ratio':>6s} {'ours in-proc':>12s} "
              f"{'ratio':>6s}   (images/s; ratio = FusionBench time / ours)")
        for name in CORRUPTIONS:
            whole, inner, ref = [], [], []
            for _ in range(args.repeats):
                w, i = ours(work, name)
                whole.append(w)
                inner.append(i)
                ref.append(theirs(images, name))
            tw, ti, tr = (statistics.median(x) for x in (whole, inner, ref))
            print(f"{name:18s} {n / tr:11.0f} {n / tw:11.0f} {tr / tw:5.2f}x {n / ti:12.0f} {tr / ti:5.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
