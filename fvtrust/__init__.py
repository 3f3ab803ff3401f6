"""fvtrust: can I trust this feature visualization?

Implements Geirhos et al., "Don't trust your eyes: on the (un)reliability of
feature visualizations" (ICML 2024): visualize, fool, sanity-check, theory,
linearity, and a one-command reproduction with an HTML report.
"""
from . import data, scale  # scale: fvtrust.scale.workers (Ray only when asked)
from .errors import FvtrustError
from .evaluate import evaluate, predict
from .data import natural
from .models import as_model, list_layers, list_specs, load_model, save_model, wrap
from .visualize import visualize
from .audit import audit  # the function (as visualize); fvtrust.audit.core etc. stay importable

__version__ = "0.1.0"
__all__ = ["load_model", "wrap", "as_model", "natural", "list_layers", "list_specs", "save_model", "visualize", "audit", "evaluate", "predict",
           "FvtrustError", "__version__"]
