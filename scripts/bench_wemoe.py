"""Weight-Ensembling MoE router-training benchmark: fusion_bench (Rust) against FusionBench 0.2.33,
same inputs, same run.

Dense WE-MoE (`method=wemoe/weight_ensembling_moe method.name=clip_weight_ensembling_moe`),
`method.use_grad_accumulate=false` (the seed's B/32 line), seed=42, `taskpool=dummy` (router
training only), both sides on CPU with their defaults: FusionBench's DataLoaders keep the method
config's `num_workers: 16` (one loader per task, created at the loop's first step, so the
fixtures run 8 x 16 worker processes), torch at its default thread count. Both sides save the
trained model (`method.save_checkpoint=<file>.ckpt`). The sides run alternately `--repeats` times;
medians are compared, ratios printed as FusionBench's figure / ours (> 1: we are faster). Per run:
  * the whole process's wall time;
  * the router-training loop's seconds per step: ours the `seconds_per_step` field of the
    `test-time adaptation loop` log line (RUST_LOG=info); FusionBench's from its tqdm bar "Test-time
    adaptation" (elapsed over its steps; tqdm prints whole seconds, so at a few steps of the
    fixtures this figure is coarse). Both include the loop's first step, where FusionBench
    starts its loaders' workers;
  * the marginal cost of a step: (whole process at S steps - at 1 step) / (S - 1), which leaves out
    every one-off cost (loading, building the MoE model, zero-shot heads, loader start-up, saving
    the checkpoint) on both sides;
  * the main process's peak RSS (`wait4`'s ru_maxrss: mapped checkpoints count) and peak anonymous
    RSS (RssAnon sampled every 0.1 s: what the process owns). FusionBench's loader workers are
    other processes: neither figure counts them.
The learned routers of both sides are checked to agree: both .ckpt files of the first repeat at S
steps are loaded (`torch.load(weights_only=True)['model']`) and, over the state-dict entries whose
name holds `.mlp.gate.`, max|ours - FusionBench| / max|FusionBench| per tensor is printed, the
max over tensors (the key sets must be equal).

FusionBench's stock CLI cannot run WE-MoE (0.2.33's `task_arithmetic_merge` fails its own
validator: a TypeError, Parameter against Tensor). It runs here through a tiny inline launcher
(LAUNCHER below) that installs only the shim of scripts/fixtures/fb_wemoe_hooks.py
(`install_shim()`, which changes no value FusionBench computes) and then calls FusionBench's CLI
main as its `fusion_bench` script does: FusionBench runs unrecorded and at its stock defaults, as
bench_tta.py runs the stock CLI for AdaMerging. The wrapper itself is not used: its recording
hooks (every MoE forward's routing weights, every batch's indices checked against the dataset,
generator-state checks) add work, and importing them pins torch to one intra-op and one inter-op
thread (the goldens' setting), which is not FusionBench's default; its `--fixtures` also adds
task-pool dataset overrides that `taskpool=dummy` rejects (the modelpool-only overrides are
bench_tta.py's fb_overrides). In two noisy 2-step runs on 2 busy cores the wrapper was not
slower (its single thread, if anything, faster than the default 2 threads beside the 8 x 16
loader workers): the thread count matters more than the recording there. The launcher imports the hooks module for the shim and then undoes
the pin: it pins the inter-op pool at torch's default first (so the hooks'
`set_num_interop_threads(1)` is refused, which they ignore), restores the intra-op count and
OMP_NUM_THREADS (unset, unless the caller set it).

Modes:
  (default)   the bundled fixtures (tiny CLIP, eight tasks), whole runs of `--steps` steps
              (default 20) and of 1 step, batch 16.
  --b32       a ViT-B/32-size pool made once by bench_tta.py's make_pool (random CLIP, six perturbed
              vision towers for the six `tanganke/*` tasks, 64 random 320x240 JPEGs per test split;
              svhn and mnist are left out, their datasets need configs), `--steps` steps (default
              3) and 1 step each side, batch 16. Each .ckpt holds the whole MoE model (~1.7 GB at
              B/32); all but the two compared are deleted as soon as their run ends.
  --ours-only leave FusionBench out (its B/32 WE-MoE outgrows a 24 GiB machine: killed by the OOM
              killer at 18.5 GB anonymous RSS in its second step, measured 2026-12-04).
  --l14       ours only (as bench_tta.py's --l14) at ViT-L/14 size (make_pool's l14 pool), `--steps` steps
              (default 2), `method.batch_size=4 method.use_grad_accumulate=true` (the seed's L/14
              recipe): whole process, loop s/step and peak RSS. The .ckpt it writes is ~6 GB
              (deleted after the run): keep that much free under `--work`.
  --exchange  ours on the fixtures (with --b32: the B/32-size pool, 3 steps, 1 repeat), `--steps`
              steps (default 20), 1 process against 2 on loopback
              (`--serve 127.0.0.1:0` computing + one `--join` worker, as bench_tta.py's exchange
              mode): seconds per step, the log line's `exchange_share` (the share of the rounds'
              wall time not spent computing items: the ring's reduction, waiting for the slower
              rank, the round's messages) and `reduce_seconds_per_step` (the reduction itself: the
              time of the rank that reached it last; alone, the local fold); the 2-process routers are checked against the 1-process ones (the same
              relative figure; the runtime promises the same bits: 0).

usage: python scripts/bench_wemoe.py [--repeats 3] [--steps N] [--b32 | --l14] [--exchange] [--work DIR]
       (python from scripts/fixtures/ref-venv.sh; build first: cargo build --release; the libtorch
       of scripts/env.sh on the library path)
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_tta import (fb_overrides, log_field, loop_seconds, loopback, make_pool, med,  # noqa: E402
                       pool_overrides, timed)

BAR = "Test-time adaptation"  # FusionBench's WE-MoE tqdm bar (AdaMerging's says "AdaMerging ...")
LINE = "test-time adaptation loop"  # our log line
FIXTURES = os.path.join(ROOT, "scripts", "fixtures")

# FusionBench's CLI with fb_wemoe_hooks.py's shim and nothing else.
# argv: <folder of fb_wemoe_hooks.py> <argv[0] for hydra> <fusion_bench words...>
LAUNCHER = r"""
import os, sys
hooks, argv0, *words = sys.argv[1:]
omp = os.environ.get("OMP_NUM_THREADS")
import torch
threads = torch.get_num_threads()
torch.set_num_interop_threads(torch.get_num_interop_threads())
sys.path.insert(0, hooks)
import fb_wemoe_hooks
torch.set_num_threads(threads)
if omp is None:
    os.environ.pop("OMP_NUM_THREADS", None)
