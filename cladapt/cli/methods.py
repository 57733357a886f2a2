"""CLI commands (this module is filled as the feature lands)."""

from __future__ import annotations

import click

commands: list[click.Command] = []
