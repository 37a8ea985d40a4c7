"""Benchmarks: fleetfetch side by side with curl, aria2c and a one-process-per-URL script."""
