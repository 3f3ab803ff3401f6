"""Fooling feature visualizations (paper §2): the fooling circuit and silent units.

Both return a *new* model (the original is untouched) that behaves like the
original on natural input, and save to directories `fvtrust.load_model` reloads.
"""


def fooling_circuit(*args, **kwargs):
    """See fvtrust.fool.circuit.fooling_circuit."""
    from .circuit import fooling_circuit as impl

    return impl(*args, **kwargs)


def silent_units(*args, **kwargs):
    """See fvtrust.fool.silent.silent_units."""
    from .silent import silent_units as impl

    return impl(*args, **kwargs)


__all__ = ["fooling_circuit", "silent_units"]
