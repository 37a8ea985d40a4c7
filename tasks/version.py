"""The version of fleetfetch, as installed (pyproject.toml), for `--version` and the User-Agent (read from the
packages' metadata: the command line shows it without importing requests)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("fleetfetch")
except PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0.1.0"

USER_AGENT = f"fleetfetch/{VERSION} python-requests/{version('requests')}"
