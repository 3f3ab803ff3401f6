"""`fvtrust fool circuit|silent|detector|slingshot`: each subcommand lives beside its method."""
import importlib

import click


@click.group("fool")
def fool_group():
    """Manipulate a model so its feature visualizations lie (paper §2)."""


for _mod, _attr in [("fvtrust.fool.circuit_cli", "circuit_command"), ("fvtrust.fool.silent_cli", "silent_command"),
                    ("fvtrust.fool.detector_cli", "detector_command"),
                    ("fvtrust.fool.slingshot.cli", "slingshot_command")]:
    try:
        fool_group.add_command(getattr(importlib.import_module(_mod), _attr))
    except (ImportError, AttributeError):
        pass
