"""Markdown for RESULTS.md's GPU section from one gpu_check run's output folder ($OUT of the device
call: gpu_check.json and the bench_<model>.json / tune_*.json beside it):

    .venv/bin/python benchmarks/render_gpu_check.py DIR >> benchmarks/RESULTS.md

Everything printed is read from those files (machine, versions, the exact command, every stage's
outcome, issue 11's targets, each model's bound, the bench tables); nothing is typed in by hand.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List

# its siblings, and fast_ressl from this checkout where it is not installed (the GPU machine's Python)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import gpu_check  # noqa: E402
import render_results  # noqa: E402


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(cell(c) for c in r) + " |" for r in rows)]


def render(out: Path) -> str:
    rep: Dict[str, Any] = json.loads((out / "gpu_check.json").read_text())
    m, v = rep.get("machine", {}), rep.get("machine", {}).get("versions", {})
    smi = m.get("nvidia_smi")
    smi = "; ".join(smi) if isinstance(smi, list) else str(smi)
    shm = m.get("dev_shm_mb") or {}
    shm = f"{shm.get('free')} of {shm.get('total')} MiB free" if shm else "unknown"
    lines = [f"## GPU: {v.get('gpu') or 'no GPU'} ({rep.get('created', '?')[:10]})", "",
             f"Machine: {smi} (nvidia-smi: name, driver, memory); {m.get('cpu_count')} CPU cores, "
             f"/dev/shm {shm}, memory {m.get('mem_total_mb')} MiB. Python {v.get('python')}, "
             f"torch {v.get('torch')} (CUDA {v.get('cuda')}), torchvision {v.get('torchvision')}, "
             f"DALI {v.get('nvidia.dali')}, timm {v.get('timm')}.", "",
             f"Command: `{shlex.join(rep.get('command', []))}` ({rep.get('wall_s')} s; settings: batch "
             f"{rep.get('settings', {}).get('batch')}, {rep.get('settings', {}).get('size')} px, "
             f"{rep.get('settings', {}).get('precision')}, data.num_threads {rep.get('threads')}).", "",
             "### Stages", ""]
    lines += _table(["stage", "status", "seconds", "result"],
                    [[n, r.get("status", "?"), r.get("seconds", "-"), gpu_check.stage_result(n, r)]
                     for n, r in rep.get("stages", {}).items()])
    # targets and bounds from the bench reports in the folder, as gpu_check names them now: a
    # report a later call on the same machine added (a stage this call ran out of time for) counts
    models = [m for m in str(rep.get("settings", {}).get("models", "")).split(",") if m]
    by_model = {m: json.loads((out / f"bench_{m}.json").read_text()) for m in models
                if (out / f"bench_{m}.json").exists()}
    found = gpu_check.bounds(by_model, models)
    found_targets = gpu_check.targets(by_model, models, found)
    later = [f"`{p.name}`" for p in sorted(out.glob("*.json")) if p.stem != "gpu_check"
             and rep.get("stages", {}).get(p.stem, {}).get("status") not in ("ok", "timeout", "failed", "killed")]
    if later:
        lines += ["", f"From later calls on the same machine (their commands are in their reports or the "
                      f"folder's README): {', '.join(later)}."]
    resume = out / "resume.json"
    if resume.exists() and rep.get("stages", {}).get("resume", {}).get("status") != "ok":
        lines += ["", f"resume (`resume.json`): {gpu_check.stage_result('resume', {'status': 'ok', 'result': json.loads(resume.read_text())})}"]
    if found_targets:
        lines += ["", "### Issue 11's targets (measured, not asserted)", ""]
        lines += _table(["model", "target", "measured", "met"],
                        [[t["model"], t["target"], t["shown"], {True: "yes", False: "no", None: "not measured"}[t["met"]]]
                         for t in found_targets])
    if found:
        lines += ["", "### What limits each model end to end (fast path)", ""]
        lines += _table(["model", "bound", "e2e / min(step, loader)", "evidence"],
                        [[b["model"], b["bound"] + (f" ({', '.join(b['shared'])})" if b.get("shared") else ""),
                          b.get("e2e_vs_min_alone", "-"), b["evidence"]]
                         for b in found])
    for path in sorted(out.glob("bench_*.json")) + sorted(out.glob("tune_*.json")):
        lines += ["", f"### {path.stem} (`{path.name}`)", "", render_results.render(json.loads(path.read_text()))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: render_gpu_check.py DIR (the folder holding gpu_check.json)")
    print(render(Path(sys.argv[1])), end="")
