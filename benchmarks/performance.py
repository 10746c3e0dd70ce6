"""The table of docs/performance.md: `kflo bench` on the issue's cases, every execution mode side by side.

    python benchmarks/performance.py [--steps N] [--threads T] [--only SUBSTRING] [--json FILE] [--compare-modes]

Prints a markdown table (training-step time and peak memory as ratios to vanilla, measured in one process,
interleaved) and, with --json, every measurement. Each row is one `kflo bench` call: its ratios are against the
vanilla model timed in the same run.

With --compare-modes it prints instead, for every case with more than one execution mode, one `kflo bench
--compare-modes` call: vanilla and each mode timed in the same interleaved rounds, and auto against the faster fixed
form (the issue's bound: never more than 5 % slower).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from kflo_cli.bench import bench, compare_modes

# (label, model, recipes, batch, input size, modes, target)
CASES = [
    ("ExpandNet-CL r=4", "smallnet_k7", ["expandnet-cl:rate=4"], 128, (3, 32, 32), ("kernel", "feature", "auto"), "<= 1.15"),
    ("ExpandNet-CK r=4", "smallnet_k7", ["expandnet-ck:rate=4"], 128, (3, 32, 32), ("kernel", "feature", "auto"), "<= 1.15"),
    ("KFLO 2x4", "smallnet_k7", ["kflo"], 128, (3, 32, 32), ("kernel", "auto"), "<= 1.15"),
    ("KFLO 2x4", "lenet5", ["kflo"], 128, (1, 28, 28), ("kernel", "auto"), "<= 1.15"),
    ("KFLO 2x4 (paper decay)", "resnet18", ["kflo"], 64, (3, 32, 32), ("kernel", "auto"), "<= half of kernel"),
    ("KFLO 2x4 decay=factors", "resnet18", ["kflo:decay=factors"], 64, (3, 32, 32), ("kernel", "feature", "auto"), "<= half of kernel"),
    ("DO-Conv", "resnet18", ["doconv"], 64, (3, 64, 64), (None,), "<= 1.15"),
    ("ACNet", "resnet18", ["acnet"], 64, (3, 64, 64), (None,), "<= 1.3"),
    ("weight compander", "resnet18", ["compander"], 64, (3, 64, 64), (None,), "<= 1.10"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None, help="run only cases whose label or model contains this")
    parser.add_argument("--json", default=None)
    parser.add_argument("--compare-modes", action="store_true", help="auto against the fixed forms, in one run per case")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, raw = [], []
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}", file=sys.stderr)
    if args.compare_modes:
        mode_table(args)
        return
    for label, model, recipes, batch, size, modes, target in CASES:
        if args.only and args.only not in label and args.only not in model:
            continue
        for mode in modes:
            r = bench(model, recipes, batch_size=batch, input_size=size, steps=args.steps, warmup=args.warmup, mode=mode)
            raw.append(r.to_dict())
            rows.append(f"| {label} | `{model}` {batch}x{'x'.join(map(str, size))} | {mode or '-'} | "
                        f"{r.step_ratio:.2f} ({r.step_ratio_min:.2f}) | {r.memory_ratio:.2f} ({'within' if r.memory_within_target else 'over'}) | {r.macs_executed / r.macs_vanilla:.2f} | "
                        f"{'-' if r.macs_feature_form is None else f'{r.macs_feature_form / r.macs_vanilla:.2f}'} | "
                        f"{r.infer_ratio:.2f} | {target} |")
            print(rows[-1], file=sys.stderr, flush=True)
    emit(["case", "model, batch x input", "mode", "step time / vanilla, median (min)",
          "peak memory / vanilla (memory target)", "MACs executed / vanilla", "MACs feature form / vanilla",
          "collapsed inference / vanilla", "target"], rows, raw, args.json)


def emit(header: list[str], rows: list[str], raw: list[dict], json_path: str | None) -> None:
    """Print the markdown table on stdout; write every measurement to ``json_path`` if given."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(raw, f, indent=1)


def mode_table(args: argparse.Namespace) -> None:
    """auto against kernel and feature, timed in the same rounds (``kflo bench --compare-modes``)."""
    rows, raw = [], []
    for label, model, recipes, batch, size, modes, _ in CASES:
        if len(modes) < 2 or (args.only and args.only not in label and args.only not in model):
            continue
        r = compare_modes(model, recipes, modes=modes, batch_size=batch, input_size=size, steps=args.steps,
                          warmup=args.warmup)
        raw.append(r.to_dict())
        by = {row.mode: row for row in r.rows}

        def cell(mode: str) -> str:
            row = by.get(mode)
            return "-" if row is None else f"{row.ratio:.2f} ({row.ratio_min:.2f})"

        auto = by["auto"]
        rows.append(f"| {label} | `{model}` {batch}x{'x'.join(map(str, size))} | {cell('kernel')} | {cell('feature')} | "
                    f"{cell('auto')} | {len(auto.feature_layers)} of {auto.layers} | {r.best_fixed} | "
                    f"{r.auto_vs_best:.3f} ({r.auto_vs_best_min:.3f}) | {'yes' if r.auto_within else 'NO'} |")
        print(rows[-1], file=sys.stderr, flush=True)
    emit(["case", "model, batch x input", "kernel / vanilla", "feature / vanilla", "auto / vanilla",
          "auto: layers through the factors", "faster fixed form", "auto / faster fixed, median (min)",
          "within 1.05"], rows, raw, args.json)


if __name__ == "__main__":
    main()
