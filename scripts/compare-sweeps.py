#!/usr/bin/env python3
"""Compares `patchbay sweep --out` JSON files with the HF transformers reference numbers.

Usage:  compare-sweeps.py REFERENCE.json TOLERANCE DEVICE SWEEP.json [SWEEP.json ...]

Each sweep file must be named `<model>-<component>-<schedule>-<dtype>.json`, `<model>` being a
model's name in REFERENCE (tests/fixtures/tiny_reference.json), and must have run on DEVICE (`cpu`
or `cuda`) in that dtype. Prints, per file, the largest absolute difference in raw logit difference
over the clean and corrupted runs and every cell, and exits with 1 if any file is missing,
malformed or from the wrong device or dtype, or if an f32 file's difference is over TOLERANCE
(bf16/f16 files are reported, not judged: a random-weight model's logit differences in 8 bits of
mantissa are no reference's business). Standard library only, so it runs wherever python3 does.
"""
import json
import math
import os
import sys


def compare(path, models, device):
    """(cells, largest difference, dtype) of one sweep file; raises ValueError when it cannot."""
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = stem.rsplit("-", 3)
    if len(parts) != 4:
        raise ValueError("not named <model>-<component>-<schedule>-<dtype>.json")
    model, component, _schedule, dtype = parts
    if model not in models:
        raise ValueError(f"no reference for model {model!r}")
    ref = models[model]
    try:
        with open(path) as f:
            got = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"no result ({e})") from None
    ran_on = str(got.get("model", {}).get("device", ""))
    ran_in = str(got.get("model", {}).get("dtype", ""))
    if not ran_on.startswith(device):
        raise ValueError(f"ran on {ran_on!r}, not {device}")
    if ran_in != dtype:
        raise ValueError(f"ran in {ran_in!r}, not {dtype}")
    expected = ref["patched_logit_diff"][component]
    cells = got.get("patched_logit_diff")
    if not isinstance(cells, list) or [len(r) for r in cells] != [len(r) for r in expected]:
        raise ValueError("its grid is not the reference's shape")
    diffs = []
    for key in ("clean_logit_diff", "corrupted_logit_diff"):
        value = got.get(key)
        diffs.append(math.inf if value is None else abs(value - ref[key]))
    for row, ref_row in zip(cells, expected):
        for value, want in zip(row, ref_row):
            diffs.append(math.inf if value is None else abs(value - want))
    return len(diffs) - 2, max(diffs), dtype


def main() -> int:
    if len(sys.argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        reference = json.load(f)
    tolerance = float(sys.argv[2])
    device = sys.argv[3]
    models = {m["name"]: m for m in reference["models"]}
    failed = False
    print(f"{'sweep':<36} {'cells':>5} {'max |Δ LD|':>11}  verdict (f32 tolerance {tolerance:g}, on {device})")
    for path in sys.argv[4:]:
        stem = os.path.splitext(os.path.basename(path))[0]
        try:
            cells, worst, dtype = compare(path, models, device)
        except (ValueError, KeyError, TypeError) as e:
            print(f"{stem:<36} {'-':>5} {'-':>11}  FAIL: {e}")
            failed = True
            continue
        if dtype == "f32":
            ok = worst <= tolerance
            failed |= not ok
            verdict = "ok" if ok else "FAIL"
        else:
            verdict = "reported only"
        print(f"{stem:<36} {cells:>5} {worst:>11.2e}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
