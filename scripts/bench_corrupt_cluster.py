"""`fusion_bench corrupt` shared by a cluster's processes, against one process, on the same machine.

Input: the fixture eurosat and dtd test images, resized to 224x224 and replicated to --images rows
(PNG), a dataset `bench/corrupt` in a scratch hub cache. Per corruption (severity 3, ImageNet-C's
parameters), whole commands, wall time, alternating, --repeats times (medians):
  one-1:   one process, --threads 1;
  one-2:   one process, --threads 2;
  cluster: a coordinator (--serve 127.0.0.1:0, --threads 1, also corrupting) and one worker
           (--join, --threads 1) on loopback: the chunks' PNGs travel over QUIC to the coordinator,
           which writes the file.
Every run's file must be byte for byte one-1's (checked). On a 2-core machine cluster against
one-2 is the cost of distributing (the same cores); cluster against one-1 what a second process
adds.

usage: $(scripts/fixtures/ref-venv.sh) scripts/bench_corrupt_cluster.py [--images 1200] [--repeats 3]
       (build first: cargo build --release)
"""
import argparse
import glob
import io
import os
import re
import statistics
import subprocess
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.join(ROOT, "target", "release", "fusion_bench")


def make_dataset(work, n):
    rows = []
    for repo in ["eurosat", "dtd"]:
        (path,) = glob.glob(os.path.join(ROOT, "tests/fixtures/hf_home/hub", f"datasets--tanganke--{repo}",
                                         "snapshots", "*", "data", "test-*.parquet"))
        rows += pq.read_table(path).to_pylist()
    images = []
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB").resize((224, 224), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append((buf.getvalue(), r["label"]))
    images = [images[i % len(images)] for i in range(n)]
    repo = os.path.join(work, "hub", "datasets--bench--corrupt")
    snap = os.path.join(repo, "snapshots", "bench")
    os.makedirs(os.path.join(snap, "data"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("bench")
    table = pa.table({"image": [{"bytes": b, "path": None} for b, _ in images],
                      "label": pa.array([lab for _, lab in images], pa.int64())})
    pq.write_table(table, os.path.join(snap, "data", "test-00000-of-00001.parquet"), row_group_size=100)
    return os.path.join(snap, "data")


def line(name, split, threads):
    return [BIN, "corrupt", "--dataset", "bench/corrupt", "--corruption", name, "--params", "imagenetc",
            "--severity", "3", "--threads", str(threads), "--name", split, "--overwrite"]


def alone(env, name, split, threads):
    t = time.perf_counter()
    subprocess.run(line(name, split, threads), env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def cluster(env, work, name, split):
    job = os.path.join(work, "job-" + split)
    t = time.perf_counter()
    coord = subprocess.Popen(line(name, split, 1) + ["--serve", "127.0.0.1:0", "--min-workers", "1",
                                                     "--job-dir", job],
                             env=dict(env, RUST_LOG="info"), stderr=subprocess.PIPE, text=True)
    addr = None
    for text in coord.stderr:
        m = re.search(r"coordinator listening.*addr=(\S+)", text)
        if m:
            addr = m.group(1)
            break
    worker = subprocess.Popen(line(name, split, 1) + ["--join", addr, "--job-dir", job], env=env,
                              stderr=subprocess.DEVNULL)
    rest = coord.stderr.read()
    if coord.wait() != 0 or worker.wait() != 0:
        raise SystemExit(f"the cluster run failed:\n{rest}")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = make_dataset(work, args.images)
        env = dict(os.environ, HF_HOME=work, RUST_LOG="warn", NO_COLOR="1")
        print(f"{args.images} images of 224x224, severity 3, imagenetc, {os.cpu_count()} cores, median of "
              f"{args.repeats} (seconds, whole commands; images/s in brackets)")
        print(f"{'corruption':16s} {'one-1':>14s} {'one-2':>14s} {'cluster 1+1':>14s} "
              f"{'one-1/cluster':>13s} {'one-2/cluster':>13s}")
        for name in ["gaussian_noise", "motion_blur", "spatter"]:
            times = {"one-1": [], "one-2": [], "cluster": []}
            for _ in range(args.repeats):
                times["one-1"].append(alone(env, name, "r1", 1))
                times["one-2"].append(alone(env, name, "r2", 2))
                times["cluster"].append(cluster(env, work, name, "rc"))
                ref = open(os.path.join(data, "r1-00000-of-00001.parquet"), "rb").read()
                for split in ["r2", "rc"]:
                    if open(os.path.join(data, f"{split}-00000-of-00001.parquet"), "rb").read() != ref:
                        raise SystemExit(f"{name}: split {split} differs from one process's")
            m = {k: statistics.median(v) for k, v in times.items()}
            cell = lambda k: f"{m[k]:6.2f} ({args.images / m[k]:4.0f})"  # noqa: E731
            print(f"{name:16s} {cell('one-1'):>14s} {cell('one-2'):>14s} {cell('cluster'):>14s} "
                  f"{m['one-1'] / m['cluster']:12.2f}x {m['one-2'] / m['cluster']:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
