"""Markdown table of one `fast-ressl bench` JSON report (for RESULTS.md):

    .venv/bin/python benchmarks/render_results.py benchmarks/results/cpu_small.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fast_ressl, installed or not
from fast_ressl.bench import RESULT_COLUMNS, RESULT_JUSTIFY, result_cells  # noqa: E402


def render(report: dict) -> str:
    rows = ["| " + " | ".join(RESULT_COLUMNS) + " |",
            "|" + "|".join("---:" if j == "right" else "---" for j in RESULT_JUSTIFY) + "|"]
    ratios = report.get("ratios", {})
    for mode in report["settings"]["modes"]:
        for run in report["runs"]:
            res = run["results"].get(mode)
            if not res or not ("median" in res or "error" in res):
                continue
            rows.append("| " + " | ".join(result_cells(mode, run["variant"], res, ratios)) + " |")
    m = report["machine"]
    rows.append("")
    if report.get("complete") is False:  # a bench stopped (e.g. at a time limit) before its last run
        rows.append("Partial report: the bench was stopped before it finished; these are the runs it completed.")
    rows.append(f"Load average at start / end: {m.get('loadavg_start')} / {m.get('loadavg_end')}; "
                f"repeats: {report['settings']['repeats']} x {report['settings']['iters']} batches after "
                f"{report['settings']['warmup']} warm-up batches.")
    return "\n".join(rows)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(render(json.load(open(path))))
