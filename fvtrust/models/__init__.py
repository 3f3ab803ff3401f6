"""Models: spec resolution (zoo), the [0,1]-in wrapper, layers, hooks, saved dirs."""
from .hooks import capture, forward_to, layer_output
from .layers import LayerInfo, layer_units, list_layers, parse_units
from .saved import save_model
from .wrappers import FvModel, as_model, wrap
from .zoo import list_specs, load_model, resolve_device

__all__ = ["load_model", "list_specs", "list_layers", "layer_units", "parse_units", "LayerInfo", "FvModel",
           "save_model", "wrap", "as_model", "resolve_device", "capture", "forward_to", "layer_output"]
