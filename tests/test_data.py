import numpy as np
import pytest
import torch

from fvtrust.data import load_data, load_fashion_mnist, load_picture, read_idx
from fvtrust.data.pictures import natural_pictures
from fvtrust.errors import FvtrustError



def write_idx(path, arr, gz=False):
    import gzip

    import numpy as np

    arr = np.asarray(arr)
    code = {np.dtype("uint8"): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _fake_fashion(tmp_path, n=20, gz=False):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", imgs, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", labels, gz)
    return imgs, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    imgs, labels = _fake_fashion(tmp_path, gz=gz)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.from_numpy(imgs / 255.0).float())
    assert y.tolist() == labels.tolist()


def test_corrupt_idx(tmp_path):
    _fake_fashion(tmp_path)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(FvtrustError, match="corrupt IDX"):
        load_fashion_mnist("test", tmp_path)
    p.write_bytes(b"\x01\x02\x03")
    with pytest.raises(FvtrustError, match="bad magic"):
        read_idx(p)


def test_mismatched_counts(tmp_path):
    _fake_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(FvtrustError, match="do not match"):
        load_fashion_mnist("test", tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(FvtrustError, match="not found"):
        load_fashion_mnist("test", tmp_path / "nope")
    with pytest.raises(FvtrustError, match="split"):
        load_fashion_mnist("validation", tmp_path)


def test_pictures_shapes():
    rgb = load_picture("astronaut", (3, 64, 48))
    grey = load_picture("coffee", (1, 28, 28))
    assert rgb.shape == (3, 64, 48) and grey.shape == (1, 28, 28)
    assert 0 <= rgb.min() and rgb.max() <= 1 and rgb.std() > 0.05
    nat = natural_pictures((1, 28, 28), crops_per_picture=1)
    assert nat.shape[1:] == (1, 28, 28) and len(nat) >= 10


def test_picture_errors(tmp_path):
    with pytest.raises(FvtrustError, match="unknown picture"):
        load_picture("mona_lisa")
    with pytest.raises(FvtrustError, match="not found"):
        load_picture(str(tmp_path / "x.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(FvtrustError, match="cannot read"):
        load_picture(str(bad))


def test_load_data_specs(tmp_path):
    _fake_fashion(tmp_path)
    ds = load_data("fashion-mnist", data_dir=tmp_path)
    assert len(ds) == 20
    with pytest.raises(FvtrustError, match="1x28x28"):
        load_data("fashion-mnist", input_shape=(3, 224, 224), data_dir=tmp_path)
    with pytest.raises(FvtrustError, match="unknown data"):
        load_data("imagenet-val")


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / cls / "x.png")
    ds = load_data(str(tmp_path), input_shape=(3, 32, 32))
    x, y = ds[1]  # no model classes and no class index: the images are usable, unlabelled
    assert x.shape == (3, 32, 32) and y == -1 and abs(x.mean().item() - 128 / 255) < 1e-2
    ds = load_data(str(tmp_path), input_shape=(3, 32, 32), class_index={"a": 7, "b": 3})
    assert ds[0][1] == 7 and ds[1][1] == 3


def test_nonempty_gives_float_images_or_one_clear_error():
    import torch

    from fvtrust.data import natural
    from fvtrust.errors import FvtrustError

    data = natural(torch.zeros(3, 1, 4, 4, dtype=torch.float64))
    x, y = data.fit.nonempty(2)
    assert x.dtype == torch.float32 and x.shape == (2, 1, 4, 4) and len(y) == 2
    with pytest.raises(FvtrustError, match="has no fit images"):
        data.fit.select([], role="fit").nonempty()
