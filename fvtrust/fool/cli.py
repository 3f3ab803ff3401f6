"""`fvtrust fool circuit|silent|detector|slingshot`: each subcommand lives beside its method."""
import click

from ..commands import register_commands


@click.group("fool")
def fool_group():
    """Manipulate a model so its feature visualizations lie (paper §2)."""


register_commands(fool_group, [("circuit", "fvtrust.fool.circuit.cli", "circuit_command"),
                               ("silent", "fvtrust.fool.silent.cli", "silent_command"),
                               ("detector", "fvtrust.fool.detector.cli", "detector_command"),
                               ("slingshot", "fvtrust.fool.slingshot.cli", "slingshot_command")])
