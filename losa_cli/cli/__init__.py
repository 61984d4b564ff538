"""The command line: the one place that imports typer/rich and maps errors to one-line messages.

``application.py`` holds the application and what every command shares, ``render.py`` how results read, and
one module per command parses its options into its stage's config and calls its workflow."""

from . import bench, eval, export, generate, inspect, prune, recover, run, serve  # noqa: F401 - each registers its command
from .application import app


def main() -> None:
    """Console-script entry point."""
    app()
