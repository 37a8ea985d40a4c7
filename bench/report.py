"""Render a benchmark JSON as the README's markdown table: `python -m bench.report bench/results/latest.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def markdown(data: dict) -> str:
    rows = data["rows"]
    out = [f"Machine: {data['machine']}; run {data['when']}.", "",
           "| workload | tool | seconds | files/s | MB/s | peak PSS MB (tool / workers) | vs best other tool |",
           "|---|---|---|---|---|---|---|"]
    for row in rows:
        others = [r for r in rows if r["workload"] == row["workload"] and not r["tool"].startswith("fleetfetch")]
        best = min((r["seconds"] for r in others if r["ok"]), default=None)
        ratio = f"{best / row['seconds']:.2f}x" if best and row["tool"].startswith("fleetfetch") else ""
        pss = f"{row['pss_mb']:.0f}" + (f" / {row['worker_pss_mb']:.0f}" if row["worker_pss_mb"] else "")
        status = "" if row["ok"] else " (FAILED verification)"
        out.append(f"| {row['workload']} | {row['tool']}{status} | {row['seconds']:.2f} | {row['files_per_s']:.0f} | "
                   f"{row['mb_per_s']:.1f} | {pss} | {ratio} |")
    e = data["enqueue"]
    out += ["", f"Enqueue: {e['urls']:,} URLs in {e['seconds']:.1f} s = {e['urls_per_s']:,.0f} URLs/s, producer peak "
            f"PSS {e['producer_pss_mb']:.0f} MB."]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
