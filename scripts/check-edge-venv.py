"""Fail when the edge-only venv holds a package the device must not need (it would hide an import of it)."""

from __future__ import annotations

import importlib.util
import sys

SERVER_ONLY = ("torch", "transformers", "optimum", "scipy")

found = [name for name in SERVER_ONLY if importlib.util.find_spec(name) is not None]
if found:
    sys.exit(f"edge venv {sys.prefix} has server-side packages installed: {', '.join(found)}")
print(f"edge venv {sys.prefix}: none of {', '.join(SERVER_ONLY)}")
