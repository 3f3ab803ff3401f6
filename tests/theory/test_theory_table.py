"""Table 1 / Table 2 derived numerically, its failure modes, and the CLI command."""
import json

import numpy as np
import pytest

from fvtrust.theory import CLASSES, table1
from fvtrust.theory import table as table_mod

# The paper's Table 1: No everywhere except affine (d = 1) and constant. Written out here,
# in the test, to compare the derived table against.
PAPER = {c: (c in ("affine_1d", "constant")) for c in CLASSES}
PAPER_T2 = {
    "black_box": ("Theorem 1", "Theorem 2"), "nn": ("Theorem 1", "Theorem 2"),
    "erm": ("Theorem 1", "Theorem 2"), "lipschitz": ("Theorem 4", "Theorem 5"),
    "piecewise_affine": ("Theorem 1", "Theorem 2"), "monotone": ("Theorem 1", "Theorem 2"),
    "convex": ("Theorem 3", "Theorem 2"), "affine": ("Theorem 6", "Theorem 7"),
    "affine_1d": ("Theorem 8", "Theorem 8"), "constant": ("Theorem 8", "Theorem 8"),
}


@pytest.fixture(scope="module")
def derived():
    return table1(samples=4, seed=1)


def test_table1_pattern_matches_paper(derived):
    assert list(derived) == list(CLASSES)
    for c in CLASSES:
        assert derived[c] == {"exact": PAPER[c], "approx": PAPER[c], "closer": PAPER[c]}
        assert all(type(v) is bool for v in derived[c].values())
    assert derived.agrees_with_paper


def test_table2_matches_paper(derived):
    for c in CLASSES:
        t = derived.table2[c]
        assert (t["exact"], t["approx"], t["closer"]) == (PAPER_T2[c][0], PAPER_T2[c][0], PAPER_T2[c][1])


def test_evidence_backs_each_cell(derived):
    ev = derived.evidence
    for c in CLASSES:
        e = ev[c]
        assert e["lemma3_lemma4_violations"] == [0, 0]
        assert e["phi_max_mismatch"] <= 1e-9
        assert e["relu_max_error"]["float64"] <= 1e-6
        assert e["prop1_midpoint_worst_ratio"] <= 0.5 + 1e-9
        if not PAPER[c]:
            lo = e["exact"]["certified_lower_bound_ratio"]["max"]
            expected = 0.25 if c == "convex" else 0.5  # (f_max - f_min)/4 for convex, /2 otherwise
            assert lo == pytest.approx(expected, abs=1e-9)
            assert e["exact"]["bound_met"].split("/")[0] == e["exact"]["bound_met"].split("/")[1]
        else:
            assert e["exact"]["worst_error"]["affine (Thm 8)"] <= 1e-12
    assert ev["convex"]["exact"]["certified_lower_bound_ratio"]["min"] == pytest.approx(0.25)
    lip = ev["lipschitz"]["lipschitz"]
    assert lip["regimes"]["2*Delta <= L*|dx|"] > 0 and lip["regimes"]["2*Delta > L*|dx|"] > 0
    assert ev["erm"]["erm"]["min_excess_risk_of_other_function"] > 0
    json.dumps(derived.to_dict())  # JSON-ready


def test_table_fails_loudly_when_a_construction_is_broken(monkeypatch):
    real = table_mod.counterexamples

    def identical(cls, phi, **params):  # a "construction" whose pair is always the same function
        f1, _ = real(cls, phi, **params)
        return f1, f1

    monkeypatch.setattr(table_mod, "counterexamples", identical)
    with pytest.raises(table_mod.TheoryCheckFailed, match="neither Yes nor No|bound"):
        table1(samples=2, classes=["monotone"])


def test_table_fails_when_phi_is_not_shared(monkeypatch):
    real = table_mod.counterexamples

    def shifted(cls, phi, **params):
        f1, f2 = real(cls, phi, **params)
        return f1, f2.with_values(np.clip(f2.values + 0.01, 0, 1))

    monkeypatch.setattr(table_mod, "counterexamples", shifted)
    with pytest.raises(table_mod.TheoryCheckFailed, match="Phi not shared"):
        table1(samples=2, classes=["piecewise_affine"])


def test_table_rejects_bad_arguments():
    from fvtrust.errors import FvtrustError

    with pytest.raises(FvtrustError):
        table1(samples=0)
    with pytest.raises(FvtrustError, match="unknown function class"):
        table1(samples=1, classes=["convx"])


def test_cli_writes_outputs(tmp_path, derived, monkeypatch):
    from click.testing import CliRunner

    from fvtrust.theory.cli import theory_command

    calls = []
    monkeypatch.setattr(table_mod, "table1", lambda **kw: calls.append(kw) or derived)  # reuse the fixture
    out = tmp_path / "theory"
    res = CliRunner().invoke(theory_command, ["--out", str(out), "--samples", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert calls == [{"samples": 2, "seed": 3}]
    data = json.loads((out / "table1.json").read_text())
    assert data["table1"]["constant"] == {"exact": True, "approx": True, "closer": True}
    assert data["table1"]["convex"]["closer"] is False
    assert data["agrees_with_paper_table1"] is True
    assert "| convex |" in (out / "table1.md").read_text()
    assert (out / "counterexamples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_cli_user_errors(tmp_path):
    from fvtrust.errors import FvtrustError
    from fvtrust.theory.cli import run_theory

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FvtrustError, match="not a directory"):
        run_theory(f, samples=1)
    with pytest.raises(FvtrustError, match="samples"):
        run_theory(tmp_path / "o", samples=0)
