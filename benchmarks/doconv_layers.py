"""DO-Conv's composition against the convolution it feeds, layer by layer (docs/performance.md, "Why DO-Conv ...").

`python benchmarks/doconv_layers.py [--threads 1] [--rounds 8]`: for 3x3 convolutions in->in at the map sizes of
timm's resnet18 stages on 64x64 inputs (batch 64), the median forward+backward time of the vanilla layer, of the
DO-Conv layer (composition included), of the composition alone (kflo's batched product, and the same
contraction through `torch.einsum` on W stored in the paper's layout, what kflo did before 2026-12-03), and of DO-Conv's feature form (the input through
D as a depthwise convolution with D_mul outputs per channel, then W as a 1x1 convolution: the same function without
composing W'), interleaved round by round.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import kflo_cli as kflo

from _layer_timing import elapsed, layer_args


def main() -> None:
    args = layer_args(__doc__, rounds=8)
    print("| layer, input map | vanilla fwd+bwd ms | DO-Conv fwd+bwd ms | composition fwd+bwd ms | "
          "composition through einsum ms | ratio | feature form fwd+bwd ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for channels, size in ((64, 16), (128, 8), (256, 4), (512, 2)):
        vanilla = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        expanded = kflo.expand(copy.deepcopy(vanilla), "doconv")
        factors = expanded[0].parametrizations.weight[0]
        x = torch.randn(args.batch, channels, size, size)
        taps, dmul = factors.eye.shape

        def feature_form() -> torch.Tensor:
            # (D + I)[c, s, d] as a depthwise kernel: output channel c * D_mul + d reads channel c with taps s
            depthwise = (factors.depthwise + factors.eye).transpose(1, 2).reshape(channels * dmul, 1, 3, 3)
            hidden = F.conv2d(x, depthwise, padding=1, groups=channels)
            return F.conv2d(hidden, factors.kernel().reshape(channels, channels * dmul, 1, 1))

        paper_kernel = factors.kernel().detach().requires_grad_()  # W as a leaf in the paper's layout, as before

        def composition_einsum() -> torch.Tensor:
            return torch.einsum("ocd,csd->ocs", paper_kernel, factors.depthwise + factors.eye)

        with torch.no_grad():  # the same function (float32 rounding apart)
            torch.testing.assert_close(feature_form(), expanded(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(composition_einsum().reshape(factors().shape), factors(), rtol=1e-5, atol=1e-5)
        times: dict[str, list[float]] = {"vanilla": [], "doconv": [], "composition": [], "einsum": [], "feature": []}
        for _ in range(args.rounds):
            times["vanilla"].append(elapsed(lambda: vanilla(x).sum().backward()))
            times["doconv"].append(elapsed(lambda: expanded(x).sum().backward()))
            times["composition"].append(elapsed(lambda: factors().sum().backward()))
            times["einsum"].append(elapsed(lambda: composition_einsum().sum().backward()))
            times["feature"].append(elapsed(lambda: feature_form().sum().backward()))
        med = {k: sorted(v)[len(v) // 2] * 1000 for k, v in times.items()}
        print(f"| {channels} ch, {size}x{size} | {med['vanilla']:.1f} | {med['doconv']:.1f} | {med['composition']:.1f} | "
              f"{med['einsum']:.1f} | {med['doconv'] / med['vanilla']:.2f} | {med['feature']:.1f} |")


if __name__ == "__main__":
    main()
