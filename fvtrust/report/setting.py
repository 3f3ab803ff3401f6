"""What `fvtrust reproduce` runs on: one model, its natural data, and the layers and classes chosen for it.

The experiments (experiments.py) never name a model or a dataset; they read
this object. Choices, in order of precedence:

- known models use the paper's own settings: fashion-cnn ``block3`` for
  silent units and linearity (the embedded default), ResNet-50
  ``layer4.1.conv2`` (the paper's silent-unit layer);
- any other model: the logits are the last layer with one output per class;
  the silent-unit layer is the traced Conv→BN→ReLU sequence at about three
  quarters of the network's depth (deep enough that visualizations are
  object-like, before the last blocks);
- classes: all of them for ≤ 10 classes; with ``--budget paper`` and more
  classes the paper's draw (``numpy.random.seed(42)``, 10 classes); otherwise
  10 classes drawn the same way from the classes present in the data, so a
  small folder is enough;
- the circuit's permutation offset is 100 for ≥ 200 classes (the paper's, on
  Inception-V1's 1000) and half the classes otherwise (5 on fashion-cnn).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

KNOWN_SILENT_LAYERS = {"fashion-cnn": "block3", "torchvision:resnet50": "layer4.1.conv2"}
MODES = ("smoke", "quick", "full", "paper")


@dataclass
class Setting:
    spec: str
    weights: str | None = None
    device: str | None = None
    data: str | None = None
    class_index: str | None = None
    natural_limit: int | None = None
    mode: str = "quick"
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    # -- what the user gave, as a fingerprint (a cached step from another setting is not reused) ---------------
    def fingerprint(self) -> str:
        key = {k: getattr(self, k) for k in ("spec", "weights", "data", "class_index", "natural_limit", "mode", "seed")}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"spec": self.spec, "weights": self.weights, "device": str(self.model.device), "data": self.data,
                "class_index": self.class_index, "natural_limit": self.natural_limit, "budget": self.mode,
                "natural_data": self.natural.describe(), "logits_layer": self.logits_layer,
                "classes": self.classes, "silent_layer": self.silent_layer, "circuit_offset": self.circuit_offset}

    # -- resolved lazily, once -------------------------------------------------------------------------------
    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def model(self):
        from ..models import load_model

        return self._get("model", lambda: load_model(self.spec, weights=self.weights, device=self.device))

    @property
    def natural(self):
        from ..data import natural

        return self._get("natural", lambda: natural(self.data, model=self.model, class_index=self.class_index,
                                                    limit=self.natural_limit, seed=self.seed))

    @property
    def data_label(self) -> str:
        d = self.natural.evaluation.describe()
        return d["path"] or d["source"]

    @property
    def cli_model(self) -> str:
        return self.spec + (f" --weights {self.weights}" if self.weights else "")

    @property
    def cli(self) -> str:
        """Model and data options as a user would type them (for the page's commands)."""
        out = self.cli_model
        if self.data:
            out += f" --data {self.data}"
        if self.class_index:
            out += f" --class-index {self.class_index}"
        if self.natural_limit:
            out += f" --natural-limit {self.natural_limit}"
        return out

    @property
    def logits_layer(self) -> str:
        from ..sanity.inputs import final_layer

        return self._get("logits", lambda: final_layer(self.model))

    @property
    def classes(self) -> list[int]:
        return self._get("classes", self._classes)

    def _classes(self) -> list[int]:
        from ..errors import FvtrustError
        from ..sanity.analysis import random_classes

        n = self.model.num_classes
        if not n:
            raise FvtrustError(f"{self.spec} has no class outputs; reproduce needs a classifier")
        if n <= 10:
            return list(range(n))
        if self.mode == "paper":
            return random_classes(n, 10, 42)
        part = self.natural.evaluation
        part.require_labels("reproduce")
        present = sorted({int(t) for t in part.targets().tolist() if t >= 0})
        if len(present) <= 10:
            return present
        rng = np.random.RandomState(42)
        return sorted(int(c) for c in rng.choice(present, 10, replace=False))

    @property
    def silent_block(self):
        from ..models.trace import conv_bn_relu_blocks, resolve_conv_block

        def make():
            known = KNOWN_SILENT_LAYERS.get(self.spec)
            if known:
                return resolve_conv_block(self.model, known), known
            blocks = [b for b in conv_bn_relu_blocks(self.model)
                      if self.model.get_layer(b.conv).out_channels >= 16]
            if not blocks:
                from ..errors import FvtrustError

                raise FvtrustError(f"{self.spec} has no Conv-BN-ReLU block with >= 16 units for silent units")
            b = blocks[min(len(blocks) - 1, (3 * len(blocks)) // 4)]
            return b, (b.aliases[-1] if b.aliases else b.conv)
        return self._get("silent", make)

    @property
    def silent_layer(self) -> str:
        return self.silent_block[1]

    @property
    def unit_count(self) -> int:
        """Units per hidden-layer experiment: the paper's figure shows 16; a smoke run (a pipeline check) 4."""
        return 4 if self.mode == "smoke" else 16

    @property
    def silent_units(self) -> str:
        n = self.model.get_layer(self.silent_block[0].conv).out_channels
        return f"0-{min(self.unit_count, n) - 1}"

    @property
    def linearity_layer(self) -> str:
        return self.silent_layer

    @property
    def linearity_units(self) -> int:
        return min(self.unit_count, self.model.get_layer(self.silent_block[0].conv).out_channels)

    @property
    def circuit_offset(self) -> int:
        n = self.model.num_classes
        return 100 if n >= 200 else max(1, n // 2)

    @property
    def circuit_report_units(self):
        """Units whose before/after visualizations the circuit report draws: all for small heads, else the classes."""
        n = self.model.num_classes
        return None if n <= 32 else self.classes
