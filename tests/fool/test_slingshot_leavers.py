"""benchmarks/slingshot_leavers.py: its pixel statistics by hand, and one-line errors for bad models."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import slingshot_leavers  # noqa: E402


def test_pixel_stats_count_mid_grey_and_black_pixels():
    # 8 pixels: 0 (black) x3, 0.01 (black), 0.31, 0.5, 0.69 (mid-grey), 1.0; 0.3 and 0.7 themselves are not mid-grey
    x = torch.tensor([0, 0, 0, 0.01, 0.31, 0.5, 0.69, 1.0]).view(1, 1, 2, 4)
    assert slingshot_leavers.pixel_stats(x) == f"mean {x.mean():.3f}, mid-grey 0.375, black 0.500"
    edge = torch.tensor([0.3, 0.7, 0.02, 0.02]).view(1, 1, 2, 2)
    assert slingshot_leavers.pixel_stats(edge) == "mean 0.260, mid-grey 0.000, black 0.000"
    assert slingshot_leavers.pixel_stats(torch.zeros(0, 1, 2, 2)) == "(none)"


def test_missing_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["slingshot_leavers.py", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as e:
        slingshot_leavers.main()
    assert str(e.value).startswith("slingshot_leavers: ") and "\n" not in str(e.value)


def test_bad_top_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["slingshot_leavers.py", str(tmp_path), "--top", "0"])
    with pytest.raises(SystemExit):
        slingshot_leavers.main()
    assert "--top must be >= 1" in capsys.readouterr().err
