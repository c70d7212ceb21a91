#!/usr/bin/env python3
"""Read the TensorBoard event files our Rust writer made with TensorBoard's own reader.

Checks every log directory under <logdir> that holds an `expected.json` (as written by the Rust
test `report::metrics_log::tests::writes_the_python_check_fixture`) with
`tensorboard.backend.event_processing.event_accumulator.EventAccumulator`: the file version, the
scalar tags, each scalar's step and float32 value (bit-exact; NaN matches NaN), and wall times
(exact where expected.json gives one, else within [wall_time_min, wall_time_max]). A
`metrics.csv` beside the events is read with Python's `csv` module too: header sorted and holding
`step`, one row per step, and every value rounding to the float32 TensorBoard holds.

Run (the venv needs only `pip install tensorboard`):

    python3 -m venv /tmp/tbvenv && /tmp/tbvenv/bin/pip install tensorboard
    FUSION_BENCH_TB_CHECK_DIR=/tmp/tbcheck cargo test --release --lib \
        report::metrics_log::tests::writes_the_python_check_fixture -- --exact
    /tmp/tbvenv/bin/python scripts/check_tensorboard_events.py /tmp/tbcheck

Prints what it read; exits 1 on any mismatch, 2 when there is nothing to check.
"""

import csv
import json
import math
import struct
import sys
from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def same_f32(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return f32_bits(a) == f32_bits(b)


def check_dir(run: Path) -> list:
    """The mismatches of one log directory against its expected.json."""
    want = json.loads((run / "expected.json").read_text())
    errors = []
    acc = event_accumulator.EventAccumulator(str(run), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    print(f"{run}: file_version={acc.file_version!r}, first event at {acc.FirstEventTimestamp()!r}")
    expected_version = float(want["file_version"].split(":")[1])
    if acc.file_version != expected_version:
        errors.append(f"file_version {acc.file_version!r}, expected {expected_version!r}")
    tags = sorted(acc.Tags()[event_accumulator.SCALARS])
    if tags != sorted(want["scalars"]):
        errors.append(f"scalar tags {tags}, expected {sorted(want['scalars'])}")
    lo, hi = want["wall_time_min"], want["wall_time_max"]
    by_step = {}
    for tag, points in sorted(want["scalars"].items()):
        got = acc.Scalars(tag) if tag in tags else []
        print(f"  {tag}: {len(got)} scalars")
        for e in got:
            print(f"    step={e.step} value={e.value!r} wall_time={e.wall_time!r}")
            by_step.setdefault(e.step, {})[tag] = e.value
        if len(got) != len(points):
            errors.append(f"{tag}: {len(got)} scalars, expected {len(points)}")
        for e, (step, value, wall) in zip(got, points):
            if e.step != step:
                errors.append(f"{tag}: step {e.step}, expected {step}")
            if not same_f32(e.value, value):
                errors.append(f"{tag} at step {step}: value {e.value!r}, expected {value!r}")
            if wall is not None and e.wall_time != wall:
                errors.append(f"{tag} at step {step}: wall_time {e.wall_time!r}, expected {wall!r}")
            if wall is None and not lo <= e.wall_time <= hi:
                errors.append(f"{tag} at step {step}: wall_time {e.wall_time!r} outside [{lo}, {hi}]")
    metrics_csv = run / "metrics.csv"
    if metrics_csv.exists():
        errors += check_csv(metrics_csv, by_step)
    return errors


def check_csv(path: Path, by_step: dict) -> list:
    errors = []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0].keys()) if rows else []
    print(f"  {path.name}: header {header}, {len(rows)} rows")
    if header != sorted(header) or "step" not in header:
        errors.append(f"{path}: header {header} is not sorted or lacks 'step'")
    if sorted(int(r["step"]) for r in rows) != sorted(by_step):
        errors.append(f"{path}: steps differ from the event file's")
    for r in rows:
        step = int(r["step"])
        for k, v in r.items():
            if k == "step" or v == "":
                continue
            tb = by_step.get(step, {}).get(k)
            if tb is None or not same_f32(float(v), tb):
                errors.append(f"{path}: {k} at step {step} is {v}, TensorBoard has {tb!r}")
    return errors


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    runs = sorted(p.parent for p in Path(sys.argv[1]).rglob("expected.json"))
    if not runs:
        print(f"no expected.json under {sys.argv[1]}", file=sys.stderr)
        return 2
    failed = False
    for run in runs:
        errors = check_dir(run)
        for e in errors:
            print(f"MISMATCH {run}: {e}")
        failed |= bool(errors)
    print("FAIL" if failed else f"OK: {len(runs)} log directories match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
