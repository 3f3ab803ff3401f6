import pytest
import torch
from torch.utils.data import Dataset

from fvtrust.errors import FvtrustError
from fvtrust.linearity import top_activating, top_activating_many
from fvtrust.models.hooks import layer_output


class ListDataset(Dataset):
    """Not a TensorDataset: exercises the item-by-item loading path."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], -1


def brute_force(model, layer, units, x, m, objective):
    with torch.no_grad():
        a = layer_output(model, x, layer)[:, units]
    v = a.mean((2, 3)) if objective == "channel" else a[:, :, a.shape[2] // 2, a.shape[3] // 2]
    order = torch.sort(v, dim=0, descending=True, stable=True).indices[:m]
    return v.gather(0, order).T, order.T


@pytest.mark.parametrize("objective", ["channel", "neuron"])
def test_streaming_top_k_matches_brute_force(random_fashion, objective):
    x = torch.rand(75, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    units = [0, 3, 9, 17]
    values, idx = brute_force(random_fashion, "block2", units, x, 6, objective)
    for batch in (7, 1000):
        top = top_activating_many(random_fashion, "block2", units, x, 6, objective=objective, batch_size=batch)
        assert torch.equal(top.indices, idx)
        torch.testing.assert_close(top.values, values, rtol=1e-5, atol=1e-6)
        assert top.images.shape == (4, 6, 1, 28, 28)
        assert torch.equal(top.images, x[idx])
        assert torch.all(top.values[:, :-1] >= top.values[:, 1:])  # best first


def test_ties_go_to_the_earlier_image(random_fashion):
    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    x = torch.cat([x, x])  # every image twice: indices i and i + 10 tie
    top = top_activating_many(random_fashion, "block1", [0, 1], x, 4, batch_size=3)
    ties = 0
    for vals, idx in zip(top.values, top.indices):
        for j in range(3):
            if vals[j] == vals[j + 1]:
                ties += 1
                assert idx[j] < idx[j + 1]
    assert ties >= 2  # the test did see ties


def test_dataset_pairs_and_single_unit(random_fashion):
    x = torch.rand(30, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    a = top_activating_many(random_fashion, "block3", [5], ListDataset(x), 5, batch_size=8)
    b = top_activating_many(random_fashion, "block3", [5], (x, torch.zeros(30)), 5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    one = top_activating(random_fashion, "block3", 5, x, m=5)
    assert one.images.shape == (5, 1, 28, 28) and one.values.shape == (5,)
    assert torch.equal(one.indices, a.indices[0])
    assert one.to_dict()["units"] == [5]


def test_bad_input(random_fashion):
    x = torch.rand(5, 1, 28, 28)
    with pytest.raises(FvtrustError, match="at least m=6"):
        top_activating_many(random_fashion, "block1", [0], x, 6)
    with pytest.raises(FvtrustError, match="objective"):
        top_activating_many(random_fashion, "block1", [0], x, 2, objective="chanel")
    with pytest.raises(FvtrustError, match="model expects"):
        top_activating_many(random_fashion, "block1", [0], torch.rand(5, 3, 28, 28), 2)
    with pytest.raises(FvtrustError, match="out of range"):
        top_activating_many(random_fashion, "block1", [40], x, 2)
    with pytest.raises(FvtrustError, match="unknown data .images."):
        top_activating_many(random_fashion, "block1", [0], "images", 2)
