"""Test-time adaptation benchmark: fusion_bench (Rust) against FusionBench 0.2.33, same inputs, same run.

Layer-wise and task-wise AdaMerging on the bundled fixtures (tiny CLIP, eight tasks), 20 steps
with seed=42 and `taskpool=dummy` (adaptation only), whole processes, both sides on CPU with their
defaults (FusionBench: DataLoaders with 8 workers). The two sides run alternately `--repeats`
times; medians are compared and their ratio printed (FusionBench's time / ours: > 1 means we are
faster), with ours' in-process adaptation time (the `method done` log line) and seconds per step.
The learned λ of both sides is checked to agree (the parity test's tolerance, k_proj biases aside).

With `--b32`: the same at the real ViT-B/32 size (random weights made here once: a CLIP and six
perturbed copies of its vision tower for the six `tanganke/*` tasks, 64 random 320x240 JPEGs per
test split; svhn and mnist are left out, their datasets need configs), `--steps` steps each
(default 2), batch 16, with each side's peak RSS (`/usr/bin/time`).

usage: python scripts/bench_tta.py [--repeats 3] [--steps 20] [--b32] [--work DIR]
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
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_eval import new_repo  # noqa: E402  (the same fake-revision hub layout)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


SIX = ["sun397", "stanford-cars", "resisc45", "eurosat", "gtsrb", "dtd"]
CLASSES = {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "gtsrb": 43, "dtd": 47}
DATASET = {"stanford-cars": "stanford_cars"}


def args(flavour, steps, out_pt, b32=False):
    a = ["method=adamerging/clip", f"method.name=clip_{flavour}_adamerging",
         f"method.save_merging_weights={out_pt}", f"method.max_steps={steps}",
         "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8", "taskpool=dummy",
         "fabric.accelerator=cpu", "print_config=false", "seed=42"]
    if b32:
        a += ["~modelpool.models.svhn", "~modelpool.models.mnist",
              "~modelpool.test_datasets.svhn", "~modelpool.test_datasets.mnist",
              "~modelpool.train_datasets.svhn", "~modelpool.train_datasets.mnist"]
    return a


REPOS = {"sun397": "tanganke/sun397", "stanford-cars": "tanganke/stanford_cars",
         "resisc45": "tanganke/resisc45", "eurosat": "tanganke/eurosat", "gtsrb": "tanganke/gtsrb",
         "mnist": "ylecun/mnist", "dtd": "tanganke/dtd"}


def fb_overrides(hf_home, b32):
    """FusionBench's `datasets` does not read the hub cache offline: point each test dataset at
    its snapshot folder (as scripts/fixtures/fb_adamerging_hooks.py does)."""
    def snap(repo):
        d = os.path.join(hf_home, "hub", "datasets--" + repo.replace("/", "--"))
        with open(os.path.join(d, "refs", "main")) as f:
            return os.path.join(d, "snapshots", f.read().strip())
    out = [f"modelpool.test_datasets.{t}.path={snap(r)}" for t, r in REPOS.items()
           if not (b32 and t not in SIX)]
    if not b32:
        out.append(f"modelpool.test_datasets.svhn._args_=[{snap('ufldl-stanford/svhn')},cropped_digits]")
    return out


def make_b32_pool(work):
    """A hub cache: random CLIP ViT-B/32, six perturbed vision towers, six 64-image test splits."""
    import io
    import json
    import shutil
    hub = os.path.join(work, "hf_home", "hub")
    done = os.path.join(work, "hf_home", "DONE")
    if os.path.exists(done):
        return os.path.dirname(hub)
    import numpy as np
    import torch
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig())
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
    vision = CLIPVisionModel(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    rng = np.random.default_rng(0)
    for task in SIX:
        ft = CLIPVisionModel(model.config.vision_config)
        with torch.no_grad():
            for (n, p), (_, q) in zip(ft.named_parameters(), vision.named_parameters()):
                p.copy_(q + 0.01 * q.abs().mean() * torch.randn_like(q))
        ft.save_pretrained(new_repo(hub, "models", f"tanganke/clip-vit-base-patch32_{task}"), safe_serialization=True)
        images = []
        for i in range(64):
            arr = (rng.random((240, 320, 3)) * 255).astype("uint8")
            buf = io.BytesIO()
            PILImage.fromarray(arr).save(buf, format="JPEG", quality=90)
            images.append({"bytes": buf.getvalue(), "path": None})
        names = [f"class {i}" for i in range(CLASSES[task])]
        ds = Dataset.from_dict({"image": images, "label": [i % len(names) for i in range(64)]},
                               features=Features({"image": Image(), "label": ClassLabel(names=names)}))
        dsnap = new_repo(hub, "datasets", f"tanganke/{DATASET.get(task, task)}")
        os.makedirs(os.path.join(dsnap, "data"), exist_ok=True)
        ds.to_parquet(os.path.join(dsnap, "data", "test-00000-of-00001.parquet"))
    with open(done, "w") as f:
        f.write("ok")
    return os.path.dirname(hub)


def timed(cmd, env, cwd):
    """Wall seconds, stderr and peak RSS (MiB) of a whole process."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB=%M"] + cmd, env=env, cwd=cwd,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    m = re.findall(r"PEAK_RSS_KB=(\d+)", p.stderr)
    return dt, ANSI.sub("", p.stderr), (int(m[-1]) / 1024 if m else float("nan"))


