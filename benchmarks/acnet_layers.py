"""Where ACNet's training step goes, layer by layer (docs/performance.md, "Why ACNet cannot reach 1.3").

`python benchmarks/acnet_layers.py [--threads 1] [--rounds 10]`: for 3x3 convolutions in->in followed by their
BatchNorm, at the map sizes of timm's resnet18 stages on 64x64 inputs (batch 64), the median forward+backward time,
interleaved round by round, of: the vanilla convolution + BatchNorm; kflo's ACNet block (k x k, 1 x k and k x 1
branches, each with its BatchNorm, summed) + the same BatchNorm; and each part alone: the 3x3, 1x3 and 3x1
convolutions and one BatchNorm. The MAC ratio of the ACNet block's convolutions to the vanilla one is 1 + 2/3.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import kflo_cli as kflo

from _layer_timing import elapsed, layer_args


def main() -> None:
    args = layer_args(__doc__, rounds=10)
    print("| layer, input map | vanilla conv+BN ms | ACNet block+BN ms | ratio | 3x3 conv ms | 1x3 conv ms | "
          "3x1 conv ms | BatchNorm ms | convolutions alone / vanilla conv | 1x3 ms per MAC / 3x3's |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for channels, size in ((64, 16), (128, 8), (256, 4), (512, 2)):
        vanilla = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        expanded = kflo.expand(copy.deepcopy(vanilla), "acnet")
        block = expanded[0]
        x = torch.randn(args.batch, channels, size, size, requires_grad=True)
        square = nn.Parameter(block.square.weight.detach().clone())
        hor = nn.Parameter(block.hor.weight.detach().clone())
        ver = nn.Parameter(block.ver.weight.detach().clone())
        bn = nn.BatchNorm2d(channels)
        y = torch.randn(args.batch, channels, size, size, requires_grad=True)
        parts = {
            "vanilla": lambda: vanilla(x).sum().backward(),
            "acnet": lambda: expanded(x).sum().backward(),
            "3x3": lambda: F.conv2d(x, square, padding=1).sum().backward(),
            "1x3": lambda: F.conv2d(x, hor, padding=(0, 1)).sum().backward(),
            "3x1": lambda: F.conv2d(x, ver, padding=(1, 0)).sum().backward(),
            "bn": lambda: bn(y).sum().backward(),
        }
        times: dict[str, list[float]] = {k: [] for k in parts}
        for _ in range(args.rounds + 2):
            for key, fn in parts.items():
                times[key].append(elapsed(fn))
        med = {k: sorted(v[2:])[len(v[2:]) // 2] * 1000 for k, v in times.items()}
        convs = med["3x3"] + med["1x3"] + med["3x1"]
        print(f"| {channels} ch, {size}x{size} | {med['vanilla']:.1f} | {med['acnet']:.1f} | "
              f"{med['acnet'] / med['vanilla']:.2f} | {med['3x3']:.1f} | {med['1x3']:.1f} | {med['3x1']:.1f} | "
              f"{med['bn']:.1f} | {convs / med['3x3']:.2f} | {3 * med['1x3'] / med['3x3']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
