"""lucid's Inception-V1 class order -> the standard ImageNet order.

lucid's (and lucent's) Inception-V1 has 1008 outputs in lucid's own label
order: output 0 is a dummy, outputs 1..1000 are the ILSVRC2012 classes in
the devkit's ILSVRC2012_ID order (kit fox, English setter, ...), outputs
1001..1007 are unused. Everything else in fvtrust -- ImageFolder labels,
torchvision's weights and category names -- uses the standard order: the
1000 synsets (WordNet ids) sorted. Comparing labels of one order with logits
of the other pairs a class with an unrelated logit, so the lucent model is
handed out with its 1000 class logits re-ordered to the standard order.

The synset of every lucid output is data shipped with the package
(``data/lucid_inceptionv1_outputs.txt``; its header names the source and
the cross-checks made when it was added).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import torch
from torch import nn

from ..errors import FvtrustError

LUCID_OUTPUTS = 1008
N_CLASSES = 1000
DATA_FILE = "lucid_inceptionv1_outputs.txt"


def _refuse(why: str) -> FvtrustError:
    return FvtrustError(f"cannot map lucid's Inception-V1 outputs to the 1000 standard ImageNet classes ({why}); "
                        "give classes by --class-index in lucid's order (1..1000) instead")


@lru_cache(maxsize=None)
def _table(text: str | None = None) -> tuple[tuple[int, str, str], ...]:
    if text is None:
        try:
            text = (resources.files("fvtrust.models") / "data" / DATA_FILE).read_text()
        except (OSError, ModuleNotFoundError) as e:
            raise _refuse(f"cannot read the packaged {DATA_FILE}: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].startswith("n"):
            raise _refuse(f"{DATA_FILE} line {n} is not '<output> <wnid> <name>': {line[:60]!r}")
        rows.append((int(parts[0]), parts[1], parts[2]))
    outputs, wnids = [r[0] for r in rows], [r[1] for r in rows]
    if sorted(outputs) != list(range(1, N_CLASSES + 1)) or len(set(wnids)) != N_CLASSES:
        raise _refuse(f"{DATA_FILE} must list outputs 1..{N_CLASSES} with {N_CLASSES} distinct synsets, "
                      f"got {len(rows)} rows, {len(set(wnids))} synsets")
    return tuple(sorted(rows))


def lucid_synsets(text: str | None = None) -> list[str | None]:
    """The WordNet id of each of lucid's 1008 outputs (None for the dummy 0 and the unused 1001..1007)."""
    out: list[str | None] = [None] * LUCID_OUTPUTS
    for i, wnid, _ in _table(text):
        out[i] = wnid
    return out


def standard_synsets(text: str | None = None) -> list[str]:
    """The 1000 ImageNet synsets in the standard order (sorted: ImageFolder's and torchvision's order)."""
    return sorted(w for w in lucid_synsets(text) if w is not None)


def standard_to_lucid(text: str | None = None) -> torch.Tensor:
    """index[k] = lucid's output for standard class k, a (1000,) long tensor."""
    where = {w: i for i, w in enumerate(lucid_synsets(text)) if w is not None}
    return torch.tensor([where[w] for w in standard_synsets(text)], dtype=torch.long)


def to_standard_order(outputs: torch.Tensor) -> torch.Tensor:
    """(..., 1008) outputs in lucid's order -> (..., 1000) in the standard order (dummy and unused dropped)."""
    if outputs.shape[-1] != LUCID_OUTPUTS:
        raise _refuse(f"expected {LUCID_OUTPUTS} outputs in lucid's order, got {outputs.shape[-1]}")
    return outputs.index_select(-1, standard_to_lucid().to(outputs.device))


def standard_order_head(head: nn.Linear) -> nn.Linear:
    """lucid's 1024 -> 1008 classifier as a 1024 -> 1000 one whose output k is standard class k.

    Its rows are lucid's rows for the 1000 classes, re-ordered; the dummy and
    the 7 unused outputs are dropped, so a softmax over its output would be
    one over the real classes only.
    """
    if not isinstance(head, nn.Linear) or head.out_features != LUCID_OUTPUTS:
        raise _refuse(f"the classifier is {type(head).__name__} with {getattr(head, 'out_features', '?')} "
                      f"outputs, not lucid's Linear with {LUCID_OUTPUTS}")
    index = standard_to_lucid()
    new = nn.Linear(head.in_features, N_CLASSES, bias=head.bias is not None,
                    device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight[index])
        if head.bias is not None:
            new.bias.copy_(head.bias[index])
    return new


def standard_class_names() -> list[str]:
    """torchvision's names of the 1000 classes, standard order (weights metadata, nothing downloaded)."""
    from torchvision.models import GoogLeNet_Weights

    return list(GoogLeNet_Weights.IMAGENET1K_V1.meta["categories"])
