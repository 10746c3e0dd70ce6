"""Train every built-in recipe under ``--compile --amp`` and check the collapse (docs/performance.md).

    python benchmarks/compile_amp_recipes.py [--model lenet5] [--data digits] [--flags="--compile --amp"] [--out DIR]

CI tests ``--compile`` on two recipes only (each compiled run costs 20-110 s on 2 cores); this script runs them all,
one ``kflo train`` each (20 % of the training set, one epoch, batch 32, one thread), and prints a markdown table:
exit code, wall time, and the end-of-training verification (relative error of the collapsed model, strict load).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: every built-in recipe, with a spec that finds layers on LeNet-5 (as tests/test_amp_compile.py)
RECIPES = ["kflo", "kflo:decay=factors", "expandnet-cl", "expandnet-ck", "expandnet-fc:classifier=expand", "doconv",
           "acnet", "compander", "powerprop", "weightnorm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--flags", default="--compile --amp", help="kflo train options under test")
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="kflo-compile-"))
    print(f"| recipe | `{args.flags}` on {args.model} / {args.data}: exit | seconds | collapsed rel. error | strict load |")
    print("| --- | ---: | ---: | ---: | --- |")
    failed = 0
    for spec in args.recipes:
        run = root / spec.replace(":", "_").replace("=", "_").replace(",", "_")
        cmd = [sys.executable, "-m", "kflo_cli", "train", args.model, "--recipe", spec, "--data", args.data,
               "--train-fraction", "0.2", "--batch-size", "32", "--epochs", "1", "--threads", "1",
               *shlex.split(args.flags), "-o", str(run)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        error, strict = "-", "-"
        if proc.returncode == 0:
            report = json.loads((run / "verification.json").read_text())
            error = f"{report['verification']['rel_error']:.1e}" + ("" if report["verification"]["passed"] else " FAIL")
            strict = "yes" if report["strict_load"] else "NO"
        else:
            failed += 1
            print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "(no stderr)", file=sys.stderr)
        print(f"| `{spec}` | {proc.returncode} | {seconds:.0f} | {error} | {strict} |", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
