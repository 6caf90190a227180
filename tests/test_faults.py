"""Reliability under real faults (issue 13): copied datasets, a second process on the run dir,
refused resumes, orphaned temporary checkpoints, user errors as one line with exit code 2."""
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import add_bad_files, free_port, make_jpeg_folder, torchrun

REPO = Path(__file__).resolve().parents[1]
RECIPE = Path(tempfile.mkdtemp(prefix="fast_ressl_faults_")) / "empty.yaml"
# removed when this process exits (only by the process that made it, not a forked child)
atexit.register(lambda d=RECIPE.parent, pid=os.getpid(): os.getpid() == pid and shutil.rmtree(d, True))
RECIPE.write_text("{}\n")
TINY = ["model.backbone=test_resnet", "model.proj_hidden_dim=32", "model.proj_dim=16", "method.compile_loss=false",
        "data.weak={size: 32}", "data.strong=[{size: 32}]", "method.queue_size=64", "train.batch_size=8",
        "train.precision=fp32", "data.num_threads=1", "train.log_every=1", "eval.knn_every_epochs=0"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           # what the runs put in the temporary folder goes with RECIPE's folder at exit: the files of
           # a killed run (DALI's autograph modules, torchrun's rendezvous folders) would stay in /tmp
           "TMPDIR": str(RECIPE.parent)}
    env.pop("FAST_RESSL_FAULT_NAN", None)
    return env


def _train(*over, timeout=300):
    return subprocess.run([sys.executable, "-m", "fast_ressl", "train", str(RECIPE), *TINY, *over], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=_env())


def _one_line_error(out):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]  # (progress lines may precede)
    return errors[0]


