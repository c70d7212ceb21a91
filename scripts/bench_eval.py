"""Evaluation benchmark: fusion_bench (Rust) against FusionBench 0.2.33 on the same inputs, same run.

Three measurements, each printed with its ratio (FusionBench time / ours; > 1 means we are faster):
1. decode-bound: `method=dummy` on the bundled fixtures' SUN397 test split (397 small JPEGs, tiny
   CLIP), whole processes (imports and start-up included);
2. compute-bound: `method=dummy` with the real CLIP ViT-B/32 architecture (random weights, made
   here once) on 256 JPEG images of 320x240, resized to 224, whole processes;
3. preprocessing alone, one thread: parquet bytes -> decoded -> CLIP pixel values, ours
   (`examples/bench_preprocess.rs`) against transformers' CLIPImageProcessor + Pillow.
In-process times are printed separately: ours, the evaluation's own seconds (the `seconds` of the
`evaluation done` log line) and the method's (`method done`). Every pair is run
alternately `--repeats` times and medians are compared; both sides run on CPU with their default
settings (FusionBench: DataLoader with 8 workers, batch 128). Reports are checked to agree.

usage: python scripts/bench_eval.py [--repeats 3] [--work DIR]
       (python from scripts/fixtures/ref-venv.sh; build first: cargo build --release --examples)
"""
import argparse
import hashlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TA8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def snapshot(hub, kind, repo_id):
    d = os.path.join(hub, f"{kind}--{repo_id.replace('/', '--')}")
    with open(os.path.join(d, "refs", "main")) as f:
        return os.path.join(d, "snapshots", f.read().strip())


def new_repo(hub, kind, repo_id):
    rev = hashlib.sha1(f"bench/{kind}/{repo_id}".encode()).hexdigest()
    d = os.path.join(hub, f"{kind}--{repo_id.replace('/', '--')}")
    os.makedirs(os.path.join(d, "refs"), exist_ok=True)
    with open(os.path.join(d, "refs", "main"), "w") as f:
        f.write(rev)
    snap = os.path.join(d, "snapshots", rev)
    os.makedirs(snap, exist_ok=True)
    return snap


def make_b32_cache(work):
    """A hub cache with a random-weight CLIP ViT-B/32 (real shapes) and a 256-image 'eurosat'."""
    hub = os.path.join(work, "hf_home", "hub")
    done = os.path.join(work, "hf_home", "DONE")
    if os.path.exists(done):
        return os.path.dirname(hub)
    import numpy as np
    import torch
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig())  # the defaults are openai/clip-vit-base-patch32's shapes
    snap = new_repo(hub, "models", "openai/clip-vit-base-patch32")
    model.save_pretrained(snap, safe_serialization=True)
    tok = os.path.join(ROOT, "tests", "fixtures", "clip_tokenizer")
    for f in os.listdir(tok):
        shutil.copy(os.path.join(tok, f), snap)
    with open(os.path.join(snap, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
                   "do_normalize": True, "do_rescale": True, "do_resize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                   "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}, f)
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(256):
        arr = (rng.random((240, 320, 3)) * 255).astype("uint8")
        buf = io.BytesIO()
        PILImage.fromarray(arr).save(buf, format="JPEG", quality=90)
        images.append({"bytes": buf.getvalue(), "path": None})
        labels.append(i % 10)
    names = [f"class {i}" for i in range(10)]
    ds = Dataset.from_dict({"image": images, "label": labels},
                           features=Features({"image": Image(), "label": ClassLabel(names=names)}))
    snap = new_repo(hub, "datasets", "tanganke/eurosat")
    os.makedirs(os.path.join(snap, "data"), exist_ok=True)
    ds.to_parquet(os.path.join(snap, "data", "test-00000-of-00001.parquet"))
    with open(done, "w") as f:
        f.write("ok")
    return os.path.dirname(hub)


def keep_only(task):
    return [f"~taskpool.test_datasets.{t}" for t in TA8 if t != task]


def common(report):
    return ["method=dummy", "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
            "fabric.accelerator=cpu", "print_config=false", f"report_save_path={report}"]


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def logged_seconds(stderr, message):
    """The `seconds` field of each of our log lines whose message is `message`."""
    out = []
    for line in ANSI.sub("", stderr).splitlines():
        m = re.search(re.escape(message) + r"\b.*?\bseconds=([0-9.eE+-]+)", line)
        if m:
            out.append(float(m.group(1)))
    return out


