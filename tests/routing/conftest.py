"""Fixtures for the router tests (synthetic helpers live in ``router_helpers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).parent))  # router_helpers; appended so `conftest` stays tests/conftest.py