def method_seconds(stderr):
    m = re.findall(r"method done\b.*?\bseconds=([0-9.eE+-]+)", stderr)
    return float(m[-1]) if m else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--b32", action="store_true")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/fusion_bench/bench_tta"))
    a = ap.parse_args()
    a.steps = a.steps or (2 if a.b32 else 20)
    import torch

    hf_home = make_b32_pool(a.work) if a.b32 else os.path.join(ROOT, "tests", "fixtures", "hf_home")
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", RUST_LOG="info")
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    theirs_bin = os.path.join(os.path.dirname(sys.executable), "fusion_bench")
    for flavour in ["layer_wise", "task_wise"]:
        ours, theirs, inproc, rss = [], [], [], {"ours": [], "theirs": []}
        with tempfile.TemporaryDirectory() as tmp:
            env["HF_DATASETS_CACHE"] = os.path.join(tmp, "ds-cache")
            for r in range(a.repeats):
                for side in ["ours", "theirs"]:
                    cwd = os.path.join(tmp, f"{side}{r}")
                    os.makedirs(cwd)
                    pt = os.path.join(cwd, "lambda.pt")
                    extra = ([f"path.cache_dir={os.path.join(cwd, 'cache')}"] if side == "ours"
                             else fb_overrides(hf_home, a.b32))
                    cmd = [ours_bin if side == "ours" else theirs_bin] + args(flavour, a.steps, pt, a.b32) + extra
                    dt, err, peak = timed(cmd, env, cwd)
                    rss[side].append(peak)
                    (ours if side == "ours" else theirs).append(dt)
                    if side == "ours":
                        inproc.append(method_seconds(err))
            lo = torch.load(os.path.join(tmp, "ours0", "lambda.pt"), weights_only=True)
            lt = torch.load(os.path.join(tmp, "theirs0", "lambda.pt"), weights_only=True)
            diff = (lo.float() - lt.float()).abs().max().item()
        mo, mt, mi = statistics.median(ours), statistics.median(theirs), statistics.median(inproc)
        where = "a ViT-B/32-size pool of six tasks, batch 16" if a.b32 else "the fixtures"
        print(f"{flavour} AdaMerging, {a.steps} steps on {where} (median of {a.repeats}):")
        print(f"  fusion_bench (Rust)  whole process {mo:7.2f} s; adaptation in-process {mi:6.2f} s "
              f"({mi / a.steps * 1000:6.1f} ms/step)")
        print(f"  FusionBench 0.2.33   whole process {mt:7.2f} s")
        print(f"  peak RSS: ours {max(rss['ours']):8.0f} MiB, FusionBench {max(rss['theirs']):8.0f} MiB")
        print(f"  ratio (FusionBench / ours, whole process): {mt / mo:5.2f}x;  max |λ ours - λ FusionBench| = {diff:.2e}")


if __name__ == "__main__":
    main()
