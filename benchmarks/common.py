"""What the benchmarks share: which model, layer, units and step budget they run on, and saved slingshots.

Declared once so `bench_methods.py` and `grey_units.py` spell these options
(and load the model) the same way, and `slingshot_spread.py` and
`slingshot_leavers.py` read their saved slingshots the same way.
"""
from __future__ import annotations

import argparse


def model_arguments(ap: argparse.ArgumentParser, *, layer: str, units: str, steps: int = 512) -> None:
    """--model/--weights/--layer/--units/--steps, with this benchmark's defaults."""
    ap.add_argument("--model", default="fashion-cnn", help="any model spec fvtrust accepts")
    ap.add_argument("--weights", default=None, help="e.g. random (default: the spec's pretrained weights)")
    ap.add_argument("--layer", default=layer)
    ap.add_argument("--units", default=units, help='e.g. 0-9, 1,4,7 or "all"')
    ap.add_argument("--steps", type=int, default=steps, help="visualization steps")


def load_model(a: argparse.Namespace):
    """The model named by --model/--weights."""
    import fvtrust

    return fvtrust.load_model(a.model, **({"weights": a.weights} if a.weights else {}))


def saved_slingshots(paths, prog: str):
    """Yield (path, slingshot, original, layer, unit, settings) for each saved slingshot; SystemExit in one line
    (prefixed with `prog`) for anything that is not one (`fvtrust.fool.slingshot.load_saved_slingshot`)."""
    from fvtrust.errors import FvtrustError
    from fvtrust.fool.slingshot import load_saved_slingshot

    for path in paths:
        try:
            fooled, original, info = load_saved_slingshot(path)
        except FvtrustError as e:
            raise SystemExit(f"{prog}: {e}")
        yield path, fooled, original, info["layer"], int(info["unit"]), info
