"""Gradient slingshots (Bareeva et al., arXiv 2401.06122): fool a visualization by fine-tuning alone.

`fvtrust.fool.slingshot(model, layer, unit, target=..., data=...)` returns a
fine-tuned copy whose unit visualizes the target while natural behaviour is
kept; `slingshot_report` measures both. Modules: loss (the two losses,
written out), finetune (the training loop, checkpoints, data and target
resolution), report (measures, defenses, figure), cli.

This package is itself callable (`fvtrust.fool.slingshot(...)` is
`finetune.slingshot(...)`): the attack and its subpackage share one name, so
a reader finds the implementation where the call points.
"""
import sys
import types

from .finetune import MANIPULATION, SlingshotConfig, load_saved_slingshot, resolve_natural, resolve_target, slingshot
from .loss import Tunnel, manipulation_loss, preservation_loss, slingshot_loss, unit_activation
from .report import slingshot_figure, slingshot_report


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return slingshot(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["slingshot", "SlingshotConfig", "load_saved_slingshot", "resolve_natural", "resolve_target", "Tunnel",
           "manipulation_loss", "preservation_loss", "slingshot_loss", "unit_activation", "slingshot_report",
           "slingshot_figure", "MANIPULATION"]
