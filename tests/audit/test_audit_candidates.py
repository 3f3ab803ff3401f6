"""benchmarks/audit_candidates.py: bad input fails in one line, before any work."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import audit_candidates  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["nowhere/model", "--layer", "fc"], "unknown model spec"),
    (["fashion-cnn", "--layer", "nope"], "nope"),
    (["fashion-cnn", "--layer", "fc", "--unit", "10"], "unit 10 out of range for fc: valid units are 0..9"),
])
def test_bad_input_is_one_line(monkeypatch, argv, message):
    monkeypatch.setattr(sys, "argv", ["audit_candidates.py", *argv])
    with pytest.raises(SystemExit) as e:
        audit_candidates.main()
    text = str(e.value)
    assert text.startswith("audit_candidates: ") and message in text and "\n" not in text


def test_pearson_rows_is_the_row_wise_correlation():
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 4, 5, generator=g), torch.randn(3, 1, 4, 5, generator=g)
    want = [np.corrcoef(a[i].flatten(), b[i].flatten())[0, 1] for i in range(3)]
    assert torch.allclose(audit_candidates.pearson_rows(a, b), torch.tensor(want, dtype=torch.float32), atol=1e-6)
