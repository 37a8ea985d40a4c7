"""The version of fleetfetch, as installed (pyproject.toml), for `--version` and the User-Agent."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("fleetfetch")
except PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "0.1.0"
