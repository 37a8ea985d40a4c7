"""Render a benchmark JSON as the README's markdown table: `python -m bench.report bench/results/latest.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _cell(row: dict, rows: list[dict]) -> str:
    others = [r for r in rows if r["workload"] == row["workload"] and not r["tool"].startswith("fleetfetch")]
    best = min((r["seconds"] for r in others if r["ok"]), default=None)
    ratio = f"{best / row['seconds']:.2f}x" if best and row["tool"].startswith("fleetfetch") else ""
    pss = f"{row['pss_mb']:.0f}" + (f" / {row['worker_pss_mb']:.0f}" if row["worker_pss_mb"] else "")
    status = " (FAILED verification)" if not row["ok"] else ""
    cpu = f"{row['cpu_ms_per_url']:.1f}" if "cpu_ms_per_url" in row else ""
    cmds = f"{row['redis_cmds_per_url']:.1f}" if row.get("redis_cmds_per_url") is not None else ""
    return (f"| {row['workload']} | {row['tool']}{status} | {row.get('settings', '')} | {row['seconds']:.2f} | "
            f"{row['files_per_s']:.0f} | {row['mb_per_s']:.1f} | {pss} | {cpu} | {cmds} | {ratio} |")


def markdown(data: dict) -> str:
    rows = data["rows"]
    out = [f"Machine: {data['machine']}; run {data['when']}; median of {data.get('repeats', 3)} run(s).", "",
           "| workload | tool | settings | seconds | files/s | MB/s | peak PSS MB (tool / workers) | CPU ms/URL | "
           "Redis cmds/URL | vs best other tool |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    out += [_cell(row, rows) for row in rows]
    e = data["enqueue"]
    out += ["", f"Enqueue: {e['urls']:,} URLs in {e['seconds']:.1f} s = {e['urls_per_s']:,.0f} URLs/s, producer peak "
            f"PSS {e['producer_pss_mb']:.0f} MB."]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