# ----------------------------------------------------------------------------- 2. copied dataset
def test_a_copied_dataset_keeps_its_denylist(tmp_path):
    """`cp -r` to local disk carries the denylist; its entries resolve against the copy, so the
    known-bad files stay out of training (before: decoded, the run died at step 5, every relaunch)."""
    src = tmp_path / "src"
    make_jpeg_folder(src)
    bad = add_bad_files(src / "class_1")
    out = subprocess.run([sys.executable, "-m", "fast_ressl", "scan", str(src)], cwd=REPO, capture_output=True,
                         text=True, env=_env())
    assert out.returncode == 0, out.stderr
    dst = tmp_path / "local"
    shutil.copytree(src, dst)
    shutil.rmtree(src)  # the old root is gone: nothing may resolve against it
    run = tmp_path / "run"
    out = _train("data.source=folder", f"data.root={dst}", "train.epochs=1", "data.max_bad_fraction=0.3",
                 f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no denylist" not in out.stderr  # the copied denylist was used, not rescanned
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(Path(p).name for p in summary["bad_files"]) == sorted(Path(p).name for p in bad.values())
    assert all(str(dst) in p for p in summary["bad_files"])


def test_a_corrupt_denylist_is_one_line_naming_it(tmp_path):
    root = tmp_path / "images"
    make_jpeg_folder(root)
    (root / ".fast_ressl_denylist.json").write_text("{not json")
    line = _one_line_error(_train("data.source=folder", f"data.root={root}", f"run.dir={tmp_path / 'run'}"))
    assert str(root / ".fast_ressl_denylist.json") in line and "delete it" in line


SYNTH = ["data.source=synthetic", "data.num_samples=32"]


def _metrics_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def _wait_for_metrics(run, proc, n, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError("no progress")


# ----------------------------------------------------------------------------- 4. one writer
def test_a_second_process_on_the_run_dir_is_refused(tmp_path):
    """Two processes on one run dir used to both run to the end, interleaving checkpoints and
    writing every metrics row twice. The second is refused (exit 2, naming the holder); the first
    finishes alone; after a kill -9 of the holder the relaunch is not blocked by a stale lock."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fast_ressl", "train", str(RECIPE), *TINY, *SYNTH, "train.epochs=100",
           "train.ckpt_every=10", f"run.dir={run}"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_metrics(run, first, 2)
    line = _one_line_error(subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300))
    assert f"pid {first.pid}" in line and str(run) in line
    assert first.poll() is None, "the first run must still be going, or the test proves nothing"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    before = _metrics_steps(run)
    assert before == list(range(1, len(before) + 1))  # one writer: no row twice
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout  # the killed holder's lock did not block the relaunch
    after = _metrics_steps(run)[len(before):]
    assert after == list(range(after[0], 401)) and after[0] <= len(before) + 1


def test_dataloader_workers_outliving_a_killed_holder_do_not_keep_the_lock(tmp_path):
    """A flock is shared with forked children, and torch's DataLoader workers outlive a kill -9 of
    their parent by up to 5 s (their watchdog's interval): an immediate relaunch (torchrun
    --max-restarts, a scheduler) of a `data.loader=torch` run was refused as "in use" by the dead run.
    Here a real holder with real workers is killed and the lock taken while its workers still live."""
    from fast_ressl.checkpoint import RunLock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, torch; from pathlib import Path; from fast_ressl.checkpoint import RunLock\n"
        f"lock = RunLock(Path(r'{run}'))\n"
        "it = iter(torch.utils.data.DataLoader(range(10**6), num_workers=2, persistent_workers=True))\n"
        "next(it)\n"
        "print(*[w.pid for w in it._workers], flush=True)\n"
        "time.sleep(600)\n")], cwd=REPO, stdout=subprocess.PIPE, text=True, env=_env())
    workers = [int(p) for p in holder.stdout.readline().split()]
    assert len(workers) == 2, workers
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    try:
        alive = []
        for pid in workers:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        assert alive, "the workers were gone already: the test proves nothing"
        RunLock(run).release()  # was RunDirBusy: "... in use by another fast-ressl process (pid N ...)"
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- 5. refused resume
def test_a_refused_resume_leaves_config_yaml_alone(tmp_path):
    run = tmp_path / "run"
    assert _train(*SYNTH, "train.epochs=1", f"run.dir={run}").returncode == 0
    before = (run / "config.yaml").read_text()
    out = _train(*SYNTH, "train.epochs=1", "method.tau_t=0.05", f"run.dir={run}")
    assert out.returncode == 2 and "method.tau_t" in out.stderr
    assert (run / "config.yaml").read_text() == before


# ----------------------------------------------------------------------------- 6. orphans
def test_temporary_checkpoints_of_a_killed_writer_are_removed(tmp_path):
    """kill -9 inside torch.save leaves a checkpoint-sized temporary file; the next start removes it."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import torch, sys; from fast_ressl.checkpoint import atomic_save; "
        f"atomic_save({{'x': torch.zeros(400_000_000, dtype=torch.uint8)}}, r'{ckpts}/step_00000004.pt')")],
        cwd=REPO, env=_env())
    t0 = time.time()
    while not list(ckpts.glob(".step_*.tmp")):
        assert writer.poll() is None and time.time() - t0 < 120, "the writer ended before it could be killed"
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    orphans = list(ckpts.glob(".step_*.tmp"))
    assert orphans and not (ckpts / "step_00000004.pt").exists()
    out = _train(*SYNTH, "train.epochs=1", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "removed 1 temporary checkpoint file(s)" in out.stdout
    assert not list(ckpts.glob(".*.tmp"))


# ----------------------------------------------------------------------------- 9. other rank count
def test_a_run_continues_on_another_number_of_ranks(tmp_path):
    run = tmp_path / "run"
    port = free_port()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "fast_ressl", "train",
                          str(RECIPE), *TINY, *SYNTH, "train.epochs=2", "train.stop_at_step=3", f"run.dir={run}"],
                         cwd=REPO, capture_output=True, text=True, env=_env(), timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    line = _one_line_error(_train(*SYNTH, "train.epochs=2", f"run.dir={run}"))
    assert "2 rank(s)" in line and "--allow-config-change" in line
    out = subprocess.run([sys.executable, "-m", "fast_ressl", "train", str(RECIPE), *TINY, *SYNTH, "train.epochs=2",
                          f"run.dir={run}", "--allow-config-change"], cwd=REPO, capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fresh data order" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 8 and summary["world_size"] == 1
    assert _metrics_steps(run) == list(range(1, 9))


# ----------------------------------------------------------------------------- 7. wds-index
def test_wds_index_leaves_out_members_with_spaces_and_dali_reads_it(tmp_path):
    """A member name with a space used to produce an index DALI rejects, with 'success' reported."""
    import io
    import tarfile

    import numpy as np
    import torch
    from PIL import Image

    pytest.importorskip("nvidia.dali")
    from fast_ressl.config import load_config
    from pipelines_dali.loader import DaliTrainLoader

    shards = tmp_path / "wds"
    shards.mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(shards / "shard-000.tar", "w") as tf:
        for i in range(17):
            key = "with space" if i == 5 else f"{i:06d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out = subprocess.run([sys.executable, "-m", "fast_ressl", "wds-index", str(shards)], cwd=REPO,
                         capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr
    assert "1 bad samples left out" in out.stdout
    deny = json.loads((shards / ".fast_ressl_wds_denylist.json").read_text())
    assert "whitespace" in deny["bad"]["shard-000.tar:with space"]
    cfg = load_config(None, ["data.source=webdataset", f"data.root={shards}", "data.weak={size: 32}",
                             "data.strong=[{size: 32}]", "train.batch_size=8", "method.queue_size=64",
                             "data.num_threads=1", "data.shuffle_buffer=4", "data.max_bad_fraction=0.1"])
    loader = DaliTrainLoader(cfg, 0, 1, torch.device("cpu"), progress=False)
    assert loader.num_samples == 16
    for _ in range(2 * loader.steps_per_epoch):
        assert next(loader).x_weak.shape == (8, 3, 32, 32)


# ----------------------------------------------------------------------------- 8. symlinks, errors
def test_symlinked_class_folder_and_symlink_loop_are_reported_not_followed_twice(tmp_path):
    root = tmp_path / "images"
    make_jpeg_folder(root)
    (root / "class_9").symlink_to(root / "class_0", target_is_directory=True)  # the same images again
    line = _one_line_error(_train("data.source=folder", f"data.root={root}", f"run.dir={tmp_path / 'a'}"))
    assert str(root / "class_9") in line and "twice" in line
    (root / "class_9").unlink()
    (root / "class_1" / "loop").symlink_to(root, target_is_directory=True)
    line = _one_line_error(_train("data.source=folder", f"data.root={root}", f"run.dir={tmp_path / 'b'}"))
    assert "symlink loop" in line and str(root / "class_1" / "loop") in line
    (root / "class_1" / "loop").unlink()
    elsewhere = tmp_path / "staged" / "class_2"  # a class folder staged elsewhere and linked: fine
    elsewhere.parent.mkdir()
    shutil.move(str(root / "class_2"), str(elsewhere))
    (root / "class_2").symlink_to(elsewhere, target_is_directory=True)
    from fast_ressl.datasets import list_folder

    ds = list_folder(root)
    assert len(ds.files) == len(set(os.path.realpath(f) for f in ds.files)) == 48


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_missing_or_empty_data_root_is_one_line(tmp_path, what):
    root = tmp_path / "nothing"
    if what == "empty":
        root.mkdir()
    line = _one_line_error(_train("data.source=folder", f"data.root={root}", f"run.dir={tmp_path / 'run'}"))
    assert str(root) in line


def test_knn_and_export_refuse_a_bad_checkpoint_in_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    for cmd in (["knn", str(bad)], ["export", str(bad), str(tmp_path / "out.safetensors")],
                ["linear", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "fast_ressl", *cmd], cwd=REPO, capture_output=True, text=True,
                             env=_env(), timeout=120)
        assert str(bad) in _one_line_error(out), cmd


def test_disk_full_is_one_line_naming_the_path(tmp_path):
    """A full disk while writing (fault injected in the write call: no tmpfs can be mounted here)
    comes out as one line with the errno name and what to do, exit code 2."""
    import errno as errno_mod

    from fast_ressl import cli

    line = cli.user_error(OSError(errno_mod.ENOSPC, "No space left on device", "/x/checkpoints/step.pt"))
    assert "ENOSPC" in line and "/x/checkpoints/step.pt" in line and "resume" in line
    assert cli.user_error(ValueError("a bug")) is None
    # end to end, through the CLI: the checkpoint write fails with ENOSPC
    code = ("import sys, errno, torch; from fast_ressl import cli, checkpoint\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device', a[1] if len(a) > 1 else '')\n"
            "checkpoint.torch.save = full\n"
            f"sys.exit(cli.main(['train', r'{RECIPE}', *{TINY!r}, *{SYNTH!r}, 'train.epochs=1', "
            f"r'run.dir={tmp_path / 'run'}']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    line = _one_line_error(out)
    assert "ENOSPC" in line and "free space" in line


# ----------------------------------------------------------------------------- 3. torchrun restart
def _children(pid):
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return sorted(out)


def test_torchrun_restart_resumes_from_the_newest_checkpoint(tmp_path):
    """torchrun --max-restarts=1, kill -9 of one of 2 workers: the restarted workers used to fail at
    once (Gloo connectFullMesh ... Connection refused: the previous attempt's addresses in the
    store) or hang in init_process_group; now they resume from the newest checkpoint and finish."""
    run = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "fast_ressl", "train", str(RECIPE), *TINY,
           *SYNTH, "train.epochs=40", "train.ckpt_every=5", "train.dist_timeout_s=120", f"run.dir={run}"]
    t0 = time.time()
    agent = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    _wait_for_metrics(run, agent, 12)
    workers = _children(agent.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, _ = agent.communicate(timeout=400)
    assert agent.returncode == 0, out[-4000:]
    assert "resumed from" in out and "done (completed): step 160/160" in out
    steps = _metrics_steps(run)
    assert steps[-1] == 160 and set(steps) == set(range(1, 161))
    print(f"kill -9 to completion: {time.time() - t0:.1f} s")


def _kill_when_logged(log, line, pid, procs, timeout=120):
    """SIGKILL `pid` once `line` is in the file `log` (a launcher's output); give up after
    `timeout` s or when every process in `procs` has exited."""
    t0 = time.time()
    while time.time() - t0 < timeout and any(p.poll() is None for p in procs):
        if line in log.read_text(errors="replace"):
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_torchrun_restart_on_two_nodes_connects_at_once(tmp_path):
    """Two torchrun launchers (--nnodes=2, c10d rendezvous on one host), node A's worker hung and
    node B's killed. Each launcher counts its restarts itself, and one whose worker did not fail
    restarts without counting, so a key prefix of the restart count differed between the nodes and
    the restarted workers could not meet (found in review). With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the README's multi-node command, the Docker image) each
    round has a store of its own and fast_ressl adds no prefix: the first restart connects and the
    run completes."""
    run = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           "--rdzv_id=two_nodes", f"--rdzv_endpoint=127.0.0.1:{port}", "--max_restarts=1", "-m", "fast_ressl",
           "train", str(RECIPE), *TINY, *SYNTH, "train.epochs=40", "train.ckpt_every=5", "train.dist_timeout_s=120",
           f"run.dir={run}"]
    env = {**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    logs = [open(tmp_path / f"node{n}.log", "w") for n in "ab"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True, env=env) for f in logs]
    try:
        _wait_for_metrics(run, nodes[0], 12)
        (a,), (b,) = _children(nodes[0].pid), _children(nodes[1].pid)
        # node A's worker does not fail but hangs (SIGSTOP; on GPUs: a wait in NCCL), so node A
        # restarts it without counting a retry while node B counts one: the counts differ
        os.kill(a, signal.SIGSTOP)
        os.kill(b, signal.SIGKILL)
        # node A's launcher, restarting for node B's new round (without counting), sends its stopped
        # worker a SIGTERM it cannot act on and kills it 30 s later (torch's fixed grace in the
        # restart path; --shutdown-timeout does not reach it). Do that kill as soon as the SIGTERM is
        # sent: the same restart, 30 s sooner. Node A's launcher logs the SIGTERM to logs[0].
        _kill_when_logged(tmp_path / "nodea.log", f"Sending process {a} closing signal SIGTERM", a, nodes)
        rcs = [p.wait(timeout=400) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
            p.wait()
        for f in logs:
            f.close()
    text = [(tmp_path / f"node{n}.log").read_text() for n in "ab"]
    assert rcs == [0, 0], text[0][-3000:] + text[1][-3000:]
    assert "resumed from" in text[0] and "done (completed): step 160/160" in text[0]
    assert not any("Connection refused" in t or "connectFullMesh" in t for t in text), text[0][-3000:]
    assert set(_metrics_steps(run)) == set(range(1, 161))


# ----------------------------------------------------------------------------- 1. bad file mid-run
def _torchrun(nproc, *over):
    return torchrun(nproc, "train", str(RECIPE), *TINY, *over)


def test_torch_loader_replaces_a_file_gone_bad_after_the_scan(tmp_path):
    """The torchvision reference loader (DataLoader workers): the sample is replaced by the next
    good file and reported; the run finishes."""
    root = tmp_path / "images"
    make_jpeg_folder(root)
    assert subprocess.run([sys.executable, "-m", "fast_ressl", "scan", str(root)], cwd=REPO, env=_env(),
                          capture_output=True).returncode == 0
    victim = root / "class_1" / "img_004.JPEG"
    victim.write_bytes(b"garbage" * 50)
    run = tmp_path / "run"
    out = _train("data.source=folder", "data.loader=torch", f"data.root={root}", "train.epochs=2",
                 f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["bad_files"] == [str(victim)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_file"] for r in rows if "bad_file" in r] == [str(victim)]


def test_a_file_gone_bad_after_the_scan_is_replaced_and_reported(tmp_path):
    """A JPEG overwritten with garbage after the denylist was written used to kill the run (DALI
    fails the whole batch) at the same step on every relaunch. Two ranks: the file is replaced in
    its batch, both ranks run every step, the path is in metrics.jsonl and summary.json."""
    root = tmp_path / "images"
    make_jpeg_folder(root)
    folder = ["data.source=folder", f"data.root={root}", "train.epochs=2", "train.ckpt_every=4"]
    assert subprocess.run([sys.executable, "-m", "fast_ressl", "scan", str(root)], cwd=REPO, env=_env(),
                          capture_output=True).returncode == 0
    victims = [root / "class_0" / "img_003.JPEG", root / "class_2" / "img_010.JPEG"]
    victims[0].write_bytes(b"garbage" * 50)
    victims[1].write_bytes(victims[1].read_bytes()[:200])  # truncated
    run = tmp_path / "run"
    out = subprocess.run(_torchrun(2, *folder, f"run.dir={run}"), cwd=REPO, capture_output=True, text=True,
                         env=_env(), timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "failed to decode mid-run" in out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 12
    assert sorted(summary["bad_files"]) == sorted(str(v) for v in victims)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # every step ran, on both ranks
    ckpt_ranks = __import__("fast_ressl.checkpoint", fromlist=["safe_load"]).safe_load(run / "checkpoints/last.pt")
    fps = [r["fingerprint"] for r in ckpt_ranks["ranks"]]
    assert fps[0] == fps[1]  # the ranks stayed in lockstep
    logged = {r["bad_file"] for r in rows if "bad_file" in r}
    assert logged <= {str(v) for v in victims}  # rank 0's finds, each with its path


def test_a_deleted_file_is_named_at_resume_not_silently_adopted(tmp_path):
    root = tmp_path / "images"
    make_jpeg_folder(root)
    folder = ["data.source=folder", f"data.root={root}", "train.epochs=2", "train.ckpt_every=2"]
    run = tmp_path / "run"
    assert _train(*folder, "train.stop_at_step=4", f"run.dir={run}").returncode == 0
    (root / "class_1" / "img_005.JPEG").unlink()
    line = _one_line_error(_train(*folder, f"run.dir={run}"))
    assert "48 -> 47 good files" in line and f"{root / 'class_1'} (16 -> 15 files)" in line
    out = subprocess.run([sys.executable, "-m", "fast_ressl", "train", str(RECIPE), *TINY, *folder, f"run.dir={run}",
                          "--allow-config-change"], cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the data changed" in out.stdout
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


# ----------------------------------------------------------------------------- small /dev/shm
def _private_shm_ok() -> bool:
    """A private mount namespace with its own /dev/shm (root, unshare -m): Docker's small default,
    for real, without touching the machine's."""
    if shutil.which("unshare") is None:
        return False
    q = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"],
                       capture_output=True)
    return q.returncode == 0


def _train_small_shm(size, *over):
    cmd = [sys.executable, "-m", "fast_ressl", "train", str(RECIPE), *TINY, *over]
    # timeout: a DataLoader whose workers died can wait long for them before it raises
    return subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"',
                           "sh", *cmd], cwd=REPO, capture_output=True, text=True, timeout=120, env=_env())


@pytest.mark.skipif(not _private_shm_ok(), reason="needs unshare -m and mount (root) for a private /dev/shm")
def test_a_small_dev_shm_lowers_the_prefetch_or_is_one_line(tmp_path):
    """The torch loader's workers hand batches over in /dev/shm. Where it is small (a container
    without --ipc=host), the run used to die with "No space left on device" tracebacks from every
    worker; now the prefetch shrinks to what fits (with a warning), and where not even one batch per
    worker fits, the run stops at once with one line that says what to change. Batches here: 8
    images x 2 views of 32x32 px in fp16, 96 KB; 2 workers x prefetch 4 (+ the 2 batches the loop
    holds) would need 960 KB; 512 KB hold 2 workers x prefetch 1; 128 KB not one batch per worker."""
    root = tmp_path / "jpegs"
    make_jpeg_folder(root)
    over = ["data.source=folder", f"data.root={root}", "data.loader=torch", "data.num_threads=2",
            "data.dtype=fp16", "train.epochs=1"]
    out = _train_small_shm("512k", *over, f"run.dir={tmp_path / 'a'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "prefetch lowered to 1" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "done (completed)" in out.stdout
    line = _one_line_error(_train_small_shm("128k", *over, f"run.dir={tmp_path / 'b'}"))
    assert "/dev/shm has 0.1 MiB free" in line and "--ipc=host" in line and "data.loader=dali" in line


# ----------------------------------------------------------------------------- no compiler
def test_without_a_compiler_the_loss_runs_eagerly_and_model_compile_is_refused(tmp_path):
    """A machine without the compiler torch.compile needs (a slim image: no g++ for CPU kernels; on
    CUDA no gcc or Python.h for Triton's launchers). Before: the first step died inside inductor
    with a compiler traceback. Now the relation loss (compiled by default) runs eagerly with one
    warning, and model.compile=true, which the user asked for, is refused before any work with a
    line naming the key and what is missing. PATH holds no compiler here; a fresh inductor cache
    leaves no earlier build to load."""
    (tmp_path / "bin").mkdir()
    env = {**_env(), "PATH": str(tmp_path / "bin"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for key in ("CC", "CXX"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "fast_ressl", "train", str(RECIPE), *TINY, *SYNTH, "method.compile_loss=true",
           "train.epochs=1"]
    out = subprocess.run([*cmd, f"run.dir={tmp_path / 'a'}"], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    warning = "method.compile_loss=true: torch.compile on cpu needs a C++ compiler (g++ on PATH, or $CXX)"
    assert (out.stdout + out.stderr).count(warning) == 1, (out.stdout + out.stderr)[-3000:]
    assert "done (completed)" in out.stdout
    refused = subprocess.run([*cmd, "model.compile=true", f"run.dir={tmp_path / 'b'}"], cwd=REPO,
                             capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert ("config error: model.compile=true: torch.compile on cpu needs a C++ compiler" in refused.stderr
            and "model.compile=false" in refused.stderr), refused.stderr
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before the run dir was set up


def test_a_filesystem_without_flock_is_not_a_busy_run_dir(tmp_path, monkeypatch, capsys):
    """flock failing with ENOLCK (Lustre mounted noflock, NFS without its lock daemon) was reported
    as "in use by another fast-ressl process", naming the last run's pid, and no run could start
    there (found in review). Now the run goes on without the lock and says so; a real holder still
    makes the directory busy. (The filesystem is not at hand here: flock's error is raised for it.)"""
    import errno
    import fcntl

    from fast_ressl.checkpoint import RunDirBusy, RunLock

    run = tmp_path / "run"
    (run).mkdir()
    (run / ".lock").write_text("pid 1 on elsewhere\n")
    real = fcntl.flock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = RunLock(run)
    assert lock.fd == -1 and "does not support flock" in capsys.readouterr().err
    lock.release()
    monkeypatch.setattr(fcntl, "flock", real)
    held = RunLock(run)
    with pytest.raises(RunDirBusy, match="in use by another fast-ressl process"):
        RunLock(run)
    held.release()
