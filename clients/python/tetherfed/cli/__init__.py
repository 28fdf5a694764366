"""The `tetherfed` command: argparse only, the top of the package graph."""

from ._main import build_parser, main

__all__ = ["build_parser", "main"]
