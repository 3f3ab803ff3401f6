"""The recipe that produces the embedded fashion-cnn weights.

Deterministic for a given seed, torch version and thread count: fixed seeds,
a fixed data order from a seeded generator, deterministic algorithms on.
SGD with Nesterov momentum, one-cycle LR, light augmentation (random shift by
up to 2 px and horizontal flip), label smoothing 0.05.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import FvtrustError
from ..evaluate import evaluate
from ..io import atomic_write_bytes, atomic_write_json
from ..progress import progress
from .zoo import fashion_cnn

RECIPE = {"epochs": 8, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
          "label_smoothing": 0.05, "shift": 2, "seed": 0}


def _augment(x: torch.Tensor, g: torch.Generator, shift: int) -> torch.Tensor:
    """Random flips and integer shifts (zero fill) for a whole batch at once."""
    n = x.shape[0]
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift:
        padded = F.pad(x, (shift,) * 4)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=g)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=g)
        h, w = x.shape[-2:]
        rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * shift)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    return x


def train_fashion_cnn(train, test=None, *, epochs=None, seed=None, limit=None, **overrides):
    """Train a fresh fashion-cnn on (images, labels); returns (model, history)."""
    cfg = dict(RECIPE, **{k: v for k, v in overrides.items() if v is not None})
    if epochs is not None:
        cfg["epochs"] = epochs
    if seed is not None:
        cfg["seed"] = seed
    torch.manual_seed(cfg["seed"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    g = torch.Generator().manual_seed(cfg["seed"])
    x, y = train
    if limit:
        x, y = x[:limit], y[:limit]
    model = fashion_cnn(weights="random")
    net = model.net
    opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True,
                          weight_decay=cfg["weight_decay"])
    steps_per_epoch = (len(x) + cfg["batch_size"] - 1) // cfg["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], epochs=cfg["epochs"],
                                                steps_per_epoch=steps_per_epoch)
    history = []
    for epoch in range(cfg["epochs"]):
        model.train()
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        bar = progress(range(steps_per_epoch), desc=f"train epoch {epoch + 1}/{cfg['epochs']}", unit="batch")
        for b in bar:
            idx = order[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
            xb = _augment(x[idx], g, cfg["shift"])
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        entry = {"epoch": epoch + 1, "loss": total / len(x)}
        if test is not None:
            with torch.random.fork_rng():  # evaluation must not shift the training RNG stream
                entry["test_top1"] = evaluate(model, test, desc="test")["top1"]
        history.append(entry)
    torch.use_deterministic_algorithms(False)
    return model.eval(), {"recipe": cfg, "history": history}


def save_weights(model, path) -> Path:
    from safetensors.torch import save

    from ..cache import canonical_safetensors

    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    return atomic_write_bytes(path, canonical_safetensors(save(state, metadata={"model": "fashion-cnn"})))


def train_default(out=None, *, data_dir=None, epochs=None, seed=None) -> dict:
    """Re-create the packaged weights (or write them to `out`), with their training log."""
    from ..data import load_fashion_mnist
    from .zoo import packaged_weights_path

    if epochs is not None and epochs < 1:
        raise FvtrustError(f"epochs must be >= 1, got {epochs}")
    train = load_fashion_mnist("train", data_dir)
    test = load_fashion_mnist("test", data_dir)
    model, info = train_fashion_cnn(train, test, epochs=epochs, seed=seed)
    path = Path(out) if out else packaged_weights_path()
    if path.suffix != ".safetensors":
        path = path / "fashion_cnn.safetensors"
    save_weights(model, path)
    final = evaluate(model, test, desc="test")
    info.update({"weights": str(path), "test_top1": final["top1"], "test_top5": final["top5"],
                 "torch": torch.__version__, "threads": torch.get_num_threads()})
    atomic_write_json(path.with_suffix(".json"), info)
    return info
