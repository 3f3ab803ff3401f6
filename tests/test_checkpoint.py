"""Epoch checkpoints resume bit for bit: weights, optimizer state, numpy and torch generators."""
import json

import numpy as np
import pytest
import torch

from fvtrust.checkpoint import EpochCheckpoint
from fvtrust.fool.detector.train import train_detector


class Interrupted(Exception):
    pass


def _loop(ckpt, epochs, *, opt_kind, stop_after=None):
    """A tiny training loop that draws from numpy and torch every step (like the detector's)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(4, 1))
    opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if opt_kind == "sgd"
           else torch.optim.Adam(net.parameters(), lr=0.01))
    rng = np.random.default_rng(3)
    start = ckpt.load(net, opt, {"rng": rng})[0] if ckpt else 0
    for e in range(start, epochs):
        for _ in range(4):
            x = torch.from_numpy(rng.normal(size=(8, 5)).astype(np.float32))
            loss = net(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ckpt:
            ckpt.save(e + 1, net, opt, {"rng": rng}, extra={"loss": loss.item()})
        if stop_after is not None and e + 1 == stop_after:
            raise Interrupted
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("stop_after", [1, 2])
def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, opt_kind, stop_after):
    ref = _loop(None, 3, opt_kind=opt_kind)
    ck = EpochCheckpoint(tmp_path / "ck", "run-a")
    with pytest.raises(Interrupted):
        _loop(ck, 3, opt_kind=opt_kind, stop_after=stop_after)
    resumed = _loop(EpochCheckpoint(tmp_path / "ck", "run-a"), 3, opt_kind=opt_kind)
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)
    # without restoring state the result differs: the test can fail
    fresh = _loop(None, 3 - stop_after, opt_kind=opt_kind)
    assert not all(torch.equal(ref[k], fresh[k]) for k in ref)


def test_only_the_last_epoch_is_kept_and_clear_removes_it(tmp_path):
    ck = EpochCheckpoint(tmp_path / "ck", "k")
    _loop(ck, 3, opt_kind="sgd")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["epoch-0003.json", "epoch-0003.safetensors"]
    ck.clear()
    assert not (tmp_path / "ck").exists()


def test_foreign_or_damaged_checkpoint_is_never_loaded(tmp_path, capsys):
    ref = _loop(None, 2, opt_kind="sgd")
    ck = EpochCheckpoint(tmp_path / "ck", "run-a")
    with pytest.raises(Interrupted):
        _loop(ck, 2, opt_kind="sgd", stop_after=1)
    # another run's key: ignored, training starts over and still gives the reference
    other = _loop(EpochCheckpoint(tmp_path / "ck", "run-b"), 2, opt_kind="sgd")
    assert all(torch.equal(ref[k], other[k]) for k in ref)
    assert "fingerprint" in capsys.readouterr().err
    # a garbled weights file: reported, ignored, recomputed
    with pytest.raises(Interrupted):
        _loop(EpochCheckpoint(tmp_path / "ck2", "run-a"), 2, opt_kind="sgd", stop_after=1)
    w = tmp_path / "ck2" / "epoch-0001.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0xFF
    w.write_bytes(bytes(raw))
    again = _loop(EpochCheckpoint(tmp_path / "ck2", "run-a"), 2, opt_kind="sgd")
    assert all(torch.equal(ref[k], again[k]) for k in ref)
    assert "garbled" in capsys.readouterr().err
    # a damaged newest checkpoint falls back to the one before it (left when a kill interrupts the cleanup)
    import shutil
    ck4 = EpochCheckpoint(tmp_path / "ck4", "run-a")
    with pytest.raises(Interrupted):
        _loop(ck4, 3, opt_kind="sgd", stop_after=1)
    shutil.copytree(tmp_path / "ck4", tmp_path / "ck4-epoch1")
    with pytest.raises(Interrupted):
        _loop(EpochCheckpoint(tmp_path / "ck4", "run-a"), 3, opt_kind="sgd", stop_after=2)
    for f in (tmp_path / "ck4-epoch1").iterdir():
        shutil.copy(f, tmp_path / "ck4" / f.name)
    (tmp_path / "ck4" / "epoch-0002.json").write_text("{")
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(4, 1))
    assert ck4.load(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))[0] == 1
    assert not (tmp_path / "ck4" / "epoch-0002.json").exists()
    # a truncated state file
    (tmp_path / "ck3").mkdir()
    (tmp_path / "ck3" / "epoch-0001.json").write_text('{"fvtrust_cache": {"key": "run-a:1"')
    assert EpochCheckpoint(tmp_path / "ck3", "run-a").load(torch.nn.Linear(1, 1),
                                                           torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), 0.1)) == (0, {})


def test_detector_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    nat = torch.rand(64, 1, 28, 28, generator=g) * 0.5
    vis = torch.rand(64, 1, 28, 28, generator=g) * 0.5 + 0.5
    budget = {"epochs": 3, "natural_per_epoch": 64, "batch_size": 32}
    ref = train_detector(nat, vis, budget=budget, seed=1)
    ck = EpochCheckpoint(tmp_path / "ck", "det")
    real_save = EpochCheckpoint.save

    def save_then_die(self, epoch, *a, **k):
        real_save(self, epoch, *a, **k)
        if epoch == 2:
            raise Interrupted

    monkeypatch.setattr(EpochCheckpoint, "save", save_then_die)
    with pytest.raises(Interrupted):
        train_detector(nat, vis, budget=budget, seed=1, checkpoint=ck)
    monkeypatch.setattr(EpochCheckpoint, "save", real_save)
    assert json.loads((tmp_path / "ck" / "epoch-0002.json").read_text())["data"]["epoch"] == 2
    resumed = train_detector(nat, vis, budget=budget, seed=1, checkpoint=EpochCheckpoint(tmp_path / "ck", "det"))
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()))
