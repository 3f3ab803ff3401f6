"""Fooling feature visualizations: three attacks side by side, one subpackage each.

* `circuit`: the fooling circuit (paper §2.1), an added circuit gated by a
  visualization detector (`detector`, shared with the audit);
* `silent`: silent units (paper §2.2), an added parallel filter;
* `slingshot`: gradient slingshots (Bareeva et al.), weights only.

All return a *new* model (the original is untouched) that behaves like the
original on natural input, and save to directories `fvtrust.load_model` reloads.
"""


def fooling_circuit(*args, **kwargs):
    """See fvtrust.fool.circuit.fooling_circuit."""
    from .circuit.build import fooling_circuit as impl

    return impl(*args, **kwargs)


def silent_units(*args, **kwargs):
    """See fvtrust.fool.silent.silent_units."""
    from .silent.build import silent_units as impl

    return impl(*args, **kwargs)


def __getattr__(name):
    """`fvtrust.fool.slingshot` (a callable subpackage) is imported on first use, like the functions above."""
    if name == "slingshot":
        import importlib

        return importlib.import_module(".slingshot", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["fooling_circuit", "silent_units", "slingshot"]
