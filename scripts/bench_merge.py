"""Merge benchmark: fusion_bench (Rust) against FusionBench 0.2.33 on the same nine checkpoints.

Builds (once, under --work) a hub cache holding a model pool with the real CLIP vision
architecture and random weights: `_pretrained_` plus eight "fine-tuned" models (pretrained plus
small noise), nine safetensors files, under the repo ids of FusionBench's TA8 pools, so both tools
run the seed's own command lines:

    fusion_bench method=<m> modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=dummy
                 merged_model_save_path=<dir>

and prints, in one run, for task arithmetic (lambda 0.3) and TIES (lambda 0.3, threshold 20, sum):
- whole-process time (imports, loading, merging and saving included), median of --repeats, ours and
  FusionBench's, and their ratio (FusionBench / ours; > 1 means we are faster);
- in-process merge time: ours as the binary logs it (`method done`, reading the nine files,
  merging and writing the output included), FusionBench's as `algorithm.run(modelpool)` timed in
  a Python process (loading included, saving not);
- the I/O limit: the fastest of several ways to read every byte of the nine files from the page
  cache into this process (after a warming read; each printed): `read` into one reused buffer
  (64 MiB; 1 MiB, with and without `posix_fadvise(SEQUENTIAL)`), `preadv` into reused buffers,
  and mapping each file and reading all its words (pages faulted in as read, or prefaulted with
  MAP_POPULATE; one thread, or one per core); and our whole-process and in-process times as
  multiples of the fastest. Mapping the files and touching one word per page is printed too, but
  it reads almost none of the bytes, so it is no limit for a merge that must read them all;
- peak anonymous RSS above the idle process (sampled every 5 ms from /proc/<pid>/status; the idle
  level is the same binary's peak for `dry_run=true`, FusionBench's for `--cfg job`), in units of
  one model's size;
- whether the two merged models are equal (bit for bit, else the largest difference).
With --l14, ours also runs at the ViT-L/14 size (nine x 1.2 GB), where FusionBench is not run.

usage: python scripts/bench_merge.py [--repeats 3] [--work DIR] [--l14] [--skip-fusionbench-ties]
       (python from scripts/fixtures/ref-venv.sh; build first: cargo build --release)
"""
import argparse
import json
import mmap
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench_eval import new_repo  # the hub-cache layout (scripts/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TA8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
ARCH = {
    "b32": dict(prefix="clip-vit-base-patch32", config={}),
    "l14": dict(prefix="clip-vit-large-patch14",
                config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                            num_hidden_layers=24, patch_size=14, projection_dim=768)),
}


def make_pool(work, arch):
    """HF_HOME with openai/<prefix> and tanganke/<prefix>_<task> for the eight TA8 tasks."""
    hf_home = os.path.join(work, f"hf_home_{arch}")
    done = os.path.join(hf_home, "DONE")
    if os.path.exists(done):
        return hf_home
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    hub = os.path.join(hf_home, "hub")
    prefix = ARCH[arch]["prefix"]
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**ARCH[arch]["config"]))
    snap = new_repo(hub, "models", f"openai/{prefix}")
    model.save_pretrained(snap, safe_serialization=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    for i, task in enumerate(TA8):
        g = torch.Generator().manual_seed(i + 1)
        # A task vector of a few per cent of each tensor's scale, as fine-tuning gives.
        ft = {k: v + 0.02 * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
              for k, v in sd.items()}
        tsnap = new_repo(hub, "models", f"tanganke/{prefix}_{task}")
        shutil.copy(os.path.join(snap, "config.json"), tsnap)
        save_file(ft, os.path.join(tsnap, "model.safetensors"), metadata={"format": "pt"})
        del ft
    with open(done, "w") as f:
        f.write("ok")
    return hf_home


def model_files(hf_home):
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(hf_home, "hub"))
                  for f in fs if f == "model.safetensors")


def read_reused(files, chunk=1 << 20, advise=False):
    """`read` (readinto) each file in pieces into one reused buffer (1 MiB stays in cache)."""
    view = memoryview(bytearray(chunk))
    for p in files:
        with open(p, "rb", buffering=0) as f:
            if advise:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while f.readinto(view):
                pass


def preadv_reused(files):
    """`preadv` each file into four reused 256 KiB buffers."""
    bufs = [bytearray(256 << 10) for _ in range(4)]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            offset = 0
            while n := os.preadv(fd, bufs, offset):
                offset += n
        finally:
            os.close(fd)


