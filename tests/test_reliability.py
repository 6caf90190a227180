"""Reliability promises (shared/design/reliability.md) tested with real faults: kill -9, SIGTERM,
2 ranks over gloo, injected NaN, truncated and malicious checkpoints, secrets in the environment."""
import atexit
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import free_port, make_jpeg_folder, torchrun
from fast_ressl.checkpoint import CheckpointError, safe_load
from fast_ressl.config import load_config
from fast_ressl.train import NonFiniteAbort, train

REPO = Path(__file__).resolve().parents[1]
# The subprocess runs use an empty recipe: the defaults plus the overrides below, nothing else.
RECIPE = Path(tempfile.mkdtemp(prefix="fast_ressl_rel_")) / "tiny.yaml"
# removed when this process exits (only by the process that made it, not a forked child)
atexit.register(lambda d=RECIPE.parent, pid=os.getpid(): os.getpid() == pid and shutil.rmtree(d, True))
RECIPE.write_text("{}\n")
MODEL = ["model.backbone=test_resnet", "model.proj_hidden_dim=32", "model.proj_dim=16",
         "method.compile_loss=false", "train.log_every=1", "optim.warmup_epochs=0.5"]
SYNTH = ["data.source=synthetic", "data.num_samples=32", "data.weak={size: 32}", "data.strong=[{size: 32}]",
         "method.queue_size=64", "train.batch_size=8", "train.epochs=2", *MODEL]


def _folder_overrides(root):
    # 3 classes x 16 images, global batch 8: 6 steps per epoch, 2 epochs.
    return ["data.source=folder", f"data.root={root}", "data.weak={size: 32}", "data.strong=[{size: 32}]",
            "data.num_threads=1", "method.queue_size=64", "train.batch_size=8", "train.epochs=2",
            "train.precision=fp32", "train.deterministic=true", "train.ckpt_every=2", *MODEL]


def _cmd(*overrides):
    return [sys.executable, "-m", "fast_ressl", "train", str(RECIPE), *overrides]


def _torchrun(nproc, *overrides):
    return torchrun(nproc, "train", str(RECIPE), *overrides)


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           # what the runs put in the temporary folder goes with RECIPE's folder at exit: the files of
           # a killed run (DALI's autograph modules, torchrun's rendezvous folders) would stay in /tmp
           "TMPDIR": str(RECIPE.parent), **extra}
    env.pop("FAST_RESSL_FAULT_NAN", None)
    env.update(extra)
    return env


def _run(cmd, timeout=300, **env):
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env(**env))
    return out


