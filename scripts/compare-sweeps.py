#!/usr/bin/env python3
"""Compares `patchbay sweep --out` JSON files with the HF transformers reference numbers.

Usage:  compare-sweeps.py REFERENCE.json TOLERANCE SWEEP.json [SWEEP.json ...]

Each sweep file must be named `<model>-<component>-<schedule>-<dtype>.json`, `<model>` being a
model's name in REFERENCE (tests/fixtures/tiny_reference.json). Prints, per file, the largest
absolute difference in raw logit difference over the clean and corrupted runs and every cell, and
exits with 1 if any f32 file's is over TOLERANCE (bf16/f16 files are reported, not judged: a
random-weight model's logit differences in 8 bits of mantissa are no reference's business).
Standard library only, so it runs wherever python3 does.
"""
import json
import math
import os
import sys


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    reference = json.load(open(sys.argv[1]))
    tolerance = float(sys.argv[2])
    models = {m["name"]: m for m in reference["models"]}
    failed = False
    print(f"{'sweep':<36} {'cells':>5} {'max |Δ LD|':>11}  verdict (f32 tolerance {tolerance:g})")
    for path in sys.argv[3:]:
        stem = os.path.basename(path).removesuffix(".json")
        model, component, schedule, dtype = stem.rsplit("-", 3)
        ref = models[model]
        try:
            got = json.load(open(path))
        except (OSError, ValueError) as e:
            print(f"{stem:<36} {'-':>5} {'-':>11}  FAIL: no result ({e})")
            failed = True
            continue
        diffs = [
            abs(got["clean_logit_diff"] - ref["clean_logit_diff"]),
            abs(got["corrupted_logit_diff"] - ref["corrupted_logit_diff"]),
        ]
        cells = 0
        for l, row in enumerate(ref["patched_logit_diff"][component]):
            for p, expected in enumerate(row):
                value = got["patched_logit_diff"][l][p]
                diffs.append(math.inf if value is None else abs(value - expected))
                cells += 1
        worst = max(diffs)
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