def mmap_words(path, flags, op):
    """Maps `path`, applies `op` to its 8-byte words (a numpy array over the mapping), unmaps."""
    import numpy as np

    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        words = np.frombuffer(m, dtype=np.uint64, count=len(m) // 8)
        out = int(op(words))
        del words
        m.close()
    return out


def mmap_read(files, populate=False, threads=1):
    """Map each file and read every byte (a sum of its 8-byte words), then unmap; the files
    shared out between `threads` threads (numpy's sums run without the GIL)."""
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)

    def one(path):
        return mmap_words(path, flags, lambda w: w.sum())

    if threads == 1:
        return [one(p) for p in files]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, files))


def mmap_touch(files):
    """Map each file and read one word of every page (all pages mapped, few bytes read)."""
    step = mmap.PAGESIZE // 8
    return [mmap_words(p, mmap.MAP_SHARED, lambda w: w[::step].sum()) for p in files]


# Ways to read every byte of the files into this process.
IO_WAYS = {
    "read, reused 64 MiB buffer": lambda files: read_reused(files, chunk=64 << 20),
    "read, reused 1 MiB buffer": read_reused,
    "read 1 MiB + fadvise(SEQUENTIAL)": lambda files: read_reused(files, advise=True),
    "preadv, reused buffers": preadv_reused,
    "mmap, read every byte": mmap_read,
    "mmap(MAP_POPULATE), read every byte": lambda files: mmap_read(files, populate=True),
    f"mmap, read every byte, {os.cpu_count()} threads": lambda files: mmap_read(files, threads=os.cpu_count()),
}


def best_of_3(way, files):
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        way(files)
        best = min(best, time.perf_counter() - t0)
    return best


def io_limit(files):
    """(seconds of the fastest way, {way: best of 3 seconds}) to read every byte of `files` from
    the page cache, after a warming read; the times include mapping only the pages, which reads
    almost nothing and so is no limit (printed apart)."""
    read_reused(files)
    times = {name: best_of_3(way, files) for name, way in IO_WAYS.items()}
    times[PAGES_ONLY] = best_of_3(mmap_touch, files)
    return min(v for k, v in times.items() if k != PAGES_ONLY), times


PAGES_ONLY = "mmap, one word per page"


def io_line(times):
    ways = {k: v for k, v in times.items() if k != PAGES_ONLY}
    fastest = min(ways, key=ways.get)
    line = "; ".join(f"{k} {v:.3f} s" + (" (the limit)" if k == fastest else "") for k, v in ways.items())
    return line + f"; not a read: {PAGES_ONLY} {times[PAGES_ONLY]:.3f} s"


