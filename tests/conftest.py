import os

os.environ.setdefault("FVTRUST_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def random_fashion():
    """fashion-cnn with random weights: the architecture without the trained weights."""
    import fvtrust

    torch.manual_seed(0)
    return fvtrust.load_model("fashion-cnn", weights="random")


@pytest.fixture(scope="session")
def trained_fashion():
    import fvtrust
    from fvtrust.models.zoo import packaged_weights_path

    if not packaged_weights_path().is_file():
        pytest.fail("packaged fashion-cnn weights are missing")
    return fvtrust.load_model("fashion-cnn")
