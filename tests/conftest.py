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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The bad-input sweep's size (tests/test_bad_input.py), so the summary says what was covered."""
    s = getattr(config, "_fvtrust_sweep", None)
    if s:
        terminalreporter.write_line(f"bad-input sweep: {s['commands']} commands x {s['inputs']} inputs -> "
                                    f"{s['cases']} applicable cases run, {s['passed']} passed")
    for rec in getattr(config, "_fvtrust_faults", []):
        same = sum(not v.startswith("DIFFERENT") for v in rec.get("outputs", {}).values())
        terminalreporter.write_line(
            f"fault injection {rec['pipeline']}: {rec.get('kills', 0)} kills at events {rec.get('points')} of "
            f"{rec['reference_events']}, rerun rc {rec.get('final_rc')}, outputs same {same}/"
            f"{len(rec.get('outputs', {}))}, recomputed entries {len(rec.get('rewritten_entries', []))}")