def rss_anon_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_sampled(cmd, env, cwd):
    """(seconds, peak RssAnon in bytes, stderr) of a whole process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_kb(p.pid))
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.start()
    _, err = p.communicate()
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return dt, peak[0] * 1024, err


METHODS = {
    "task_arithmetic": ["method=task_arithmetic", "method.scaling_factor=0.3"],
    "ties_merging": ["method=ties_merging", "method.scaling_factor=0.3", "method.threshold=20",
                     "method.merge_func=sum"],
}

INPROC = r"""
import sys, time, json, torch
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
prefix, method = sys.argv[1], sys.argv[2]
tasks = %r
models = {"_pretrained_": f"openai/{prefix}"}
models.update({t: f"tanganke/{prefix}_{t}" for t in tasks})
pool = CLIPVisionModelPool(models=models)
alg = (TaskArithmeticAlgorithm(scaling_factor=0.3) if method == "task_arithmetic" else
       TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum"))
t0 = time.perf_counter()
alg.run(pool)
print(json.dumps({"seconds": time.perf_counter() - t0}))
""" % (TA8,)


def env_for(hf_home, tmp):
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_CACHE=os.path.join(tmp, "ds-cache"), RUST_LOG="info")
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(k, None)
    return env


def compare(a_dir, b_dir):
    import torch
    from safetensors.torch import load_file
    a = load_file(os.path.join(a_dir, "model.safetensors"))
    b = load_file(os.path.join(b_dir, "model.safetensors"))
    if sorted(a) != sorted(b):
        return "different keys"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # Bits, not values: torch.equal would take -0.0 for 0.0.
    same = all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
               and a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)) for k in a)
    return "bit-identical" if same else f"max |diff| {worst:.3g}"


def bench(arch, hf_home, repeats, tmp, fusionbench, skip_fb_ties):
    prefix = ARCH[arch]["prefix"]
    files = model_files(hf_home)
    model_bytes = os.path.getsize(files[0])
    total = sum(os.path.getsize(f) for f in files)
    io, times = io_limit(files)
    env = env_for(hf_home, tmp)
    ours_bin = os.path.join(ROOT, "target", "release", "fusion_bench")
    theirs_bin = os.path.join(os.path.dirname(sys.executable), "fusion_bench")
    pool = [f"modelpool=CLIPVisionModelPool/{prefix}_TA8", "taskpool=dummy", "fabric.accelerator=cpu",
            "print_config=false", "report_save_path=null"]
    cwd = os.path.join(tmp, "cwd")  # no ./config here: it would shadow FusionBench's configs
    os.makedirs(cwd, exist_ok=True)
    _, ours_idle, _ = run_sampled([ours_bin, "method=dummy"] + pool + ["dry_run=true"], env, ROOT)
    print(f"\n== {arch}: nine files of {model_bytes / 2**20:.0f} MiB ({total / 2**30:.2f} GiB); "
          f"I/O limit (the fastest way to read all nine from the page cache) {io:.3f} s = "
          f"{total / io / 2**30:.2f} GiB/s\n  ways: {io_line(times)}")
    theirs_idle = None
    if fusionbench:
        _, theirs_idle, _ = run_sampled([theirs_bin, "--cfg", "job", "method=dummy"] + pool, env, cwd)
    for method, margs in METHODS.items():
        # The machine's speed drifts: the limit is measured again next to each method's runs.
        io, times = io_limit(files)
        ours, inproc, ours_rss, theirs, theirs_rss, theirs_in = [], [], [], [], [], []
        run_fb = fusionbench and not (skip_fb_ties and method == "ties_merging")
        for _ in range(repeats):
            out = os.path.join(tmp, f"ours_{method}")
            # Each run writes a fresh folder: freeing the previous run's output (about 0.2 s for
            # a B/32 file) is not part of merging, for either tool.
            shutil.rmtree(out, ignore_errors=True)
            dt, rss, err = run_sampled([ours_bin] + margs + pool + [f"merged_model_save_path={out}"], env, ROOT)
            ours.append(dt)
            ours_rss.append(rss - ours_idle)
            inproc += [float(m) for m in re.findall(r"method done seconds=([0-9.]+)", err)]
            if run_fb:
                out = os.path.join(tmp, f"theirs_{method}")
                shutil.rmtree(out, ignore_errors=True)
                dt, rss, _ = run_sampled([theirs_bin] + margs + pool + [f"merged_model_save_path={out}"], env, cwd)
                theirs.append(dt)
                theirs_rss.append(rss - theirs_idle)
                p = subprocess.run([sys.executable, "-c", INPROC, prefix, method], env=env, cwd=cwd,
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(p.stderr[-3000:])
                theirs_in.append(json.loads(p.stdout.strip().splitlines()[-1])["seconds"])
        mo, mi = statistics.median(ours), statistics.median(inproc)
        print(f"{method}: (I/O limit now {io:.3f} s; {io_line(times)})")
        print(f"  ours         whole process {mo:7.2f} s  in-process {mi:7.2f} s  "
              f"= {mo / io:.2f}x / {mi / io:.2f}x the I/O limit; "
              f"peak anon RSS above idle {max(ours_rss) / 2**30:.2f} GiB = {max(ours_rss) / model_bytes:.2f} models")
        if run_fb:
            mt, ti = statistics.median(theirs), statistics.median(theirs_in)
            print(f"  FusionBench  whole process {mt:7.2f} s  in-process {ti:7.2f} s; "
                  f"peak anon RSS above idle {max(theirs_rss) / 2**30:.2f} GiB = {max(theirs_rss) / model_bytes:.2f} models")
            print(f"  ratio (FusionBench / ours): whole process {mt / mo:.2f}x, in-process {ti / mi:.2f}x; "
                  f"outputs: {compare(os.path.join(tmp, f'ours_{method}'), os.path.join(tmp, f'theirs_{method}'))}")
        elif fusionbench:
            print("  FusionBench  not run (--skip-fusionbench-ties)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/fusion_bench/bench"))
    ap.add_argument("--l14", action="store_true", help="also run ours at the ViT-L/14 size")
    ap.add_argument("--only-l14", action="store_true", help="run only the ViT-L/14 part")
    ap.add_argument("--skip-fusionbench-ties", action="store_true",
                    help="do not run FusionBench's TIES (it needs about 23 GB at B/32)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    with tempfile.TemporaryDirectory(dir=args.work if os.path.isdir(args.work) else None) as tmp:
        if not args.only_l14:
            bench("b32", make_pool(args.work, "b32"), args.repeats, tmp, True, args.skip_fusionbench_ties)
        if args.l14 or args.only_l14:
            bench("l14", make_pool(args.work, "l14"), max(1, args.repeats // 2), tmp, False, False)


if __name__ == "__main__":
    main()