def _metrics(run):
    """Last record per step (a killed run re-runs the steps after its last checkpoint)."""
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def _wait_for_step(run, proc, step, timeout=240):
    t0 = time.time()
    path = run / "metrics.jsonl"
    while time.time() - t0 < timeout:
        if path.exists():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        assert proc.poll() is None, f"run ended early: {proc.stderr.read() if proc.stderr else ''}"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _assert_same_state(a, b):
    for key in ("student", "teacher"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name}"
    assert torch.equal(a["queue"]["buffer"], b["queue"]["buffer"])
    assert int(a["queue"]["ptr"]) == int(b["queue"]["ptr"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel") / "images"
    make_jpeg_folder(root)
    return root


# the DALI loader (the default) and the torch reference loader with 2 forked DataLoader workers
LOADERS = {"dali": [], "torch": ["data.loader=torch", "data.num_threads=2"]}


@pytest.fixture(scope="module")
def baselines(folder, tmp_path_factory):
    """loader -> the run dir of an uninterrupted run with it, made on first use."""
    runs = {}

    def get(loader):
        if loader not in runs:
            run = tmp_path_factory.mktemp("rel") / f"a_{loader}"
            out = _run(_cmd(*_folder_overrides(folder), *LOADERS[loader], f"run.dir={run}"))
            assert out.returncode == 0, out.stderr[-3000:]
            runs[loader] = run
        return runs[loader]
    return get


@pytest.mark.parametrize("loader", list(LOADERS))
def test_kill9_then_same_command_is_bitwise_exact(folder, baselines, tmp_path, loader):
    """The same command again the moment the killed process is reaped, as torchrun --max-restarts
    does. With the torch loader, the workers the killed run left (alive up to 5 s) once kept the
    run's lock and the relaunch failed as 'in use' (test_faults tests the lock itself)."""
    uninterrupted = baselines(loader)
    run = tmp_path / "b"
    cmd = _cmd(*_folder_overrides(folder), *LOADERS[loader], f"run.dir={run}")
    kill_at = random.Random().randint(3, 10)  # a random step; printed on failure
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env())
    reached = _wait_for_step(run, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    out = _run(cmd)  # the same command again
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout, (kill_at, reached, out.stdout)
    la, lb = _metrics(uninterrupted), _metrics(run)
    assert [r["step"] for r in lb] == list(range(1, 13))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb], f"killed at step {reached}"
    _assert_same_state(safe_load(uninterrupted / "checkpoints/last.pt"), safe_load(run / "checkpoints/last.pt"))


@pytest.mark.parametrize("loader,to,sig", [("dali", "process", signal.SIGTERM), ("torch", "group", signal.SIGTERM),
                                            ("torch", "group", signal.SIGUSR1), ("dali", "piped", signal.SIGTERM)])
def test_sigterm_checkpoints_exits_143_and_resumes_at_next_step(folder, baselines, tmp_path, loader, to, sig):
    """SIGTERM to the trainer alone (tini, `docker stop`), or to its whole process group (torchrun's
    os.killpg on preemption, a batch scheduler), which reaches the torch loader's DataLoader workers
    too: they used to die of it and torch raised "DataLoader worker (pid N) is killed by signal:
    Terminated" in the trainer (exit 1, no checkpoint); now they leave the signal to the trainer.
    SIGUSR1 (Slurm's usual requeue warning) alike, exit 138: it used to end the run with no
    checkpoint (found in review). "piped": `train ... 2>&1 | tee log` signalled as a group, where
    tee dies too: its pipe is closed before the signal, and the trainer's next line used to raise
    BrokenPipeError on the way to the step boundary (exit 1, no checkpoint, no summary)."""
    run = tmp_path / "t"
    cmd = _cmd(*_folder_overrides(folder), *LOADERS[loader], f"run.dir={run}", "train.ckpt_every=100")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=to != "process")  # its own group, as under torchrun
    _wait_for_step(run, proc, 3)
    t0 = time.time()
    if to == "piped":  # the reader goes first (tee is in the signalled group), then the signal
        proc.stdout.close()
        proc.stderr.close()
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
        stdout, stderr = None, ""
    elif to == "group":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    if to != "piped":
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    stopped = safe_load(run / "checkpoints/last.pt")["step"]
    assert 3 <= stopped < 12 and (stdout is None or f"stopped at step {stopped}" in stdout)
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"
    print(f"SIGTERM to exit: {time.time() - t0:.1f} s")
    out = _run(cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"at step {stopped}" in out.stdout
    lb = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lb]
    assert steps == list(range(1, 13))  # stopped at a step boundary: nothing lost, nothing repeated
    assert [r["loss"] for r in lb] == [r["loss"] for r in _metrics(baselines(loader))]


