"""Test-time adaptation benchmark: fusion_bench (Rust) against FusionBench 0.2.33, same inputs, same run.

Layer-wise and task-wise AdaMerging, seed=42, `taskpool=dummy` (adaptation only), both sides on
CPU with their defaults (FusionBench: DataLoaders with 8 workers). The sides run alternately
`--repeats` times; medians are compared, ratios printed as FusionBench's time / ours (> 1: we
are faster). Per run it reads:
  * the whole process's wall time;
  * the adaptation loop's time per step: ours from the `test-time adaptation loop` log line,
    FusionBench's from its tqdm bar (elapsed over its steps, as its own `s/it` shows);
  * the marginal cost of a step: (whole process at S steps − at 1 step) / (S − 1), which leaves
    out every one-off cost (loading, zero-shot heads, loader start-up) on both sides;
  * the main process's peak RSS (`wait4`'s ru_maxrss: mapped checkpoints count) and peak
    anonymous RSS (RssAnon sampled every 0.1 s: what the process owns).
The learned λ of both sides is checked to agree (the parity test's tolerance, k_proj biases aside).

Modes:
  (default)   the bundled fixtures (tiny CLIP, eight tasks), 20 steps.
  --b32       a ViT-B/32-size pool made here once (random CLIP, six perturbed vision towers for the
              six `tanganke/*` tasks, 64 random 320x240 JPEGs per test split; svhn and mnist are
              left out, their datasets need configs), `--steps` steps (default 3), batch 16.
  --l14       the same at ViT-L/14 size, ours only (FusionBench holds T + 2 models), `--steps`
              steps (default 2), batch 4 (the seed's L/14 recipe's `method.batch_size=4`).
  --exchange  ours on the fixtures with 2 processes on loopback (`--serve` computing + one
              `--join` worker) against 1 process: the share of the rounds' wall time not spent
              computing items (encoding, QUIC, scheduling, waiting), from the log line.

usage: python scripts/bench_tta.py [--repeats 3] [--steps N] [--b32 | --l14 | --exchange] [--work DIR]
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


def pool_overrides(size):
    """The model pool's words for `size`: `modelpool=...` first, then (beyond the fixtures) the
    removals of svhn and mnist. Shared with bench_wemoe.py."""
    pool = "clip-vit-large-patch14_TA8" if size == "l14" else "clip-vit-base-patch32_TA8"
    out = [f"modelpool=CLIPVisionModelPool/{pool}"]
    if size != "fixtures":
        out += ["~modelpool.models.svhn", "~modelpool.models.mnist",
                "~modelpool.test_datasets.svhn", "~modelpool.test_datasets.mnist",
                "~modelpool.train_datasets.svhn", "~modelpool.train_datasets.mnist"]
    return out


def args(flavour, steps, out_pt, size="fixtures"):
    pool, *drop = pool_overrides(size)
    a = ["method=adamerging/clip", f"method.name=clip_{flavour}_adamerging",
         f"method.save_merging_weights={out_pt}", f"method.max_steps={steps}",
         pool, "taskpool=dummy",
         "fabric.accelerator=cpu", "print_config=false", "seed=42"]
    if size == "l14":
        a.append("method.batch_size=4")
    return a + drop


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


SIZES = {
    # name: (hub name part, CLIPConfig keyword arguments)
    "b32": ("clip-vit-base-patch32", {}),
    "l14": ("clip-vit-large-patch14", {
        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                        "num_hidden_layers": 12, "projection_dim": 768},
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "image_size": 224,
                          "projection_dim": 768},
        "projection_dim": 768}),
}


def make_pool(work, size="b32"):
    """A hub cache: a random CLIP of `size`, six perturbed vision towers, six 64-image test splits."""
    import io
    import json
    import shutil
    part, kwargs = SIZES[size]
    home = os.path.join(work, "hf_home" if size == "b32" else f"hf_home_{size}")
    hub = os.path.join(home, "hub")
    done = os.path.join(home, "DONE")
    if os.path.exists(done):
        return os.path.dirname(hub)
    import numpy as np
    import torch
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**kwargs))
    snap = new_repo(hub, "models", f"openai/{part}")
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
        ft.save_pretrained(new_repo(hub, "models", f"tanganke/{part}_{task}"), safe_serialization=True)
        del ft
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
    """Wall seconds, stderr, peak RSS and peak anonymous RSS (MiB) of a whole process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
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
        err.seek(0)
        stderr = ANSI.sub("", err.read().decode(errors="replace"))
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    return dt, stderr, usage.ru_maxrss / 1024, anon / 1024


