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
                f"repeats: {report['settings']['repeats']} x {_counts(report, 'window_batches', 'iters')} batches "
                f"after {_counts(report, 'warmup_batches', 'warmup')} warm-up batches.")
    return "\n".join(rows)


def _counts(report: dict, key: str, asked: str) -> str:
    """The batches the measurements used (a loader's warm-up takes at least its batches in flight,
    its windows whole rounds of its workers: bench.loader_cadence), or what was asked in reports
    written before they were recorded."""
    used = sorted({res[key] for run in report["runs"] for res in run["results"].values() if key in res})
    if not used:
        return str(report["settings"][asked])
    return str(used[0]) if len(used) == 1 else f"{used[0]}-{used[-1]} (by loader)"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(render(json.load(open(path))))
