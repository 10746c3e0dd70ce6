"""Validate mode=auto's cost model on single layers: kernel and feature forms timed (forward + backward, one
training step's work under parametrize.cached()), and the form auto picks for that input.

    python benchmarks/layer_forms.py [--threads 1]

A row where auto picks the slower form by more than the timing noise is a cost-model error.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import kflo_cli as kflo
from kflo_cli.reparam.execution import choose_form

# (label, layer builder, input shape, recipe spec without mode)
CASES = [
    ("conv 64->64 3x3, 8x8", lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (64, 64, 8, 8), "kflo:decay=factors"),
    ("conv 128->128 3x3, 4x4", lambda: nn.Conv2d(128, 128, 3, padding=1, bias=False), (64, 128, 4, 4), "kflo:decay=factors"),
    ("conv 256->256 3x3, 2x2", lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), (64, 256, 2, 2), "kflo:decay=factors"),
    ("conv 256->256 3x3, 4x4", lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), (64, 256, 4, 4), "kflo:decay=factors"),
    ("conv 512->512 3x3, 1x1", lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (64, 512, 1, 1), "kflo:decay=factors"),
    ("linear 512->1000", lambda: nn.Linear(512, 1000), (64, 512), "kflo:decay=factors"),
    ("linear 400->120", lambda: nn.Linear(400, 120), (128, 400), "kflo:decay=factors"),
    ("conv 32->64 7x7 (CK), 16x16", lambda: nn.Conv2d(32, 64, 7, padding=3), (128, 32, 16, 16), "expandnet-ck:rate=4,init=random"),
    ("conv 64->64 7x7 (CK), 4x4", lambda: nn.Conv2d(64, 64, 7, padding=3), (128, 64, 4, 4), "expandnet-ck:rate=4,init=random"),
    ("conv 32->64 3x3 (CL), 16x16", lambda: nn.Conv2d(32, 64, 3, padding=1), (128, 32, 16, 16), "expandnet-cl:rate=4,init=random"),
    ("linear 512->512 (FC)", lambda: nn.Linear(512, 512), (64, 512), "expandnet-fc:rate=4,classifier=expand,init=random"),
    # ResNet-18's last two stages at 32x32 inputs under ExpandNet-CL
    ("conv 256->256 3x3 (CL), 2x2", lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), (64, 256, 2, 2), "expandnet-cl:rate=4,init=random"),
    ("conv 512->512 3x3 (CL), 1x1", lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (64, 512, 1, 1), "expandnet-cl:rate=4,init=random"),
]


def time_form(build, shape, spec: str, mode: str, rounds: int) -> tuple[float, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(build())
    kflo.expand(model, f"{spec},mode={mode}")
    x = torch.randn(shape)

    def step() -> None:
        with parametrize.cached():
            model(x).sum().backward()

    for _ in range(2):
        step()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1000, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=None, help="run only cases whose label contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| layer, input | recipe | kernel ms | feature ms | auto picks | right? |")
    print("|---|---|---:|---:|---|---|")
    for label, build, shape, spec in CASES:
        if args.only and args.only not in label:
            continue
        kernel, _ = time_form(build, shape, spec, "kernel", args.rounds)
        feature, model = time_form(build, shape, spec, "feature", args.rounds)
        layer = model[0]
        with torch.enable_grad():
            pick = choose_form(layer, layer.parametrizations.weight[0], shape)
        best = "kernel" if kernel <= feature else "feature"
        close = abs(kernel - feature) <= 0.05 * min(kernel, feature)
        verdict = "yes" if pick == best else ("within 5 %" if close else "NO")
        print(f"| {label}, {'x'.join(map(str, shape))} | `{spec}` | {kernel:.1f} | {feature:.1f} | {pick} | {verdict} |",
              flush=True)


if __name__ == "__main__":
    main()