def _two_rank_run(run, *extra, fault=None, timeout=400):
    env = {"FAST_RESSL_FAULT_NAN": fault} if fault else {}
    out = _run(_torchrun(2, *SYNTH, f"run.dir={run}", *extra), timeout=timeout, **env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def test_two_ranks_identical_queue_and_student_and_nan_guard(tmp_path):
    """2 ranks over gloo, shuffle-BN: identical per-rank fingerprints at every checkpoint; a NaN on
    rank 1 at step 3 leaves student, teacher, queue and optimizer unchanged on all ranks."""
    run = tmp_path / "ddp"
    out = _two_rank_run(run, "train.ckpt_every=1", "train.keep_checkpoints=10", fault="3:1")
    assert "x 2 rank(s)" in out.stdout and "teacher BN shuffle" in out.stdout
    assert "global batch 8 (4 per rank)" in out.stdout and "lr 0.001563" in out.stdout
    # torch 2.14 deprecates DDP's broadcast_buffers and all_gather_into_tensor: each warned on every
    # rank of every multi-rank run until fast_ressl used the new names where torch has them
    assert not [line for line in (out.stdout + out.stderr).splitlines() if "Warning:" in line], out.stderr[-3000:]
    ckpts = {s: safe_load(run / f"checkpoints/step_{s:08d}.pt") for s in (2, 3, 4, 8)}
    for sd in ckpts.values():
        fps = [r["fingerprint"] for r in sd["ranks"]]
        assert len(fps) == 2 and fps[0] == fps[1]
    _assert_same_state(ckpts[2], ckpts[3])  # the NaN step changed nothing ...
    for i, st in ckpts[2]["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], ckpts[3]["optimizer"]["state"][i]["momentum_buffer"])
    assert not torch.equal(ckpts[3]["queue"]["buffer"], ckpts[4]["queue"]["buffer"])  # ... then it goes on
    assert int(ckpts[4]["queue"]["ptr"]) == (3 * 8) % 64  # 3 pushes of the global batch of 8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in metrics] == [0, 0, 1, 1, 1, 1, 1, 1]


def test_one_rank_in_a_process_group_runs_the_multi_rank_path_like_a_plain_run(tmp_path):
    """FAST_RESSL_DDP_ONE_RANK=1 under torchrun: one rank makes the process group and takes the
    multi-rank path (DDP, shuffle-BN through all_gather, the collectives of the NaN guard and the
    checkpoint), which is how a one-GPU machine runs it with NCCL. With one rank every collective
    is a copy, so with the plain run's teacher BN also shuffle the losses are bit for bit the plain
    run's. (With the plain run's default, local BN, they drift apart: the shuffled batch changes
    only the order BN sums in, ~1e-7, but the sharpened target, T=0.04, amplifies that to ~1e-3
    within 6 steps on JPEGs.)"""
    over = [*SYNTH, "train.precision=fp32", "train.deterministic=true", "model.teacher_bn=shuffle"]
    plain = _run(_cmd(*over, f"run.dir={tmp_path / 'a'}"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "x 1 rank(s), fp32" in plain.stdout and "teacher BN shuffle" in plain.stdout
    out = _run(_torchrun(1, *over, f"run.dir={tmp_path / 'b'}"), FAST_RESSL_DDP_ONE_RANK="1")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "x 1 rank(s) (gloo, DDP), fp32" in out.stdout
    a, b = ([r["loss"] for r in _metrics(tmp_path / run)] for run in ("a", "b"))
    assert len(a) == 8 and a == b, (a, b)
    sd = safe_load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert sd["world_size"] == 1 and int(sd["step"]) == 8 and not any(k.startswith("module.") for k in sd["student"])
    _assert_same_state(safe_load(tmp_path / "a" / "checkpoints" / "last.pt"), sd)


@pytest.mark.parametrize("fused", ["true", "false"])
def test_nan_guard_in_process(tmp_path, monkeypatch, fused):
    monkeypatch.setenv("FAST_RESSL_FAULT_NAN", "2:0")
    cfg = load_config(None, SYNTH + [f"run.dir={tmp_path}", f"optim.fused={fused}", "train.ckpt_every=1",
                                     "train.keep_checkpoints=10", "train.stop_at_step=3"])
    summary = train(cfg, live=False)
    assert summary["skipped_steps"] == 1
    _assert_same_state(safe_load(tmp_path / "checkpoints/step_00000001.pt"),
                       safe_load(tmp_path / "checkpoints/step_00000002.pt"))


def test_nonfinite_streak_stops_the_run_naming_step_and_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("FAST_RESSL_FAULT_NAN", "2:0,3:0,4:0")
    cfg = load_config(None, SYNTH + [f"run.dir={tmp_path}", "train.max_nonfinite_steps=3"])
    with pytest.raises(NonFiniteAbort, match=r"3 non-finite losses in a row by step 4 .*rank\(s\) \[0\]"):
        train(cfg, live=False)


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    base = SYNTH + [f"run.dir={tmp_path}", "train.ckpt_every=2", "train.keep_checkpoints=2"]
    train(load_config(None, base + ["train.stop_at_step=6"]), live=False)
    numbered = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt"))
    assert numbered == ["step_00000004.pt", "step_00000006.pt"]  # keep the newest N
    last = tmp_path / "checkpoints/last.pt"
    data = last.read_bytes()
    with open(last, "r+b") as f:  # truncate in place (last.pt and step_6 share the bytes)
        f.truncate(len(data) // 3)
    capsys.readouterr()
    summary = train(load_config(None, base + ["train.stop_at_step=5"]), live=False)
    out = capsys.readouterr().out
    assert "skipping unusable checkpoint" in out and "last.pt" in out
    assert "resumed from" in out and "step_00000004.pt at step 4" in out
    # the unusable step 6 is set aside: it no longer holds one of the 2 places while the good
    # step 4 is deleted beside the new step 5 (it did until the run reached step 6 again)
    ckpts = tmp_path / "checkpoints"
    assert "set aside 1 unusable checkpoint(s)" in out and "step_00000006.pt.unusable" in out
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000004.pt", "step_00000005.pt"]
    assert (ckpts / "step_00000006.pt.unusable").stat().st_size == len(data) // 3
    assert (ckpts / "last.pt").stat().st_ino == (ckpts / "step_00000005.pt").stat().st_ino
    summary = train(load_config(None, base), live=False)
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 5" in out and "unusable" not in out
    assert summary["step"] == 8


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickle_payload_is_refused(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    ckpt_dir = tmp_path / "run/checkpoints"
    ckpt_dir.mkdir(parents=True)
    evil = ckpt_dir / "last.pt"
    with open(evil, "wb") as f:
        pickle.dump({"step": 1, "student": _Payload(marker)}, f)
    torch.save({"x": _Payload(marker)}, ckpt_dir / "step_00000001.pt")
    for path in (evil, ckpt_dir / "step_00000001.pt"):
        with pytest.raises(CheckpointError), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            safe_load(path)
        assert not seen, [str(w.message) for w in seen]  # the refusal is the one message (torch warned first)
    summary = train(load_config(None, SYNTH + [f"run.dir={tmp_path / 'run'}", "train.stop_at_step=1"]),
                    live=False)
    assert "skipping unusable checkpoint" in capsys.readouterr().out
    assert summary["step"] == 1  # started fresh instead of running the payload
    assert not marker.exists()


def test_secrets_never_reach_files_or_logs(tmp_path):
    token = "tok-9f8e7d6c5b4a"
    run = tmp_path / "s"
    out = _run(_cmd(*SYNTH, f"run.dir={run}", "train.stop_at_step=2",
                    f"data.root=https://bob:hunter2pass@data.invalid/{token}/train"),
               MY_SERVICE_API_TOKEN=token)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    for path in run.rglob("*"):
        if path.is_file():
            text += path.read_bytes().decode("latin-1")
    assert "hunter2pass" not in text and token not in text
    assert "https://bob:***@data.invalid/***/train" in (run / "config.yaml").read_text()


def test_a_secret_in_a_data_path_is_masked_in_output_and_kept_where_a_resume_needs_it(tmp_path):
    """A data root under a directory named with a token, and a bad file in it: every line the run
    prints (the scan's names the root) and config.yaml, summary.json and the checkpoint's config and
    data identity show `***` (the printed paths and the checkpoint's data identity showed the token);
    the checkpoint's bad-file list keeps the real path, which a resume must find again."""
    token = "tok-5e4d3c2b1a09"
    real = tmp_path / "images"
    make_jpeg_folder(real)
    (real / "class_0" / "zz_bad.JPEG").write_bytes(b"not a jpeg")
    root = tmp_path / f"by_{token}"
    root.symlink_to(real)
    run = tmp_path / "r"
    out = _run(_cmd(*_folder_overrides(root), f"run.dir={run}", "train.stop_at_step=2", "data.max_bad_fraction=0.1"),
               MY_SERVICE_API_TOKEN=token)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    assert "by_***" in printed and token not in printed, printed[-3000:]  # the scan's line names the root
    assert token not in (run / "config.yaml").read_text() + (run / "summary.json").read_text()
    sd = safe_load(run / "checkpoints/last.pt")
    assert token not in json.dumps(sd["config"]) + json.dumps(sd["data"])
    assert sd["bad_files"] == [str(root / "class_0" / "zz_bad.JPEG")]


def test_stop_signals_set_the_flag_and_nohup_keeps_sighup_ignored():
    """Every stop signal (dist.STOP_SIGNALS) sets the trainer's flag while it runs and gets its old
    disposition back after; a SIGHUP ignored by the launcher (nohup) stays ignored."""
    from fast_ressl import dist
    from fast_ressl.train import _SignalFlag

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _SignalFlag() as flag:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGUSR1)
            assert flag.signum == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with _SignalFlag() as flag:
            os.kill(os.getpid(), signal.SIGHUP)
            assert flag.signum == signal.SIGHUP
        assert set(dist.STOP_SIGNALS) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
    finally:
        signal.signal(signal.SIGHUP, old)


def _agree_on_rank(rank: int, port: int, root: str, out_dir: str) -> None:
    """One of 2 gloo ranks: agree_on_checkpoint over what each rank 'found', in three cases."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from fast_ressl import dist
    from fast_ressl.checkpoint import CheckpointDir, CheckpointError
    from fast_ressl.train import agree_on_checkpoint

    env = dist.init("cpu", timeout_s=120)
    ckpts = CheckpointDir(Path(root))
    sd4, sd2 = safe_load(ckpts.root / "step_00000004.pt"), safe_load(ckpts.root / "step_00000002.pt")
    results = []
    try:
        # rank 1 saw the older checkpoint (a stale last.pt on its node): it takes rank 0's step 4
        sd, path = agree_on_checkpoint(ckpts, *((sd4, ckpts.last) if rank == 0 else (sd2, ckpts.root / "x")), env)
        results.append((int(sd["step"]), path.name))
        for found in ((None, None) if rank == 0 else (sd4, ckpts.last),  # rank 0 saw none
                      ({**sd4, "step": 6}, ckpts.last) if rank == 0 else (sd4, ckpts.last)):  # no step_6 file
            try:
                agree_on_checkpoint(ckpts, *found, env)
                results.append("resumed")
            except CheckpointError as e:
                results.append(str(e))
    finally:
        dist.shutdown()
    torch.save(results, os.path.join(out_dir, f"agree{rank}.pt"))


def test_ranks_resume_from_the_checkpoint_rank_0_found(tmp_path):
    """Each rank looks for the newest valid checkpoint itself; on a shared filesystem one node can
    still see last.pt as the file before (NFS attribute caching) or fail to read it, and ranks on
    different steps run different schedules with misaligned collectives (found in review). Now a
    rank that found another step loads rank 0's by its numbered file; if any rank cannot, every
    rank raises, naming what each found. (2 gloo ranks; what each rank found is given to it.)"""
    from fast_ressl.checkpoint import CheckpointDir, REQUIRED_KEYS

    ckpts = CheckpointDir(tmp_path / "ckpt")
    ckpts.root.mkdir()
    for step in (2, 4):
        ckpts.save({**{k: 0 for k in REQUIRED_KEYS}, "step": step}, step)
    port = free_port()
    torch.multiprocessing.spawn(_agree_on_rank, args=(port, str(ckpts.root), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"agree{r}.pt") for r in range(2))
    assert r0[0] == (4, "last.pt") and r1[0] == (4, "step_00000004.pt")
    for res in (r0, r1):
        assert "rank 0: none, rank 1: step 4" in res[1] and "rank 0 found no checkpoint" in res[1]
        assert "rank 0: step 6, rank 1: step 4" in res[2] and "cannot load rank 0's step_00000006.pt" in res[2]


_LATE_RANK = """
import dataclasses, datetime, json, sys, time
import torch.distributed
from fast_ressl import dist
env = dist.init("cpu", timeout_s=120.0)
# the collectives' timeout (train.dist_timeout_s), here 3 s, on a group made while both are present
env = dataclasses.replace(env, ctrl_group=torch.distributed.new_group(backend="gloo",
                                                                      timeout=datetime.timedelta(seconds=3)))
if env.rank == 1:
    time.sleep(8)  # a node scanning its own denylist
t0 = time.time()
dist.wait_for_all(env, 120)
waited = time.time() - t0
gathered = dist.gather_objects(env.rank, env)
with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:
    json.dump({"waited": waited, "gathered": gathered}, f)
dist.shutdown()
"""


def test_ranks_wait_for_a_late_ranks_data_beyond_the_collective_timeout(tmp_path):
    """Each node's first rank scans its own missing denylist (datasets.first_on_machine): a node
    that has one is ready at once, and its first collective (the resume's gather) timed out after
    train.dist_timeout_s while another node still scanned. train waits for all ranks after the data
    set-up with the preparation's own timeout (here 8 s late against a 3 s collective timeout; a
    plain barrier there failed)."""
    script = tmp_path / "late.py"
    script.write_text(_LATE_RANK)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=240, env=_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert res[0]["waited"] > 5, res  # rank 0 waited past the 3 s
    assert [r["gathered"] for r in res] == [[0, 1]] * 2, res  # then a collective under the 3 s timeout works
