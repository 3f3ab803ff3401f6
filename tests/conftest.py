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


def make_image_folder(root, classes=("n01440764", "n01443537", "n01484850"), per_class: int = 4, size=(40, 48),
                      seed: int = 0):
    """An ImageNet-style folder (one sub-folder per class, JPEG/PNG files) of smooth random images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.random((4, 4, 3)) * 0.6 + 0.2 * (ci % 3) / 2
            img = np.kron(base, np.ones((size[0] // 4 + 1, size[1] // 4 + 1, 1)))[:size[0], :size[1]]
            img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(d / f"img{i}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture
def imagenet_folder(tmp_path):
    """3 ImageNet synset folders x 4 images (labels map through the standard 1000-class order)."""
    return make_image_folder(tmp_path / "val")


@pytest.fixture
def image_folder_factory():
    """make_image_folder, for tests that need folders with their own class names."""
    return make_image_folder


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The bad-input sweep's size (tests/test_bad_input.py), so the summary says what was covered."""
    s = getattr(config, "_fvtrust_sweep", None)
    if s:
        terminalreporter.write_line(f"bad-input sweep: {s['commands']} commands x {s['inputs']} inputs -> "
                                    f"{s['cases']} applicable cases run, {s['passed']} passed, {s['exempt']} exempt (EXEMPT lists why)")
    for rec in getattr(config, "_fvtrust_faults", []):
        same = sum(not v.startswith("DIFFERENT") for v in rec.get("outputs", {}).values())
        terminalreporter.write_line(
            f"fault injection {rec['pipeline']}: {rec.get('kills', 0)} kills at events {rec.get('points')} of "
            f"{rec['reference_events']}, rerun rc {rec.get('final_rc')}, outputs same {same}/"
            f"{len(rec.get('outputs', {}))}, recomputed entries {len(rec.get('rewritten_entries', []))}")
