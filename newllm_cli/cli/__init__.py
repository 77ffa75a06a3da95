"""The command line: Typer commands, their options, the tables they print and the figures."""