def timed(cmd, env, cwd):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return dt, p.stderr


def compare_eval(name, hf_home, task, dataset_id, repeats, tmp):
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_CACHE=os.path.join(tmp, "ds-cache"), RUST_LOG="info")
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(k, None)
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    theirs_bin = os.path.join(os.path.dirname(sys.executable), "fusion_bench")
    path = snapshot(os.path.join(hf_home, "hub"), "datasets", dataset_id)
    ours_cmd = [ours_bin] + common(os.path.join(tmp, "ours.json")) + keep_only(task)
    theirs_cmd = [theirs_bin] + common(os.path.join(tmp, "theirs.json")) + keep_only(task) + [
        f"taskpool.test_datasets.{task}.path={path}"]
    work = os.path.join(tmp, "cwd")  # no ./config here: it would shadow FusionBench's configs
    os.makedirs(work, exist_ok=True)
    ours, theirs, evals, methods = [], [], [], []
    for _ in range(repeats):
        dt, err = timed(ours_cmd, env, ROOT)
        ours.append(dt)
        ev, me = logged_seconds(err, "evaluation done"), logged_seconds(err, "method done")
        if len(ev) != 1:
            sys.exit(f"expected one `evaluation done` line with seconds, got {ev}:\n{err[-3000:]}")
        evals += ev
        methods += me
        theirs.append(timed(theirs_cmd, env, work)[0])
    a = json.load(open(os.path.join(tmp, "ours.json")))
    b = json.load(open(os.path.join(tmp, "theirs.json")))
    n = 256 if task == "eurosat" else 397
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"{name}: {n} images, task {task}")
    me = statistics.median(evals)
    method = f", method median {statistics.median(methods):.3f} s" if methods else ""
    print(f"  fusion_bench (Rust)  whole process median {mo:7.2f} s  ({n / mo:7.1f} images/s); "
          f"in-process: evaluation median {me:.2f} s ({n / me:.1f} images/s){method}")
    print(f"  FusionBench 0.2.33   whole process median {mt:7.2f} s  ({n / mt:7.1f} images/s)")
    print(f"  ratio (FusionBench / ours, whole process): {mt / mo:.2f}x   reports agree: {a[task] == b[task]}")


def compare_preprocess(hf_home, dataset_id, repeats):
    snap = snapshot(os.path.join(hf_home, "hub"), "datasets", dataset_id)
    parquet = [os.path.join(r, f) for r, _, fs in os.walk(snap) for f in fs if f.startswith("test-")][0]
    cfg = os.path.join(snapshot(os.path.join(hf_home, "hub"), "models", "openai/clip-vit-base-patch32"),
                       "preprocessor_config.json")
    out = subprocess.run([os.path.join(ROOT, "target", "release", "examples", "bench_preprocess"), parquet, cfg,
                          str(repeats)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, RAYON_NUM_THREADS="1"))
    ours = json.loads(out.stdout)
    import pyarrow.parquet as pq
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(os.path.dirname(cfg))
    rows = pq.read_table(parquet).column("image").to_pylist()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for r in rows:
            proc(images=[Image.open(io.BytesIO(r["bytes"])).convert("RGB")], return_tensors="pt")
        best = min(best, time.perf_counter() - t0)
    theirs = len(rows) / best
    print(f"preprocessing alone, one thread, {len(rows)} images of {dataset_id}:")
    print(f"  ours {ours['images_per_s']:.0f} images/s, transformers+Pillow {theirs:.0f} images/s, "
          f"ratio {ours['images_per_s'] / theirs:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/fusion_bench/bench"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    fixtures = os.path.join(ROOT, "tests", "fixtures", "hf_home")
    b32 = make_b32_cache(args.work)
    with tempfile.TemporaryDirectory() as tmp:
        compare_eval("decode-bound (bundled fixtures, tiny CLIP)", fixtures, "sun397", "tanganke/sun397",
                     args.repeats, tmp)
        compare_eval("compute-bound (ViT-B/32 architecture, 224 px)", b32, "eurosat", "tanganke/eurosat",
                     args.repeats, tmp)
    compare_preprocess(b32, "tanganke/eurosat", args.repeats)
    compare_preprocess(fixtures, "tanganke/sun397", args.repeats)


if __name__ == "__main__":
    main()
