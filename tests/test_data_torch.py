"""The torchvision reference loader: contract, shards, resume, bad files, and agreement with DALI."""
from __future__ import annotations

import io
import json

import pytest
import torch

from conftest import assert_same_batches, start_together, tiny_overrides
from fast_ressl.config import load_config
from fast_ressl.data import build_loader
from fast_ressl.data_torch import TorchEvalLoader, TorchLoader

CPU = torch.device("cpu")


def _cfg(root, **extra):
    return load_config(None, tiny_overrides(root, **{"data.loader": "torch", **extra}))


def _loader(root, rank=0, world=1, workers=0, **extra):
    return TorchLoader(_cfg(root, **extra), rank, world, CPU, progress=False, num_workers=workers)


def test_contract_shapes_dtype_layout(jpeg_folder):
    cfg = _cfg(jpeg_folder, **{"data.strong": "[{size: 32}, {size: 16}]"})
    L = build_loader(cfg, 0, 1, CPU)
    assert isinstance(L, TorchLoader) and L.steps_per_epoch == 6 and L.bad_files == []
    b = next(iter(L))
    for x, size in [(b.x_weak, 32), (b.x_strong[0], 32), (b.x_strong[1], 16)]:
        assert x.shape == (8, 3, size, size) and x.dtype == torch.float16
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert b.labels.dtype == torch.int64


def test_same_files_and_order_as_dali(jpeg_folder):
    pytest.importorskip("nvidia.dali")
    from pipelines_dali.loader import DaliTrainLoader

    _loader(jpeg_folder)  # rank 0 writes the denylist; other ranks wait for it
    T = _loader(jpeg_folder, rank=1, world=2)
    D = DaliTrainLoader(_cfg(jpeg_folder, **{"data.loader": "dali"}), 1, 2, CPU, progress=False)
    assert T.epoch_files(3) == D.epoch_files(3)
    got = torch.cat([next(T).labels for _ in range(T.steps_per_epoch)])
    assert got.tolist() == T.epoch_files(0)[1]


def test_restore_gives_identical_next_batches_with_workers(jpeg_folder):
    ref = _loader(jpeg_folder, workers=2)
    for _ in range(5):
        next(ref)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    want = [next(ref) for _ in range(3)]  # crosses the epoch boundary (6 steps per epoch)
    res = _loader(jpeg_folder, workers=0)  # worker count does not change the batches
    res.load_state_dict(state)
    assert_same_batches(want, [next(res) for _ in range(3)])


def test_bad_files_skipped_odd_kept(messy_folder):
    root, odd, bad = messy_folder
    L = _loader(root)
    assert sorted(L.bad_files) == sorted(bad.values())
    assert set(odd.values()) <= set(L.dataset.files)
    for _ in range(L.steps_per_epoch):
        assert torch.isfinite(next(L).x_weak.float()).all()


