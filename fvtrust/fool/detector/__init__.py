"""The visualization detector that the fooling circuit gates on (paper App. B.1).

Shared by the circuit attack, the audit benchmark and reproduce, so it is
its own subpackage rather than part of `fvtrust.fool.circuit`. Modules:
`data` (visualization trajectories of many units, cached by chunk),
`model` (the small CNN), `train` (train, evaluate, save, load,
`build_detector`), `harden` (retraining on the circuit's own
visualizations), `cli` (`fvtrust fool detector`).
"""
from .model import Detector
from .train import (DetectorBudget, DetectorData, build_detector, detector_data, evaluate_detector,
                    load_detector, resolve_budget, save_detector, train_detector)

__all__ = ["Detector", "DetectorBudget", "DetectorData", "build_detector", "detector_data",
           "evaluate_detector", "load_detector", "resolve_budget", "save_detector", "train_detector"]
