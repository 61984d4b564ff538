"""The command line: the one place that imports typer/rich and maps errors to one-line messages."""
