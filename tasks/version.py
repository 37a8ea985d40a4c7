"""The version of fleetfetch, as installed (pyproject.toml), for `--version` and the User-Agent (read from the
packages' metadata: the command line shows it without importing requests).

Read when first asked for (`version.VERSION`, `from .version import USER_AGENT`): importlib.metadata and the
look-up cost ~30 ms, which a local job would pay before it can start its server and workers."""

from __future__ import annotations

from functools import cache


@cache
def _version(package: str, fallback: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:  # run from a checkout that was never installed
        return fallback


def __getattr__(name: str) -> str:
    if name == "VERSION":
        return _version("fleetfetch", "0.1.0")
    if name == "USER_AGENT":
        return f"fleetfetch/{__getattr__('VERSION')} python-requests/{_version('requests', '?')}"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
