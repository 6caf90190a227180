"""Markdown table of one `fast-ressl bench` JSON report (for RESULTS.md):

    python benchmarks/render_results.py benchmarks/results/cpu_small.json
"""
from __future__ import annotations

import json
import sys


def render(report: dict) -> str:
    rows = ["| mode | variant | images/s (median) | min-max | spread | vs reference | details |",
            "|---|---|---:|---:|---:|---:|---|"]
    ratios = report.get("ratios", {})
    for mode in report["settings"]["modes"]:
        for run in report["runs"]:
            res = run["results"].get(mode)
            if not res or "median" not in res:
                continue
            v = run["variant"]
            ratio = "1.00x" if v == "reference" else (f"{ratios[v][mode]:.2f}x" if mode in ratios.get(v, {}) else "-")
            det = []
            if "tflops" in res:
                det.append(f"{res['tflops'] * 1000:.1f} GFLOP/s achieved")
            if "data_wait_fraction" in res:
                det.append(f"data wait {100 * res['data_wait_fraction']['median']:.1f}%")
            if "peak_memory_mb" in res:
                det.append(f"max RSS {res['peak_memory_mb']:.0f} MB" if "RSS" in res.get("peak_memory_kind", "")
                           else f"peak {res['peak_memory_mb']:.0f} MB")
            if "loader" in res:
                det.append(f"loader {res['loader']}")
            rows.append(f"| {mode} | {v} | {res['median']:.1f} | {res['min']:.1f}-{res['max']:.1f} | "
                        f"{res['spread_pct']:.0f}% | {ratio} | {', '.join(det)} |")
    m = report["machine"]
    rows.append("")
    rows.append(f"Load average at start / end: {m.get('loadavg_start')} / {m.get('loadavg_end')}; "
                f"repeats: {report['settings']['repeats']} x {report['settings']['iters']} batches after "
                f"{report['settings']['warmup']} warm-up batches.")
    return "\n".join(rows)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(render(json.load(open(path))))
