"""Attack 1, the fooling circuit (paper §2.1): an added circuit routes visualizations to another unit.

Modules: `build` (the circuit and `fooling_circuit`), `report` (the paper's
experiment: natural behaviour kept, visualizations replaced), `figures`,
`cli` (`fvtrust fool circuit`). The circuit needs a detector of
visualizations, which lives in the sibling `fvtrust.fool.detector` because
the audit and the benchmarks use it too.
"""
from .build import CircuitLayer, CircuitModel, fooling_circuit, rebuild, save_circuit

__all__ = ["CircuitLayer", "CircuitModel", "fooling_circuit", "rebuild", "save_circuit"]
