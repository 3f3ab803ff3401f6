"""Epoch checkpoints of a training loop that resume bit for bit.

Why: training is the one long stage whose unit of work (an epoch) is not a
cache entry of its own. A kill during the detector's training used to cost
the whole training. A checkpoint here holds everything the next epoch
depends on: the module's weights, the optimizer's state (momentum or Adam
moments, and its step counters), and the random generators the loop draws
from (numpy ``Generator``s and torch's global CPU generator). Restoring all
of them makes epoch e+1 of a resumed run compute exactly what the
uninterrupted run computed, so the trained weights are the same bytes.

Each checkpoint is one verified cache entry (:mod:`fvtrust.cache`): a
safetensors file whose header carries the run's key and a sha256, plus a
JSON entry with the non-tensor state, both named by the epoch
(``epoch-0003.safetensors``, ``epoch-0003.json``). The JSON is written last,
so it is the commit point: a kill between the two writes leaves the previous
epoch's checkpoint in force, and no file is ever rewritten in place. A
damaged or foreign checkpoint is reported in one line and skipped (the next
older one, or a fresh start), never loaded.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from .cache import read_entry, write_entry



def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, rest): the optimizer's per-parameter state split into tensors and plain numbers."""
    sd = opt.state_dict()
    tensors, rest = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{name}"] = v.detach().cpu().contiguous().clone()
            else:
                rest[f"{idx}.{name}"] = v
    return tensors, {"scalars": rest, "param_groups": sd["param_groups"]}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class EpochCheckpoint:
    """The last finished epoch of one training run, kept in `directory` under `key`.

    `key` is the fingerprint of everything that determines the run (data,
    settings, seed); a checkpoint written under another key is never resumed.
    """

    def __init__(self, directory, key: str):
        self.directory = Path(directory)
        self.key = key

    def save(self, epoch: int, module: torch.nn.Module, opt: torch.optim.Optimizer,
             generators: dict[str, np.random.Generator] | None = None, extra: dict | None = None) -> None:
        """Record that `epoch` epochs are done (weights, optimizer, generators, torch's RNG, `extra`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        opt_tensors, opt_meta = _optimizer_tensors(opt)
        tensors.update(opt_tensors)
        tensors["torch_rng"] = torch.get_rng_state()
        stem = f"epoch-{epoch:04d}"
        write_entry(self.directory / f"{stem}.safetensors", "safetensors", tensors, f"{self.key}:{epoch}")
        write_entry(self.directory / f"{stem}.json", "json",
                    {"epoch": epoch, "optimizer": opt_meta,
                     "generators": {k: g.bit_generator.state for k, g in (generators or {}).items()},
                     "extra": extra or {}}, f"{self.key}:{epoch}")
        for old in self.directory.glob("epoch-*"):
            if not old.name.startswith(stem + "."):
                old.unlink(missing_ok=True)

    def load(self, module: torch.nn.Module, opt: torch.optim.Optimizer,
             generators: dict[str, np.random.Generator] | None = None) -> tuple[int, dict]:
        """Restore the last checkpoint into `module`, `opt` and `generators`: (epochs done, extra).

        (0, {}) when there is none; a damaged or foreign one is reported, deleted and skipped.
        """
        for state in sorted(self.directory.glob("epoch-*.json"), reverse=True):
            try:
                epoch = int(state.stem.split("-", 1)[1])
            except ValueError:
                continue
            meta = read_entry(state, "json", f"{self.key}:{epoch}")
            tensors = read_entry(state.with_suffix(".safetensors"), "safetensors", f"{self.key}:{epoch}") \
                if meta is not None else None
            if tensors is not None:
                return self._restore(tensors, meta, module, opt, generators)
            with contextlib.suppress(OSError):
                state.unlink()
        return 0, {}

    @staticmethod
    def _restore(tensors, meta, module, opt, generators) -> tuple[int, dict]:
        module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        _restore_optimizer(opt, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["torch_rng"])
        for k, g in (generators or {}).items():
            g.bit_generator.state = meta["generators"][k]
        return int(meta["epoch"]), meta.get("extra", {})

    def clear(self) -> None:
        """Remove the checkpoint once the run's final result is safely written."""
        for f in self.directory.glob("epoch-*"):
            f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()