def loop_seconds(stderr, side, bar="AdaMerging Test-time adaptation"):
    """The adaptation loop's seconds and steps: ours from its log line, FusionBench's tqdm bar
    (its description `bar`: AdaMerging's by default; bench_wemoe.py passes WE-MoE's)."""
    if side == "ours":
        m = re.findall(r"test-time adaptation loop\b.*?\bsteps=(\d+)\b.*?\bseconds=([0-9.eE+-]+)", stderr)
        return (float(m[-1][1]), int(m[-1][0])) if m else (float("nan"), 1)
    m = re.findall(re.escape(bar) + r":\s+100%\|[^|]*\|\s*(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<",
                   stderr.replace("\r", "\n"))
    if not m:
        return float("nan"), 1
    n, h, mi, sec = m[-1]
    return int(h or 0) * 3600 + int(mi) * 60 + int(sec), int(n)


def log_field(stderr, line, field):
    m = re.findall(rf"{line}\b.*?\b{field}=([0-9.eE+-]+)", stderr)
    return float(m[-1]) if m else float("nan")


def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def compare(a, hf_home, env, flavour, size):
    """Both sides at `a.steps` and at 1 step, alternately, `a.repeats` times."""
    import torch
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    theirs_bin = os.path.join(os.path.dirname(sys.executable), "fusion_bench")
    sides = ["ours"] if size == "l14" else ["ours", "theirs"]
    counts = [a.steps] if a.steps == 1 or size == "l14" else [a.steps, 1]
    runs = {(side, n): [] for side in sides for n in counts}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        env["HF_DATASETS_CACHE"] = os.path.join(tmp, "ds-cache")
        for r in range(a.repeats):
            for n in counts:
                for side in sides:
                    cwd = os.path.join(tmp, f"{side}{r}-{n}")
                    os.makedirs(cwd)
                    pt = os.path.join(cwd, "lambda.pt")
                    extra = ([f"path.cache_dir={os.path.join(cwd, 'cache')}"] if side == "ours"
                             else fb_overrides(hf_home, size != "fixtures"))
                    cmd = [ours_bin if side == "ours" else theirs_bin] + args(flavour, n, pt, size) + extra
                    dt, err, peak, anon = timed(cmd, env, cwd)
                    runs[(side, n)].append((dt, loop_seconds(err, side), peak, anon))
        diff = float("nan")
        if len(sides) == 2:
            lo = torch.load(os.path.join(tmp, f"ours0-{a.steps}", "lambda.pt"), weights_only=True)
            lt = torch.load(os.path.join(tmp, f"theirs0-{a.steps}", "lambda.pt"), weights_only=True)
            diff = (lo.float() - lt.float()).abs().max().item()
    where = {"fixtures": "the fixtures", "b32": "a ViT-B/32-size pool of six tasks, batch 16",
             "l14": "a ViT-L/14-size pool of six tasks, batch 4"}[size]
    print(f"{flavour} AdaMerging, {a.steps} steps on {where} (median of {a.repeats}):")
    fig = {}
    for side in sides:
        rs = runs[(side, a.steps)]
        whole = med([x[0] for x in rs])
        per_step = med([x[1][0] / max(x[1][1], 1) for x in rs])
        marginal = float("nan")
        if (side, 1) in runs:
            marginal = (whole - med([x[0] for x in runs[(side, 1)]])) / (a.steps - 1)
        peak = max(x[2] for n in counts for x in runs[(side, n)])
        anon = max(x[3] for n in counts for x in runs[(side, n)])
        fig[side] = (whole, per_step, marginal)
        name = "fusion_bench (Rust)" if side == "ours" else "FusionBench 0.2.33 "
        print(f"  {name}  whole process {whole:7.2f} s;  loop {per_step:7.3f} s/step;  "
              f"marginal step {marginal:7.3f} s;  peak RSS {peak:7.0f} MiB (anonymous {anon:6.0f} MiB)")
    if len(sides) == 2:
        (wo, so, mo), (wt, st, mt) = fig["ours"], fig["theirs"]
        print(f"  ratios (FusionBench / ours): whole process {wt / wo:5.2f}x;  loop per step {st / so:5.2f}x;  "
              f"marginal step {mt / mo:5.2f}x;  max |λ ours - λ FusionBench| = {diff:.2e}")


