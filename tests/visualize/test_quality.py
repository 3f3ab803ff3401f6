"""The paper's premise on the embedded default: visualizations are recognized and far outside the natural range."""
import pytest
import torch

import fvtrust


@pytest.mark.slow
def test_last_layer_visualizations_classified_and_beyond_natural(trained_fashion):
    r = fvtrust.visualize(trained_fashion, "fc", "all", steps=512)
    with torch.no_grad():
        pred = trained_fashion(r.final).argmax(1)
    assert (pred == torch.arange(10)).sum() >= 9
    x, _ = fvtrust.data.load_fashion_mnist("test")
    natural_max = fvtrust.predict(trained_fashion, x, batch_size=1000).max(0).values
    assert (r.objective[-1] > natural_max).all()
