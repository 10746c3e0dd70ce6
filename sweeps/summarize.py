"""Print the reproduction's summary tables (docs/reproduction.md) from the sweeps' results.json files, with the
papers' reported effects beside kflo's measured ones.

    python sweeps/summarize.py            # after `kflo sweep ... --report-only` has refreshed the results
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: The papers' reported effect (accuracy points vs their vanilla network) for each method, and where it comes from.
PAPER = {
    "ema": "+0.00 (KFLO T1, Cifar-quick, C10)",
    "acnet": "+0.57 (KFLO T1, Cifar-quick, C10); +0.74 (ExpandNets T1, SmallNet-7)",
    "doconv": "+0.59 (KFLO T1, Cifar-quick, C10)",
    "kflo-2x4": "+1.15 (KFLO T1, Cifar-quick, C10)",
    "kflo-3x2": "(ablation, KFLO sec. 3)",
    "cl": "-0.16 (ExpandNets T1, SmallNet-7, C10)",
    "ck": "+1.64 (ExpandNets T1, SmallNet-7, C10)",
    "ck-fc": "+1.68 (ExpandNets T1, SmallNet-7, C10)",
    "fc": "+0.01 (ExpandNets T1, FC (Arora18), C10)",
    "ck-fc-init": "+2.18 (ExpandNets S1, CK+FC+Init, C10)",
    "kd": "+0.34 (ExpandNets T1, SmallNet-7 w/ KD, ResNet-18 teacher)",
    "compander": "+0.40 (compander T2, ResNet-18, C10)",
    "compander-fine": "+0.12 (compander T6, ResNet-18, C10, a=0.5, b=1.0)",
    "powerprop": "-1.10 (compander T2, ResNet-18, C10)",
    "weightnorm": "+0.22 (compander T2, ResNet-18, C10)",
}
PAPER["expandnet-cl"], PAPER["expandnet-ck"] = PAPER["cl"], PAPER["ck"]  # the digits-confusion grid's names


def fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def table(result: dict, t: dict) -> list[str]:
    base = result["baseline"]
    lines = [f"**{t['model']} · {t['data']}** ({result['name']})", "",
             f"| method | n | accuracy % | Δ vs {base} [95 % CI] | p | verdict | paper's effect | cost |",
             "|---|---:|---:|---:|---:|---|---|---:|"]
    for m in t["methods"]:
        s, c = m["summary"], m.get("comparison") or {}
        acc = f"{s['mean']:.2f} ± {s['std']:.2f}" if s.get("n", 0) > 1 else (fmt(s.get("mean")) if s.get("n") else "–")
        if m["baseline"]:
            diff, p, verdict = "–", "–", "baseline"
        elif not s.get("n"):
            diff, p, verdict = "–", "–", "not deployable" if m.get("trained_only") else "no finished run"
        else:
            diff = f"{fmt(c.get('mean'), True)} [{fmt(c.get('ci_low'), True)}, {fmt(c.get('ci_high'), True)}]"
            p = "–" if c.get("p") is None else ("< 0.001" if c["p"] < 0.001 else f"{c['p']:.3f}")
            verdict = c.get("verdict", "–")
        cost = f"{m['cost_ratio']:.2f}×" if m.get("cost_ratio") else "–"
        lines.append(f"| {m['method']} | {s.get('n', 0)}/{m['seeds']} | {acc} | {diff} | {p} | {verdict} | "
                     f"{PAPER.get(m['method'], '')} | {cost} |")
    return lines + [""]


def main() -> None:
    for path in sorted(RESULTS.glob("*/results.json")):
        result = json.loads(path.read_text())
        for t in result["tables"]:
            if not t.get("auxiliary"):
                print("\n".join(table(result, t)))


if __name__ == "__main__":
    main()
