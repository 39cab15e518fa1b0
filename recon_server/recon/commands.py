"""Subcommands of this area (registered into ``recon-server``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the ``recon-server`` parser."""
