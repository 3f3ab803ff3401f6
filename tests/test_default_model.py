"""The embedded default meets its contract on the real Fashion-MNIST test set."""
import gzip

import numpy as np
import pytest
import torch

import fvtrust


def _independent_read(path):
    """A second IDX reader, written from the format spec, to cross-check ours."""
    raw = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4")
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(tuple(int(d) for d in dims))


def _fashion_dir():
    from fvtrust.data.idx import locate_fashion_mnist

    try:
        img, lbl = locate_fashion_mnist("test")
    except fvtrust.FvtrustError:
        pytest.skip("Fashion-MNIST not available")
    return str(img), str(lbl)


@pytest.mark.slow
def test_accuracy_at_least_90_percent_independent_reader(trained_fashion):
    img, lbl = _fashion_dir()
    x = torch.from_numpy(_independent_read(img).astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(_independent_read(lbl).astype(np.int64))
    assert x.shape == (10000, 1, 28, 28)
    with torch.no_grad():
        pred = torch.cat([trained_fashion(x[i:i + 500]).argmax(1) for i in range(0, 10000, 500)])
    top1 = (pred == y).sum().item() / len(y)  # exact count, as evaluate() computes it
    assert top1 >= 0.90
    ours = fvtrust.evaluate(trained_fashion, fvtrust.data.load_fashion_mnist("test"))
    assert abs(ours["top1"] - top1) < 1e-12


def test_packaged_weights_small():
    from fvtrust.models.zoo import packaged_weights_path

    assert packaged_weights_path().stat().st_size < 5e6


def test_training_recipe_is_deterministic_and_learns():
    """A few hundred steps of the recipe on synthetic data: same seed, same weights; loss drops."""
    from fvtrust.models.train import train_fashion_cnn

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 10
    x = torch.rand(200, 1, 28, 28, generator=g) * 0.2
    x[torch.arange(200), 0, y * 2, :] = 1.0  # class = position of a bright row
    m1, h1 = train_fashion_cnn((x, y), (x, y), epochs=3, seed=3, batch_size=20, lr=0.05, shift=0)
    m2, _ = train_fashion_cnn((x, y), None, epochs=3, seed=3, batch_size=20, lr=0.05, shift=0)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert h1["history"][-1]["loss"] < h1["history"][0]["loss"]
    assert h1["history"][-1]["test_top1"] > 0.5
