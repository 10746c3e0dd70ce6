"""ExpandNets Table 6 with kflo: parameters and MACs of SmallNet-7 and its expansions at r = 2, 4, 8.

    python benchmarks/complexity.py [--model smallnet_k7] [--input-size 3,32,32]

Parameters are those trained (the deployed model always has the vanilla count); MACs per image are counted by
torch.utils.flop_counter on one forward in the paper's feature form (mode=feature: the chain of real layers),
which is what the paper's MAC column measures, and as kflo executes it (mode=auto at batch 1 and at batch 128).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from kflo_cli.bench import _macs_per_image
from kflo_cli.models import create_model
from kflo_cli.pipeline import expand_model

METHODS = {"FC (Arora18)": "expandnet-fc:rate={r},classifier=expand", "ExpandNet-CL": "expandnet-cl:rate={r}",
           "ExpandNet-CK": "expandnet-ck:rate={r}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smallnet_k7")
    parser.add_argument("--input-size", default="3,32,32")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.input_size.split(","))
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    base = create_model(args.model)
    x1 = torch.zeros(1, *size)
    print(f"{args.model} at {'x'.join(map(str, size))}: {sum(p.numel() for p in base.parameters()):,} parameters, "
          f"{_macs_per_image(base, x1) / 1e6:.2f} M MACs per image\n")
    print("| method | r | parameters trained | MACs, feature form (paper) | MACs as kflo runs it, batch 1 | batch 128 |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, spec in METHODS.items():
        for r in (2, 4, 8):
            feature = expand_model(args.model, [spec.format(r=r) + ",mode=feature,init=random"], seed=0)
            auto = expand_model(args.model, [spec.format(r=r) + ",init=random"], seed=0)
            params = sum(p.numel() for p in feature.parameters())
            print(f"| {label} | {r} | {params / 1e3:,.2f} K | {_macs_per_image(feature, x1) / 1e6:.2f} M | "
                  f"{_macs_per_image(auto, x1) / 1e6:.2f} M | {_macs_per_image(auto, torch.zeros(128, *size)) / 1e6:.2f} M |",
                  flush=True)


if __name__ == "__main__":
    main()
