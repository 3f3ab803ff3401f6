"""Feature visualization (lucent's split): param, transforms, objectives, render."""
from .objectives import Channel, Direction, Diversity, Neuron, Objective, make_objective
from .param import make_param
from .render import VisualizationResult, visualize
from .transforms import TransformSpec

__all__ = ["visualize", "VisualizationResult", "make_param", "make_objective", "Objective", "Neuron", "Channel",
           "Direction", "Diversity", "TransformSpec"]