def test_eval_loader(jpeg_folder):
    E = TorchEvalLoader(_cfg(jpeg_folder, **{"data.eval_resize": 40}), jpeg_folder, CPU, batch_size=20,
                        progress=False, num_workers=0)
    xs, ys = zip(*list(E))
    assert [x.shape[0] for x in xs] == [20, 20, 8]
    assert xs[0].shape[1:] == (3, 32, 32) and xs[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.cat(ys).tolist() == E.dataset.labels


def test_eval_pass_leaves_out_a_file_gone_bad_since_the_scan(jpeg_folder, capsys):
    """A file overwritten after the scan used to raise in a DataLoader worker and end the pass (and
    through the kNN monitor the training run): now it is reported once, left out of this pass and
    the next, and every other image comes through with its label (2 workers, as the monitor runs)."""
    E = TorchEvalLoader(_cfg(jpeg_folder, **{"data.eval_resize": 40}), jpeg_folder, CPU, batch_size=20,
                        progress=False, num_workers=2)
    victim = E.dataset.files[25]
    want = [y for f, y in zip(E.dataset.files, E.dataset.labels) if f != victim]
    with open(victim, "wb") as f:
        f.write(b"garbage" * 50)
    capsys.readouterr()
    xs, ys = zip(*list(E))
    assert [x.shape[0] for x in xs] == [20, 19, 8] and torch.cat(ys).tolist() == want
    assert E.bad_files == [victim] and capsys.readouterr().err.count("failed to decode in the eval pass") == 1
    assert torch.cat([y for _, y in E]).tolist() == want and "failed to decode" not in capsys.readouterr().err


def _channel_stats(loader, n_batches):
    xs = {"weak": [], "strong": []}
    for _ in range(n_batches):
        b = next(loader)
        xs["weak"].append(b.x_weak.float())
        xs["strong"].append(b.x_strong[0].float())
    out = {}
    for k, v in xs.items():
        x = torch.cat(v)
        out[k] = (x.mean((0, 2, 3)), x.std((0, 2, 3)), x.std((2, 3)).mean(0))  # mean, std, in-image std
    return out


def test_dali_and_torchvision_views_match_per_channel_statistics(jpeg_folder):
    """Same images, same recipe: per-channel mean and spread of each view agree closely."""
    pytest.importorskip("nvidia.dali")
    from pipelines_dali.loader import DaliTrainLoader

    n = 4 * 6  # 4 epochs of 48 images
    T = _loader(jpeg_folder, workers=2)
    D = DaliTrainLoader(_cfg(jpeg_folder, **{"data.loader": "dali"}), 0, 1, CPU, progress=False)
    st, sd = _channel_stats(T, n), _channel_stats(D, n)
    for view in ("weak", "strong"):
        (mt, vt, it), (md, vd, idd) = st[view], sd[view]
        assert (mt - md).abs().max() < 0.12, (view, mt, md)
        assert ((vt - vd).abs() / vt).max() < 0.12, (view, vt, vd)
        assert ((it - idd).abs() / it).max() < 0.15, (view, it, idd)


def test_embedded_digits_materialise_once_with_val_split(tmp_path):
    from fast_ressl.datasets import list_folder
    from fast_ressl.embedded import ensure_embedded

    paths = ensure_embedded(tmp_path / "emb", quiet=True)
    train, val = list_folder(paths["train"]), list_folder(paths["val"])
    assert (len(train), len(val)) == (1438, 359) and train.classes == [str(i) for i in range(10)]
    assert not {p.split("/")[-1] for p in train.files} & {p.split("/")[-1] for p in val.files}
    stamp = (tmp_path / "emb" / "digits-v1" / "DONE").stat().st_mtime_ns
    assert ensure_embedded(tmp_path / "emb", quiet=True) == paths
    assert (tmp_path / "emb" / "digits-v1" / "DONE").stat().st_mtime_ns == stamp
    cfg = load_config(None, ["data.source=embedded", f"data.embedded_dir={tmp_path / 'emb'}",
                             "data.weak.size=32", "data.strong=[{size: 32}]", "train.batch_size=64",
                             "method.queue_size=64", "data.loader=torch"])
    L = build_loader(cfg, 0, 1, CPU)
    assert L.steps_per_epoch == 1438 // 64 and L.bad_files == []
    b = next(L)
    assert b.x_weak.shape == (64, 3, 32, 32) and b.labels.max() <= 9


def test_embedded_digits_made_once_by_processes_that_start_together(tmp_path):
    """The ranks of a torchrun job on a fresh machine: each wrote the dataset, and the last to finish
    deleted a finished copy under a rank that was scanning it ("class folder .../train/2 has no
    decodable image", 2-rank demo run). Three processes start at once: one materialises, the
    others wait for it and each finds every file."""
    code = ("import json, os\nimport numpy, PIL.Image, sklearn.datasets\n"
            "from fast_ressl.embedded import ensure_embedded\n# --- start\n"
            "paths = ensure_embedded(TMP / 'emb')\n"
            "print(json.dumps([sum(len(f) for _, _, f in os.walk(paths[k])) for k in ('train', 'val')]))\n")
    runs = start_together(tmp_path, code, [{}] * 3)
    assert [rc for rc, _, _ in runs] == [0, 0, 0], runs
    # each saw the finished dataset (the train count includes no stray file: DONE is in the root)
    assert [out.splitlines()[-1] for _, out, _ in runs] == ["[1438, 359]"] * 3, runs
    assert sum(out.count("materialised the embedded digits") for _, out, _ in runs) == 1, runs


def test_the_first_rank_of_every_node_scans_for_its_own_denylist(messy_folder, tmp_path, monkeypatch):
    """A read-only dataset's denylist goes to the cache folder, on each node's own disk. Only global
    rank 0 scanned and every other rank waited for the file, so on a second node (here rank 8, its
    machine's LOCAL_RANK 0) it waited for a file that never came there: 6 hours, then an error."""
    from fast_ressl import datasets
    from fast_ressl.datasets import prepare_dataset

    root, _, bad = messy_folder
    node2 = tmp_path / "node2-cache" / "denylist.json"
    cfg = load_config(None, tiny_overrides(root, **{"data.denylist": str(node2)}))

    def wait_for(*a, **k):
        raise AssertionError("waited for a denylist another node writes")

    monkeypatch.setattr(datasets, "_wait_for", wait_for)
    monkeypatch.setenv("WORLD_SIZE", "16")  # torchrun's environment on the second of two 8-GPU nodes
    monkeypatch.setenv("LOCAL_RANK", "0")
    ds = prepare_dataset(cfg, rank=8, progress=False)
    assert set(ds.bad_files) == set(bad.values()) and node2.exists()
    monkeypatch.setenv("LOCAL_RANK", "1")  # the node's other ranks read it once written
    assert set(prepare_dataset(cfg, rank=9, progress=False).bad_files) == set(bad.values())
    # one process (no WORLD_SIZE) with a LOCAL_RANK another launcher left: it is first, it scans
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("LOCAL_RANK", "3")
    alone = load_config(None, tiny_overrides(root, **{"data.denylist": str(tmp_path / "alone.json")}))
    assert set(prepare_dataset(alone, rank=0, progress=False).bad_files) == set(bad.values())


def test_first_ranks_of_nodes_sharing_the_dataset_scan_it_once(messy_folder, tmp_path):
    """Where the nodes share the dataset folder (and its locks work), their first ranks, starting
    together, take turns: one scans, the others read its denylist."""
    root, _, bad = messy_folder
    code = ("import json\nfrom fast_ressl.config import load_config\n"
            "from fast_ressl.datasets import prepare_dataset\n"
            f"cfg = load_config(None, {tiny_overrides(root)!r})\n# --- start\n"
            "import os\nds = prepare_dataset(cfg, rank=int(os.environ['RANK']))\n"
            "print(json.dumps(sorted(ds.bad_files)))\n")
    runs = start_together(tmp_path, code, [{"RANK": str(8 * n), "LOCAL_RANK": "0", "WORLD_SIZE": "24"}
                                           for n in range(3)])
    assert [rc for rc, _, _ in runs] == [0, 0, 0], runs
    assert [json.loads(out.splitlines()[-1]) for _, out, _ in runs] == [sorted(bad.values())] * 3, runs
    assert sum(err.count("decoding all") for _, _, err in runs) == 1, runs


def test_scan_command_lists_bad_files_and_writes_denylist(messy_folder, capsys):
    import argparse

    from fast_ressl.datasets import add_cli_commands, read_denylist

    root, odd, bad = messy_folder
    parser = argparse.ArgumentParser()
    add_cli_commands(parser.add_subparsers(dest="command"))
    out = tmp = root.parent / "deny.json"
    args = parser.parse_args(["scan", str(root), "--quiet", "--output", str(out), "--fail-on-bad"])
    assert args.func(args) == 1
    text = capsys.readouterr().out
    assert "3 bad" in text and all(p in text for p in bad.values())
    num, denied = read_denylist(str(tmp))
    assert num == 55 and sorted(denied) == sorted(bad.values())


def test_torch_path_and_scan_never_import_dali():
    import subprocess
    import sys

    code = ("import sys, fast_ressl.data_torch, fast_ressl.datasets, fast_ressl.embedded, "
            "pipelines_dali.webdataset; assert not [m for m in sys.modules if m.startswith('nvidia.dali')]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_workers_left_running_at_exit_neither_hang_the_exit_nor_outlive_it():
    """The workers ignore SIGTERM (stop signals are the trainer's), so multiprocessing's exit hook,
    which terminates daemonic children with SIGTERM and then joins them, would wait for ever on a
    process that exits with its loader still running (a probe without data_torch's hooks hung until
    killed); data_torch's hook stops them first. One worker is in a 60 s item when the process exits:
    torch's shutdown waits 2 x 5 s for it, then it is killed."""
    import os
    import subprocess
    import sys
    import time

    code = (
        "import time, torch, fast_ressl.data_torch as dt\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 100\n"
        "    def __getitem__(self, i):\n"
        "        time.sleep(60 if i == 1 else 0)\n"
        "        return i\n"
        "it = dt.start_workers(Slow(), num_workers=2, prefetch_factor=1)\n"
        "next(it)\n"
        "print(*[w.pid for w in it._workers], flush=True)\n")  # exits here, the loader still running
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    took = time.time() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert took < 45, f"the exit took {took:.0f} s"  # torch's 5 s join per worker, then SIGKILL; never 60 s
    for pid in map(int, out.stdout.split()):
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived the process"


def test_worker_loaders_run_under_forkserver(jpeg_folder):
    """Python 3.14 makes forkserver multiprocessing's default on Linux (3.12 already warns when a
    process with threads forks, as ours does beside DALI's and torch's threads). The workers then
    get the dataset, collate function and worker_init_fn by pickle, from a fresh interpreter: the
    training loader gives the same batches as in-process loading, the eval loader every label."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import multiprocessing, sys, torch\n"
        "multiprocessing.set_start_method('forkserver')\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import tiny_overrides\n"
        "from fast_ressl.config import load_config\n"
        "from fast_ressl.data_torch import TorchEvalLoader, TorchLoader\n"
        "cpu = torch.device('cpu')\n"
        f"cfg = load_config(None, tiny_overrides({str(jpeg_folder)!r}, **{{'data.loader': 'torch', "
        "'data.eval_resize': 40}))\n"
        "ref, got = (TorchLoader(cfg, 0, 1, cpu, progress=False, num_workers=w) for w in (0, 2))\n"
        "for _ in range(3):\n"
        "    a, b = next(ref), next(got)\n"
        "    assert torch.equal(a.x_weak, b.x_weak) and torch.equal(a.x_strong[0], b.x_strong[0])\n"
        "    assert torch.equal(a.labels, b.labels)\n"
        f"E = TorchEvalLoader(cfg, {str(jpeg_folder)!r}, cpu, batch_size=20, progress=False, num_workers=2)\n"
        "assert torch.cat([y for _, y in E]).tolist() == E.dataset.labels\n"
        "print('ok', multiprocessing.get_start_method())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["ok", "forkserver"]
