"""Make torch-lucent 0.1.8 usable with a current kornia, for parity tests and benchmarks.

lucent 0.1.8 pins kornia<=0.4.1 (which does not install with torch 2.x) and
calls `kornia.get_rotation_matrix2d` / `kornia.warp_affine`, which newer
kornia keeps under `kornia.geometry.transform`. We alias them; nothing else.
"""
from __future__ import annotations


def import_lucent():
    """Import lucent's render/param/transform modules, or raise ImportError."""
    import kornia
    import kornia.geometry.transform as kgt

    for name in ("get_rotation_matrix2d", "warp_affine"):
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(kgt, name))
    import lucent.optvis.param as param
    import lucent.optvis.render as render
    import lucent.optvis.transform as transform

    return render, param, transform
