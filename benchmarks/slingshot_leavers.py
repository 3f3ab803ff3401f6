"""Which natural images a slingshot pushes out of its unit's top-k, and what they look like.

The slingshot's top-100 Jaccard (report.json) counts the swaps; this says which images swap and why. For
each saved slingshot model (`fvtrust fool slingshot ... --out DIR` writes DIR/model), the unit's score on
the held-out part of its data, before (the base model) and after. For the images that left the top-k, came
in, and stayed, it prints their ranks before -> after and their pixel statistics: the mean, the share of
mid-grey pixels (0.3-0.7, the visualization's start is grey) and of black pixels (< 0.02). It also prints
the size of the unit's change on its original top-k against the score gap at rank k: the swaps happen where
a small shift is enough. Baseline in the same run: the same statistics over all held-out images.

    python benchmarks/slingshot_leavers.py OUT1/model OUT2/model --top 100
"""
from __future__ import annotations

import argparse

import torch

from common import saved_slingshots
from fvtrust.fool.slingshot.finetune import resolve_natural
from fvtrust.fool.slingshot.report import top_jaccard, unit_scores

GREY = (0.3, 0.7)   # "mid-grey" pixel values
BLACK = 0.02        # "black" pixel values (Fashion-MNIST backgrounds are exactly 0)


def pixel_stats(images: torch.Tensor) -> str:
    """Mean pixel, share of mid-grey and of black pixels over `images` (N x C x H x W in [0, 1])."""
    if len(images) == 0:
        return "(none)"
    x = images.flatten(1)
    grey = ((x > GREY[0]) & (x < GREY[1])).float().mean()
    return f"mean {x.mean():.3f}, mid-grey {grey:.3f}, black {(x < BLACK).float().mean():.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="saved slingshot models (DIR/model)")
    ap.add_argument("--top", type=int, default=100, help="k of the top-k (report.json: 100)")
    args = ap.parse_args()
    if args.top < 1:
        ap.error("--top must be >= 1")
    for path, fooled, original, layer, unit, _ in saved_slingshots(args.models, "slingshot_leavers"):
        x = resolve_natural(None, original).heldout.tensors(None, desc="read held-out images")[0]
        k = min(args.top, len(x))
        s0, s1 = unit_scores(original, layer, unit, x), unit_scores(fooled, layer, unit, x)
        order0 = torch.sort(s0, descending=True, stable=True).indices
        order1 = torch.sort(s1, descending=True, stable=True).indices
        rank0, rank1 = torch.empty_like(order0), torch.empty_like(order1)
        rank0[order0], rank1[order1] = torch.arange(len(x)), torch.arange(len(x))
        top0, top1 = set(order0[:k].tolist()), set(order1[:k].tolist())
        groups = {"left": sorted(top0 - top1), "came in": sorted(top1 - top0), "stayed": sorted(top0 & top1)}
        print(f"{path} {layer}:{unit}: top-{k} Jaccard {top_jaccard(s0, s1, k):.3f} on {len(x)} held-out images")
        for name, idx in groups.items():
            ranks = ", ".join(f"{int(rank0[i])}->{int(rank1[i])}" for i in idx) if name != "stayed" else ""
            print(f"  {name:8s} {len(idx):4d}: {pixel_stats(x[idx])}" + (f"; ranks {ranks}" if ranks else ""))
        print(f"  all      {len(x):4d}: {pixel_stats(x)}")
        d = s1 - s0
        top_idx = order0[:k]
        gap = float(s0[order0[k - 1]] - s0[order0[k]]) if k < len(x) else float("nan")
        print(f"  change of the unit: sd {d.std():.4f} over all images, {d[top_idx].std():.4f} on the original "
              f"top-{k}; score gap between ranks {k} and {k + 1}: {gap:.4f}", flush=True)


if __name__ == "__main__":
    main()