def loopback(base, env, cwd):
    """`base` (our command line) as 2 processes on loopback: a `--serve 127.0.0.1:0` coordinator
    that computes too and one `--join` worker (in cwd/w), sharing the job folder cwd/job. Returns
    the coordinator's stderr (ANSI codes removed); exits if it fails. Shared with bench_wemoe.py."""
    import threading
    job = os.path.join(cwd, "job")
    coord = subprocess.Popen(base + ["--serve", "127.0.0.1:0", "--min-workers", "1", "--wait", "120",
                                     "--job-dir", job], env=env, cwd=cwd,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    addr = None
    for line in coord.stderr:
        lines.append(ANSI.sub("", line))
        m = re.search(r"coordinator listening.*?addr=(\S+)", lines[-1])
        if m:
            addr = m.group(1)
            break
    if addr is None:
        sys.exit("the coordinator did not say where it listens:\n" + "".join(lines[-30:]))
    wcwd = os.path.join(cwd, "w")
    os.makedirs(wcwd)
    worker = subprocess.Popen(base + ["--join", addr, "--node-name", "w1", "--job-dir", job],
                              env=env, cwd=wcwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rest = []
    t = threading.Thread(target=lambda: rest.extend(coord.stderr))
    t.start()
    coord.wait()
    worker.wait()
    t.join()
    err = "".join(lines) + ANSI.sub("", "".join(rest))
    if coord.returncode != 0:
        sys.exit("the 2-process run failed:\n" + err[-3000:])
    return err


def exchange(a, hf_home, env):
    """Ours, 1 process against 2 on loopback: loop time per step and the exchange share."""
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    rows = {1: [], 2: []}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        for r in range(a.repeats):
            for procs in (1, 2):
                cwd = os.path.join(tmp, f"p{procs}-{r}")
                os.makedirs(cwd)
                base = [ours_bin] + args("layer_wise", a.steps, os.path.join(cwd, "lambda.pt"), "fixtures") + [
                    f"path.cache_dir={os.path.join(tmp, 'cache', str(r), str(procs))}", "+method.checkpoint_every_steps=1000000"]
                if procs == 1:
                    _, err, _, _ = timed(base, env, cwd)
                else:
                    err = loopback(base, env, cwd)
                rows[procs].append((log_field(err, "test-time adaptation loop", "seconds_per_step"),
                                    log_field(err, "test-time adaptation loop", "exchange_share")))
    print(f"layer-wise AdaMerging on the fixtures, {a.steps} steps, ours (median of {a.repeats}):")
    for procs in (1, 2):
        sps, share = med([x[0] for x in rows[procs]]), med([x[1] for x in rows[procs]])
        print(f"  {procs} process(es){' on loopback' if procs == 2 else '            '}: {sps * 1000:7.1f} ms/step; "
              f"share of the rounds not computing items: {share * 100:5.1f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--b32", action="store_true")
    mode.add_argument("--l14", action="store_true")
    mode.add_argument("--exchange", action="store_true")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/fusion_bench/bench_tta"))
    a = ap.parse_args()
    size = "b32" if a.b32 else "l14" if a.l14 else "fixtures"
    a.steps = a.steps or {"b32": 3, "l14": 2, "fixtures": 20}[size]
    a.repeats = a.repeats or (1 if size != "fixtures" else 3)
    os.makedirs(a.work, exist_ok=True)
    hf_home = make_pool(a.work, size) if size != "fixtures" else os.path.join(ROOT, "tests", "fixtures", "hf_home")
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", RUST_LOG="info")
    if a.exchange:
        exchange(a, hf_home, env)
        return
    for flavour in ["layer_wise", "task_wise"]:
        compare(a, hf_home, env, flavour, size)


if __name__ == "__main__":
    main()
