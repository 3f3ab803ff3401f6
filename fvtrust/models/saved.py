"""Model directories: safetensors weights + a JSON recipe, never pickles.

A manipulated model (fooling circuit, silent units) is saved as
``DIR/fvtrust-model.json`` (base spec + manipulation name + its arguments)
and ``DIR/weights.safetensors``. `load_saved` rebuilds the base model,
re-applies the manipulation's *structure* through a registered builder, then
loads the saved weights strictly, so a reload is exact.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from ..errors import FvtrustError
from ..io import atomic_write_bytes, atomic_write_json

RECIPE = "fvtrust-model.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1

# manipulation name -> "module:function"; function(base_model, **args) -> FvModel with the right structure
BUILDERS = {
    "fooling_circuit": "fvtrust.fool.circuit.build:rebuild",
    "silent_units": "fvtrust.fool.silent.build:rebuild",
    "gradient_slingshot": "fvtrust.fool.slingshot.finetune:rebuild",  # weights only: the base structure
}


def is_model_dir(path) -> bool:
    return (Path(path) / RECIPE).is_file()


def save_model(model, directory, *, manipulation: str | None = None, args: dict | None = None,
               base_spec: str | None = None, extra: dict | None = None) -> Path:
    """Write `model` to `directory` so that `fvtrust.load_model(directory)` rebuilds it exactly."""
    from safetensors.torch import save

    from ..cache import canonical_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    recipe = {"format": FORMAT, "base_spec": base_spec or getattr(model, "base_spec", model.spec),
              "manipulation": manipulation, "args": args or {}, "extra": extra or {}}
    atomic_write_bytes(directory / WEIGHTS, canonical_safetensors(save(state)))
    atomic_write_json(directory / RECIPE, recipe)
    return directory


def load_saved(directory, device=None, base=None):
    """Rebuild a saved model. `base`: the original model, needed when it was a plain module wrapped in
    Python (its code is not a spec fvtrust can load again), e.g. ``load_saved(d, base=fvtrust.wrap(net, ...))``."""
    from safetensors.torch import load_file

    from .wrappers import as_model
    from .zoo import load_model

    directory = Path(directory)
    try:
        recipe = json.loads((directory / RECIPE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FvtrustError(f"not a readable fvtrust model directory {directory}: {e}") from None
    if recipe.get("format") != FORMAT:
        raise FvtrustError(f"{directory}: unsupported model format {recipe.get('format')!r}")
    if base is not None:
        import copy

        base = copy.deepcopy(as_model(base))  # the caller's model stays untouched
    elif str(recipe.get("base_spec", "")).startswith("module:"):
        raise FvtrustError(f"{directory} was built from a plain {recipe['base_spec'][7:]} module, which fvtrust cannot "
                           "rebuild from a spec: call fvtrust.models.saved.load_saved(DIR, base=fvtrust.wrap(net, ...)) "
                           "or save models built from a py:file.py:factory spec")
    else:
        base = load_model(recipe["base_spec"], weights="random")
    name = recipe.get("manipulation")
    if name:
        if name not in BUILDERS:
            raise FvtrustError(f"{directory}: unknown manipulation {name!r}; known: {', '.join(BUILDERS)}")
        mod_name, fn = BUILDERS[name].split(":")
        model = getattr(importlib.import_module(mod_name), fn)(base, **recipe.get("args", {}))
    else:
        model = base
    try:
        state = load_file(str(directory / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - corrupt or missing file: one clear line
        raise FvtrustError(f"cannot read weights in {directory}: {e}") from None
    load_state_checked(model, state, str(directory / WEIGHTS))
    model.spec = str(directory)
    model.base_spec = recipe["base_spec"]
    model.default_data = getattr(base, "default_data", None)
    model.recipe = recipe
    model.eval()
    return model.to(device) if device is not None else model


def load_state_checked(module: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict(strict) with one clear error line naming the first mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        parts = []
        if bad:
            k, got, want = bad[0]
            parts.append(f"{len(bad)} tensor(s) of the wrong shape, e.g. {k}: file {got} vs model {want}")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise FvtrustError(f"weights {source} do not fit the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