else:
    os.environ["OMP_NUM_THREADS"] = omp
fb_wemoe_hooks.install_shim()
from fusion_bench.scripts.cli import _hydra_main
sys.argv = [argv0] + words
sys.exit(_hydra_main())
"""


def args(steps, ckpt, size="fixtures"):
    """Dense WE-MoE's words, both sides (the model pool's from bench_tta.py)."""
    pool, *drop = pool_overrides(size)
    a = ["method=wemoe/weight_ensembling_moe", "method.name=clip_weight_ensembling_moe",
         f"method.use_grad_accumulate={'true' if size == 'l14' else 'false'}",
         f"method.save_checkpoint={ckpt}", f"method.max_steps={steps}",
         pool, "taskpool=dummy", "fabric.accelerator=cpu", "print_config=false", "seed=42"]
    if size == "l14":
        a.append("method.batch_size=4")
    return a + drop


def theirs(words):
    fb = os.path.join(os.path.dirname(sys.executable), "fusion_bench")
    return [sys.executable, "-c", LAUNCHER, FIXTURES, fb] + words


def routers(path):
    import torch
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
    return {k: v for k, v in sd.items() if ".mlp.gate." in k}


def router_diff(path_a, path_b):
    """max over the `.mlp.gate.` tensors of max|a - b| / max|b|, and how many tensors."""
    a, b = routers(path_a), routers(path_b)
    if sorted(a) != sorted(b) or not a:
        sys.exit(f"router keys differ: {path_a} has {len(a)}, {path_b} has {len(b)}; "
                 f"only in the first: {sorted(set(a) - set(b))[:4]}, only in the second: {sorted(set(b) - set(a))[:4]}")
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        if x.shape != y.shape:
            sys.exit(f"router {k}: shape {tuple(x.shape)} against {tuple(y.shape)}")
        num, den = (x - y).abs().max().item(), y.abs().max().item()
        worst = max(worst, num / den if den > 0 else (0.0 if num == 0 else float("inf")))
    return worst, len(a)


def ratio(x, y):
    return x / y if y == y and y > 0 and x == x else float("nan")


def compare(a, hf_home, env, size):
    """Both sides at `a.steps` and at 1 step, alternately, `a.repeats` times."""
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    sides = ["ours"] if size == "l14" or a.ours_only else ["ours", "theirs"]
    counts = [a.steps] if a.steps == 1 or size == "l14" else [a.steps, 1]
    runs = {(side, n): [] for side in sides for n in counts}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        env["HF_DATASETS_CACHE"] = os.path.join(tmp, "ds-cache")
        for r in range(a.repeats):
            for n in counts:
                for side in sides:
                    cwd = os.path.join(tmp, f"{side}{r}-{n}")
                    os.makedirs(cwd)
                    ckpt = os.path.join(cwd, "model.ckpt")
                    words = args(n, ckpt, size)
                    if side == "ours":
                        cmd = [ours_bin] + words + [f"path.cache_dir={os.path.join(cwd, 'cache')}"]
                    else:
                        cmd = theirs(words + fb_overrides(hf_home, size != "fixtures"))
                    dt, err, peak, anon = timed(cmd, env, cwd)
                    if side == "ours":
                        loop = log_field(err, LINE, "seconds_per_step")
                    else:
                        secs, steps = loop_seconds(err, side, bar=BAR)
                        loop = secs / max(steps, 1)
                    runs[(side, n)].append((dt, loop, peak, anon))
                    if not os.path.exists(ckpt):
                        sys.exit(f"{side} wrote no {ckpt}:\n{err[-3000:]}")
                    if (r, n) != (0, a.steps) or len(sides) == 1:
                        os.remove(ckpt)
        diff, tensors = float("nan"), 0
        if len(sides) == 2:
            diff, tensors = router_diff(os.path.join(tmp, f"ours0-{a.steps}", "model.ckpt"),
                                        os.path.join(tmp, f"theirs0-{a.steps}", "model.ckpt"))
    where = {"fixtures": "the fixtures, batch 16", "b32": "a ViT-B/32-size pool of six tasks, batch 16",
             "l14": "a ViT-L/14-size pool of six tasks, batch 4, use_grad_accumulate=true"}[size]
    print(f"WE-MoE router training, {a.steps} steps on {where} (median of {a.repeats}):")
    fig = {}
    for side in sides:
        rs = runs[(side, a.steps)]
        whole = med([x[0] for x in rs])
        per_step = med([x[1] for x in rs])
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
        print(f"  ratios (FusionBench / ours): whole process {ratio(wt, wo):5.2f}x;  "
              f"loop per step {ratio(st, so):5.2f}x;  marginal step {ratio(mt, mo):5.2f}x")
        print(f"  routers: max over the {tensors} .mlp.gate. tensors of max|ours - FusionBench| / "
              f"max|FusionBench| = {diff:.2e}")


def exchange(a, env, size):
    """Ours, 1 process against 2 on loopback: s/step, exchange share, same routers."""
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    rows = {1: [], 2: []}
    diff, tensors = 0.0, 0
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        for r in range(a.repeats):
            for procs in (1, 2):
                cwd = os.path.join(tmp, f"p{procs}-{r}")
                os.makedirs(cwd)
                base = [ours_bin] + args(a.steps, os.path.join(cwd, "model.ckpt"), size) + [
                    f"path.cache_dir={os.path.join(tmp, 'cache', str(r), str(procs))}",
                    "+method.checkpoint_every_steps=1000000"]
                if procs == 1:
                    _, err, _, _ = timed(base, env, cwd)
                else:
                    err = loopback(base, env, cwd)
                rows[procs].append((log_field(err, LINE, "seconds_per_step"), log_field(err, LINE, "exchange_share"),
                                    log_field(err, LINE, "reduce_seconds_per_step")))
            d, tensors = router_diff(os.path.join(tmp, f"p2-{r}", "model.ckpt"), os.path.join(tmp, f"p1-{r}", "model.ckpt"))
            diff = max(diff, d)
    where = "the fixtures" if size == "fixtures" else "a ViT-B/32-size pool of six tasks, batch 16"
    print(f"WE-MoE router training on {where}, {a.steps} steps, ours (median of {a.repeats}):")
    for procs in (1, 2):
        sps, share = med([x[0] for x in rows[procs]]), med([x[1] for x in rows[procs]])
        red = med([x[2] for x in rows[procs]])
        print(f"  {procs} process(es){' on loopback' if procs == 2 else '            '}: {sps * 1000:7.1f} ms/step; "
              f"share of the rounds not computing items: {share * 100:5.1f}%; "
              f"summing the router gradients: {red * 1000:7.1f} ms/step")
    print(f"  routers, 2 processes against 1: max over the {tensors} .mlp.gate. tensors of "
          f"max|a - b| / max|b| = {diff:.2e} (worst repeat)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=None, help="default 3 on the fixtures, else 1")
    ap.add_argument("--steps", type=int, default=None, help="default 20 on the fixtures, 3 at B/32, 2 at L/14")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--b32", action="store_true")
    mode.add_argument("--l14", action="store_true")
    ap.add_argument("--exchange", action="store_true", help="with --b32: at the B/32 size")
    ap.add_argument("--ours-only", action="store_true",
                    help="leave FusionBench out (at B/32 it needs more than 18 GB: on a 24 GiB machine "
                         "the OOM killer ends it in its second step)")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/fusion_bench/bench_tta"),
                    help="where the B/32 and L/14 pools are made once (bench_tta.py's, shared) and runs are scratched")
    a = ap.parse_args()
    size = "b32" if a.b32 else "l14" if a.l14 else "fixtures"
    a.steps = a.steps or {"b32": 3, "l14": 2, "fixtures": 20}[size]
    a.repeats = a.repeats or (1 if size != "fixtures" else 3)
    os.makedirs(a.work, exist_ok=True)
    hf_home = make_pool(a.work, size) if size != "fixtures" else os.path.join(ROOT, "tests", "fixtures", "hf_home")
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", RUST_LOG="info")
    if a.exchange:
        if size == "l14":
            sys.exit("--exchange runs on the fixtures or, with --b32, at the B/32 size")
        exchange(a, env, size)
        return
    compare(a, hf_home, env, size)


if __name__ == "__main__":
    main()
