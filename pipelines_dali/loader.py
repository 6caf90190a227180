"""DALI loaders handing torch tensors to the training loop (the `fast_ressl.data.Batch` contract).

Epochs. For file sources (folder, filelist, embedded) the loader builds one DALI pipeline per epoch:
the good files are permuted with a generator seeded by (data.seed, epoch), rank r takes the r-th
contiguous block of `steps_per_epoch * batch` files of the permutation, and the pipeline reads that
block in order. So every epoch is a full reshuffle, the ranks' shards are disjoint, every rank has
the same number of batches, and the files past the last full global batch (fewer than one global
batch, different ones each epoch) are dropped. Augmentation RNG is seeded by (data.seed, epoch, rank).

Webdataset shards are read by DALI's webdataset reader (shard_id/num_shards; the shard assignment
rotates with the epoch), with its buffer shuffle (`data.shuffle_buffer` samples), so the per-epoch
order is a local shuffle, not a full permutation; steps_per_epoch = (samples // world) // batch.

Epoch boundaries cost nothing on the training thread: once the current pipeline has every
remaining batch of its epoch scheduled (the last `data.prefetch_queue_depth` batches), the next
epoch's pipeline is built on a background thread, which also runs it up to its first batch
(`prepare_first_batch`), so the first `next()` of the new epoch only swaps pipelines. Measured on the
2-core CPU here (48 tiny JPEGs, batch 8, 2 DALI threads, 0.1 s "steps"): next() on an epoch's first
batch took 20-21 ms when the pipeline was built there and 1-3 ms built ahead; a build plus first
batch takes ~0.1 s on a side thread and the main thread kept ~85% of its Python throughput
meanwhile (DALI releases the GIL while it builds and runs). On a GPU a build also allocates the
decoder's buffers and sets up nvJPEG: per fn.decoders.image's documentation (DALI 2.4), one device
buffer of data.device_memory_padding bytes and two pinned host buffers of data.host_memory_padding
bytes per DALI thread; with the defaults (NVIDIA's ResNet-50 example's 201 MiB and 134 MiB) that is
2.4 GiB of device and 3.1 GiB of pinned host memory at 12 threads (arithmetic, not measured). The
old and the new pipeline coexist for those few batches (DALI's memory twice, briefly). Batches, their order
and the state_dict are those of a pipeline built on the boundary: the same file block and seed, and
a state saved at the boundary still names the next epoch with no pipeline checkpoint.

Resume. Pipelines are built with `enable_checkpointing=True`; `state_dict()` holds the epoch, the
batches already handed out in it and DALI's checkpoint string of the pipeline (reader position and
every RNG) after the last batch handed out. `load_state_dict` rebuilds that epoch's pipeline from the
string, so the next batches equal those of the uninterrupted run bit for bit.

A file that goes bad after the scan (overwritten, truncated, deleted), or one that the scan's PIL
decodes but DALI's decoder cannot (a bilevel TIFF; on a GPU, whatever its decoders reject), makes
DALI fail its whole batch (DALI cannot ask its reader for a replacement sample). The loader then
decodes the files of the failed batch and of the batches in flight (with PIL, then, if they all
pass, with DALI's decoder alone), and each file that fails is replaced by another file of its
batch (so every rank keeps the same number of batches and steps); the rest of the epoch is read by
a new pipeline ("segment") that starts at the failed batch. The replacements and the segment
start are part of `state_dict`, so a resume rebuilds the same batches; the path is reported, kept in
`bad_files` (-> summary.json) and `midrun_bad` (-> metrics.jsonl). Webdataset samples are checked
when their index is written (`fast-ressl wds-index`); a shard that goes bad later still stops the run.

Output: DALI's NHWC buffers are taken by DALIGenericIterator through DLPack (no copy under the
dynamic executor) and viewed as channels_last NCHW with permute(0, 3, 1, 2). bf16 is produced as
fp32 by DALI (it has no bf16) and cast in torch (one copy). Stream safety needs nothing here: the
DLPack export makes torch's current stream wait for DALI's (`__dlpack__(stream)`), and a GPU buffer
torch lets go of is not handed back to DALI's pool at once but parked until a cudaDeviceSynchronize
on a DALI thread completes (dali/pipeline/data/dltensor.cc, DLTensorGraveyard), so the loop may
drop a batch while its kernels still read it (the host runs ahead; no record_stream is needed).

CUDA graphs (model.compile_mode=reduce-overhead). DALI's threads keep using the GPU while inductor
records the networks' graphs in steps 1-2 (and re-records later if it must): the decoding threads,
an epoch built ahead, and the graveyard thread above, whose cudaDeviceSynchronize CUDA refuses with
cudaErrorStreamCaptureUnsupported (900) while any stream of the device captures. Inductor captures
in thread-local mode (torch/_inductor/cudagraph_trees.py: capture_error_mode="thread_local"), so the
other threads' allocations and launches on their own streams are allowed, and DALI's graveyard
retries a refused sync after a short wait (NVIDIA/DALI PR 6259). Seen in the wheels' libdali.so
(objdump of DLTensorGraveyard::run): 2.1.0 and 2.4.0 compare the result with 900 and wait on a
timed condition; 2.0.0 has neither and throws from its thread, which aborts the process
("operation not permitted when stream is capturing", NVIDIA/DALI issue 3703), hence setup.py's
nvidia-dali-cuda130>=2.1. Read from binaries and sources, not yet run on a GPU:
tests/test_gpu_readiness.py's DALI + CUDA-graphs test runs it.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from fast_ressl.data import Batch, EndlessLoader, torch_dtype
from fast_ressl.datasets import (DataError, FileDataset, check_image, dataset_identity, epoch_block,
                                 first_on_machine, prepare_dataset, report_left_out)
from fast_ressl.dist import STOP_SIGNALS

from .decode_check import UNAVAILABLE
from .pipeline import DEBUG_KEYS, eval_pipeline, train_pipeline


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # DALI colours its error lines


def _device_id(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class DecodeCheckUnavailable(RuntimeError):
    """The child that asks DALI's decoder about files could not build its pipeline, or failed on a
    JPEG known to be good: whatever failed the batch, the files cannot be blamed for it here."""


def _dali_error(files: List[str], data, device_id: Optional[int]) -> Optional[str]:
    """None if DALI's decoder (on `device_id`'s GPU, or the CPU) decodes every file, else why not.
    Asked in a child process (pipelines_dali/decode_check.py: a decoder crash ends the child, not
    this run)."""
    req = {"files": files, "device_id": device_id, "num_threads": int(data.num_threads),
           "hw_decoder_load": float(data.hw_decoder_load)}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where pipelines_dali is
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        # a session of its own: torchrun stops its workers with a signal to their process group,
        # and Ctrl-C signals the terminal's; a child killed by those read as a decoder crash on the
        # files (found in review). The trainer stops at its next step boundary instead.
        q = subprocess.run([sys.executable, "-m", "pipelines_dali.decode_check"], input=json.dumps(req), env=env,
                           capture_output=True, text=True, timeout=600, start_new_session=True)
    except subprocess.TimeoutExpired:  # a hung decoder is an answer too (run() has killed the child)
        return "DALI's decoder did not finish in 600 s"
    if q.returncode == 0:
        return None
    if -q.returncode in (*STOP_SIGNALS, signal.SIGKILL):
        # stopped from outside (SIGKILL: the kernel's OOM killer too), not a decoder crash
        raise DecodeCheckUnavailable(f"the child asking DALI's decoder was stopped by "
                                     f"{signal.Signals(-q.returncode).name}: no answer about the files")
    if q.returncode == UNAVAILABLE:  # not an answer about the files
        raise DecodeCheckUnavailable(f"DALI's decoder could not be set up in a child process to check which "
                                     f"files it cannot decode: {_ANSI.sub('', q.stderr).strip()[-500:]}")
    if q.returncode < 0:
        return f"DALI's decoder crashed ({signal.Signals(-q.returncode).name})"
    # DALI's message: where the operator was defined, then "encountered:" and the cause
    text = _ANSI.sub("", q.stderr)
    cause = re.search(r"encountered:\s*(.+?)\s*(?:Current pipeline object|$)", text, re.S)
    why = cause.group(1) if cause else (text.strip().splitlines() or [f"exit status {q.returncode}"])[-1]
    return " ".join(why.split())[:300]


def undecodable(files: List[str], data, device_id: Optional[int]) -> Dict[str, str]:
    """{path: reason} for the files that DALI's decoder cannot decode although PIL can (the scan
    and check_image decode with PIL), found by halving: decoder-only pipelines over the failing
    halves, each in a child process (_dali_error), about 2 * log2(len(files)) of them per such
    file, each decoding its half once (0.36 s a child on this 2-core CPU: 11 children, 3.9 s, for
    a bilevel TIFF among 32 files; a rare event), after one control child (_check_control) that
    tells a decoder that fails on anything from one that fails on these files.

    Seen on the CPU: a bilevel (1-bit) TIFF, which PIL writes without the optional BitsPerSample
    tag, fails DALI 2.4's TIFF parser ("missing: BitsPerSample"). On a GPU the mixed decoder
    (nvImageCodec) has decoders of its own, so it is asked there, with the training pipeline's
    settings."""
    found: Dict[str, str] = {}
    if not files:
        return found
    _check_control(data, device_id)

    def search(group: List[str], reason: str) -> None:
        if len(group) == 1:
            found[group[0]] = f"DALI cannot decode it: {reason}; PIL reads it as {_pil_kind(group[0])}"
            return
        for half in (group[:len(group) // 2], group[len(group) // 2:]):
            err = _dali_error(half, data, device_id)
            if err is not None:
                search(half, err)

    err = _dali_error(files, data, device_id)
    if err is not None:
        search(files, err)
    return found


def _check_control(data, device_id: Optional[int]) -> None:
    """Raise DecodeCheckUnavailable unless a child decodes a JPEG known to be good (64x64 px, made
    here by PIL) with the training pipeline's decoder settings. Without this control, a child that
    fails for a reason of its own (no CUDA context for a second process on a GPU in EXCLUSIVE_PROCESS
    mode, out of GPU memory right after the batch itself failed from it) reads as a file DALI cannot
    decode, down to every single file: found in review, shown on this GPU-less machine by asking
    for device 999, where all 4 good JPEGs of a window were marked undecodable."""
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="fast_ressl_control_") as tmp:
        path = os.path.join(tmp, "control.jpg")
        ramp = np.linspace(0, 255, 64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3)
        Image.fromarray(ramp).save(path, quality=90)
        err = _dali_error([path], data, device_id)
    if err is not None:
        raise DecodeCheckUnavailable(f"DALI's decoder, in a child process, failed on a JPEG known to be good "
                                     f"({err}): the batch's failure cannot be put down to its files")


def failed_files(files: List[str], data, device_id: Optional[int]) -> Dict[str, str]:
    """{path: reason} for the files of a batch DALI failed (and of those in flight behind it) that
    PIL cannot decode (check_image: gone bad since the scan), else, if PIL decodes them all, those
    that DALI's own decoder cannot (undecodable)."""
    files = list(dict.fromkeys(files))
    found = {p: r for p in files if (r := check_image(p)) is not None}
    return found or undecodable(files, data, device_id)


def _pil_kind(path: str) -> str:
    """'TIFF, mode 1' (what to look for in the file)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return f"{img.format}, mode {img.mode}"
    except Exception as err:  # noqa: BLE001 - only a description
        return f"nothing ({type(err).__name__})"


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 31-bit pipeline seed for (data.seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFFFFFF)


def parse_ascii_labels(raw: torch.Tensor) -> torch.Tensor:
    """(N, L) uint8 ASCII digits padded with spaces/newlines -> (N,) int64 (non-digit bytes skipped).

    Vectorised (a handful of ops whatever L): the per-column loop it replaces issued ~3 ops per
    byte column on every step. Labels come from DALI's CPU reader, so these are host ops."""
    raw = raw.reshape(raw.shape[0], -1).to(torch.int64)
    digit = ((raw >= 48) & (raw <= 57)).to(torch.int64)
    seen = torch.cumsum(digit, dim=1)
    after = seen[:, -1:] - seen  # digits to the right of each byte: its power of ten
    return (digit * (raw - 48) * torch.pow(10, after)).sum(dim=1)


def _to_torch_image(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """DALI NHWC -> channels_last NCHW view (cast only where DALI cannot produce the dtype)."""
    x = x.permute(0, 3, 1, 2)
    return x if x.dtype == dtype else x.to(dtype)


class _Ahead:
    """`make()` run on a background thread; `get()` joins it and returns its result (or raises its
    exception on the caller's thread). Not a daemon: a process that ends while a pipeline is being
    built waits for the build (a fraction of a second) instead of tearing DALI down under it."""

    def __init__(self, epoch: int, make: Callable[[], Tuple[object, object]]):
        self.epoch = epoch
        self._make = make
        self._result: Optional[Tuple[object, object]] = None
        self._error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=f"dali-build-epoch-{epoch}")
        self.thread.start()

    def _run(self) -> None:
        try:
            self._result = self._make()
        except BaseException as e:  # noqa: BLE001 - re-raised on the loader's thread by get()
            self._error = e

    def done(self) -> bool:
        return not self.thread.is_alive()

    def get(self) -> Tuple[object, object]:
        self.thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class DaliTrainLoader(EndlessLoader):
    """Endless iterator of `Batch` for data.source folder | filelist | embedded | webdataset.

    Attributes: steps_per_epoch (batches per epoch per rank), batch_size (per rank), dataset
    (FileDataset of the good files; None for webdataset), bad_files (list[str], the skipped paths),
    bad_reasons ({path: reason}). With debug=True, `last_debug` holds the per-sample decisions of the
    first strong view of the last batch ({"jitter","gray","blur","flip"}: (N,) float tensors).

    Epoch boundaries (see the module docstring): `builds` lists ("sync" | "ahead", epoch) for every
    pipeline built, in order; `ahead_wait_s` is the time next() spent waiting for an ahead-built
    pipeline that was not ready yet (0 when the build was fully hidden). `build_ahead=False` builds
    each epoch's pipeline on its first batch instead (the behaviour before).
    """

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 debug: bool = False, progress: bool = True, build_ahead: bool = True):
        self.cfg = cfg
        self.data = cfg.data
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.debug = debug
        self.batch_size = cfg.train.batch_size // world_size
        self.dtype = torch_dtype(self.data.dtype)
        self.dataset: Optional[FileDataset] = None
        self.bad_files: List[str] = []
        self.bad_reasons: Dict[str, str] = {}
        if self.data.source == "webdataset":
            from .webdataset import list_shards

            self.wds_paths, self.wds_index, self.num_samples, bad = list_shards(
                self.data.root, self.data.num_threads, self.data.max_bad_fraction,
                progress=progress and rank == 0)
            self.bad_files = sorted(bad)  # "shard.tar:key" of samples left out of the index
            self.bad_reasons = dict(bad)
        else:
            # the scanning message from whichever rank scans: each node's first (datasets.prepare_dataset)
            self.dataset = prepare_dataset(cfg, rank=rank, progress=progress and first_on_machine(rank))
            self.bad_files = list(self.dataset.bad_files)
            self.bad_reasons = dict(self.dataset.bad_reasons)
            self.num_samples = len(self.dataset)
        self.steps_per_epoch = (self.num_samples // world_size) // self.batch_size
        if self.steps_per_epoch < 1:
            raise DataError(f"{self.num_samples} good images are fewer than one global batch "
                            f"train.batch_size={cfg.train.batch_size} (world size {world_size})")
        self.output_map = (["x_weak"] + [f"x_strong{i}" for i in range(len(self.data.strong))]
                           + ["labels"] + (list(DEBUG_KEYS) if debug else []))
        self.epoch = 0
        self.step_in_epoch = 0  # batches of `epoch` handed out
        self._iter: Optional[DALIGenericIterator] = None
        self._pipe = None
        self._restore: Optional[str] = None  # a pipeline checkpoint to build the next pipeline from
        self.last_debug: Dict[str, torch.Tensor] = {}
        self.build_ahead = build_ahead
        # Start the next epoch's build once the current pipeline has all of its epoch's remaining
        # batches scheduled: DALIGenericIterator keeps prefetch_queue_depth runs in flight.
        self.ahead_batches = max(1, int(self.data.prefetch_queue_depth))
        self._ahead: Optional[_Ahead] = None
        self.end_epoch: Optional[int] = None  # end_at(): no epoch from this one on is built ahead
        self.builds: List[Tuple[str, int]] = []
        self.ahead_wait_s = 0.0
        # files that failed mid-run: {path: reason}; each is replaced inside its batch from then on
        self.midrun_bad: Dict[str, str] = {}
        self.segment_start = 0  # first batch of `epoch` that the current pipeline reads

    @property
    def in_flight_batches(self) -> int:
        """Batches scheduled ahead of the consumer (DALI's prefetch depth): what a benchmark's
        warm-up takes at least (bench.loader_cadence)."""
        return self.ahead_batches

    # ------------------------------------------------------------------ pipelines
    def epoch_files(self, epoch: int) -> tuple[List[str], List[int]]:
        """This rank's files of `epoch`, in reading order; a file that failed mid-run is replaced by
        the next good file of its batch (cyclically), so batch sizes and counts never change."""
        ds = self.dataset
        block = epoch_block(len(ds), self.data.seed, epoch, self.rank, self.steps_per_epoch * self.batch_size)
        files, labels = [ds.files[i] for i in block], [ds.labels[i] for i in block]
        if self.midrun_bad:
            n = self.batch_size
            for start in range(0, len(files), n):
                good = [j for j in range(start, start + n) if files[j] not in self.midrun_bad]
                if not good:  # a whole batch gone bad: borrow from the block's good files
                    good = [j for j in range(len(files)) if files[j] not in self.midrun_bad][:1]
                    if not good:
                        raise DataError(f"every file of rank {self.rank}'s epoch {epoch} failed to decode")
                for j in range(start, start + n):
                    if files[j] in self.midrun_bad:
                        k = next((g for g in good if g > j), good[0])
                        files[j], labels[j] = files[k], labels[k]
        return files, labels

    def data_identity(self) -> Optional[dict]:
        """datasets.dataset_identity of the files the epochs are drawn from; None for webdataset."""
        return dataset_identity(self.dataset) if self.dataset is not None else None

    def _replace_failed(self, err: BaseException) -> bool:
        """After DALI failed a batch: decode the files of the first batch not handed out and of the
        batches in flight behind it with PIL (check_image), and where PIL decodes them all, with
        DALI's own decoder (undecodable); replace the bad ones and rebuild the rest of the epoch from
        that batch. False when every file decodes both ways (the error is not the data's: the caller
        re-raises)."""
        if self.dataset is None:
            return False
        files, _ = self.epoch_files(self.epoch)
        b, n = self.step_in_epoch, self.batch_size
        window = files[b * n:(b + 2 + self.ahead_batches) * n]
        found = failed_files(window, self.data, _device_id(self.device))
        if not found:
            return False
        for path, reason in found.items():
            self.midrun_bad[path] = reason
            self.bad_reasons[path] = reason
            if path not in self.bad_files:
                self.bad_files.append(path)
            print(f"fast-ressl: rank {self.rank}: {path} failed to decode mid-run ({reason}); replaced "
                  f"within its batch (epoch {self.epoch}, batch {b}); `fast-ressl scan` refreshes the "
                  f"denylist", file=sys.stderr)
        self._drop_ahead()
        self._close()
        self.segment_start = b
        self._pipe, self._iter = self._make(self.epoch, None, prepare_first_batch=False)
        self.builds.append(("segment", self.epoch))
        return True

    def _next_output(self) -> dict:
        """The pipeline's next batch; a batch DALI fails because of a bad file is read again with
        the file replaced (a few files at most per failure; gives up after 100 in a row)."""
        for _ in range(100):
            try:
                return next(self._iter)[0]
            except StopIteration:
                raise
            except Exception as err:  # noqa: BLE001 - DALI raises RuntimeError for a failed batch
                if not self._replace_failed(err):
                    raise
        raise DataError(f"rank {self.rank}: 100 batches in a row failed to decode in epoch {self.epoch}")

    def _build(self, epoch: int, checkpoint: Optional[bytes]) -> None:
        """Build `epoch`'s pipeline here, on the caller's thread (start-up, restore)."""
        self._close()
        self._pipe, self._iter = self._make(epoch, checkpoint, prepare_first_batch=False)
        self.builds.append(("sync", epoch))

    def _make(self, epoch: int, checkpoint: Optional[bytes],
              prepare_first_batch: bool, start: Optional[int] = None) -> Tuple[object, DALIGenericIterator]:
        """A built pipeline for `epoch` (from `checkpoint` if given) and its iterator; touches no
        loader state, so it can run on the ahead thread. With prepare_first_batch the iterator runs
        the pipeline to its first batch in its constructor (DALI keeps the checkpoint semantics:
        `checkpoints()` is the initial one until a batch is consumed). `start`: the epoch's first
        batch this pipeline reads (default: the current segment's for the current epoch, else 0)."""
        if start is None:
            start = self.segment_start if epoch == self.epoch else 0
        seed = _epoch_seed(self.data.seed, epoch, self.rank) if not start else \
            int(np.random.SeedSequence([self.data.seed, epoch, self.rank, start]).generate_state(1)[0] & 0x7FFFFFFF)
        common = dict(batch_size=self.batch_size, num_threads=self.data.num_threads,
                      device_id=_device_id(self.device), seed=seed,
                      prefetch_queue_depth=self.data.prefetch_queue_depth,
                      enable_checkpointing=True, checkpoint=checkpoint)
        if self.data.source == "webdataset":
            pipe = train_pipeline(self.data, "webdataset", gpu=self.gpu, debug=self.debug,
                                  wds_paths=self.wds_paths, wds_index=self.wds_index,
                                  shard_id=(self.rank + epoch) % self.world_size,
                                  num_shards=self.world_size, shuffle_buffer=self.data.shuffle_buffer,
                                  **common)
        else:
            files, labels = self.epoch_files(epoch)
            skip = start * self.batch_size  # a segment reads the epoch from its failed batch on
            pipe = train_pipeline(self.data, "files", gpu=self.gpu, debug=self.debug, files=files[skip:],
                                  labels=labels[skip:], **common)
        pipe.build()
        it = DALIGenericIterator(pipe, self.output_map, size=-1, auto_reset=False,
                                 prepare_first_batch=prepare_first_batch)
        return pipe, it

    def end_at(self, step: int) -> None:
        """The run stops after `step` batches in all (train.epochs, train.stop_at_step): no pipeline
        is built ahead for an epoch it never reaches. On a GPU such a build allocates the decoder's
        buffers (see above: GiBs at 12 threads) and decodes a batch, at the end of the run, beside
        the final kNN check's own pipeline, and the process waits for it before it can exit."""
        self.end_epoch = -(-step // self.steps_per_epoch)

    def _start_ahead(self) -> None:
        epoch = self.epoch + 1
        self.builds.append(("ahead", epoch))
        # start=0 given, not read on the side thread: the main thread moves to the next epoch
        # (epoch, then segment_start) while this build may run
        self._ahead = _Ahead(epoch, lambda: self._make(epoch, None, prepare_first_batch=True, start=0))

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            try:
                self._ahead.get()  # never leave a build running under a pipeline we replace
            except Exception:  # noqa: BLE001 - its epoch is not going to be read
                pass
            self._ahead = None

    def close(self) -> None:
        """Join a build in flight and drop the pipelines (the benchmark does, between measurements);
        a later next() rebuilds from the current position, as after a restore."""
        self.load_state_dict(self.state_dict())

    def _close(self) -> None:
        self._iter = None
        if self._pipe is not None:
            del self._pipe
            self._pipe = None

    # ------------------------------------------------------------------ iteration
    def next_batch(self) -> Batch:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
            self.segment_start = 0
            self._close()
            if self._ahead is not None and self._ahead.epoch == self.epoch:
                t0 = time.perf_counter()
                ready = self._ahead.done()
                ahead, self._ahead = self._ahead, None
                try:
                    self._pipe, self._iter = ahead.get()
                except Exception as err:  # noqa: BLE001 - its first batch failed: a bad file?
                    if not self._replace_failed(err):
                        # no file to blame: the build itself failed on its thread, e.g. out of
                        # device memory while the old pipeline still held its buffers (they
                        # coexist there). Build the epoch here instead, the old one closed; a
                        # failure of that build is the run's error (found in review: one failed
                        # ahead build ended the run at the epoch boundary, and after a resume at
                        # the next one again)
                        print(f"fast-ressl: warning: rank {self.rank}: building epoch {self.epoch}'s "
                              f"pipeline ahead failed ({type(err).__name__}: {str(err)[:200]}); "
                              "building it now", file=sys.stderr, flush=True)
                        self._pipe, self._iter = None, None
                if not ready:
                    self.ahead_wait_s += time.perf_counter() - t0
        if self._iter is None:
            self._drop_ahead()
            self._build(self.epoch, base64.b64decode(self._restore) if self._restore else None)
            self._restore = None
        out = self._next_output()
        self.step_in_epoch += 1
        if (self.build_ahead and self._ahead is None
                and self.steps_per_epoch - self.step_in_epoch <= self.ahead_batches
                and (self.end_epoch is None or self.epoch + 1 < self.end_epoch)):
            self._start_ahead()
        labels = out["labels"]
        if self.data.source == "webdataset":
            labels = parse_ascii_labels(labels)
        else:
            labels = labels.reshape(-1).to(torch.int64)
        if self.debug:
            self.last_debug = {k: out[k].reshape(-1).float() for k in DEBUG_KEYS}
        return Batch(x_weak=_to_torch_image(out["x_weak"], self.dtype),
                     x_strong=[_to_torch_image(out[f"x_strong{i}"], self.dtype)
                               for i in range(len(self.data.strong))],
                     labels=labels)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Plain types only (survives torch.save + torch.load(weights_only=True)). Mid-run bad files
        are stored relative to the data root (a copied dataset resumes too)."""
        root = self.dataset.root if self.dataset is not None and self.dataset.root else ""
        bad = [[os.path.relpath(p, root) if root else p, r] for p, r in sorted(self.midrun_bad.items())]
        if self.step_in_epoch >= self.steps_per_epoch:  # at an epoch boundary: no pipeline state
            return {"epoch": self.epoch + 1, "step_in_epoch": 0, "pipeline": "", "segment": 0, "midrun_bad": bad}
        if self._iter is None:  # nothing handed out since build/restore
            return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                    "pipeline": self._restore or "", "segment": self.segment_start, "midrun_bad": bad}
        cpt = base64.b64encode(self._iter.checkpoints()[0]).decode("ascii")  # protobuf bytes -> str
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "pipeline": cpt,
                "segment": self.segment_start, "midrun_bad": bad}

    def load_state_dict(self, state: dict) -> None:
        self._drop_ahead()
        self._close()
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.segment_start = int(state.get("segment", 0))
        root = self.dataset.root if self.dataset is not None and self.dataset.root else ""
        for rel, reason in state.get("midrun_bad", []):
            path = os.path.normpath(os.path.join(root, rel)) if root else rel
            self.midrun_bad[path] = reason
            self.bad_reasons[path] = reason
            if path not in self.bad_files:
                self.bad_files.append(path)
        self._restore = str(state.get("pipeline") or "") or None  # base64 of DALI's checkpoint
        if self.step_in_epoch > 0 and self._restore is None:
            raise ValueError("loader state has batches handed out but no DALI pipeline checkpoint")


def release_unused_memory() -> None:
    """Return DALI's unused pooled device and pinned host memory (DALI keeps its pools for the
    process after its pipelines are gone; safe while pipelines run, per DALI's documentation)."""
    from nvidia.dali.backend import ReleaseUnusedMemory

    ReleaseUnusedMemory()


class DaliEvalLoader:
    """One pass over a class-folder root (or a FileDataset): (images, labels) batches.

    Images: resize the shorter side to data.eval_resize, center crop data.weak.size (or `size`),
    normalise; channels_last NCHW in data.dtype. Every file is seen exactly once (the last batch is
    smaller); with world_size > 1 each rank sees its shard. Bad files are skipped via the denylist
    scan like training (`bad_files`), and a file that fails in DALI after the scan passed it (gone
    bad since, or one only PIL decodes) is found as in training, reported, added to `bad_files` and
    left out of this pass and later ones: an online kNN check must not end a training run.
    """

    def __init__(self, cfg, root: str | FileDataset, device: torch.device | str = "cpu",
                 batch_size: int = 256, rank: int = 0, world_size: int = 1,
                 size: Optional[int] = None, resize_shorter: Optional[int] = None, progress: bool = True):
        d = cfg.data
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = torch_dtype(d.dtype)
        if isinstance(root, FileDataset):
            ds = root
        else:
            import copy

            sub = copy.deepcopy(cfg)
            sub.data.source, sub.data.root = "folder", os.fspath(root)
            sub.data.denylist = None
            ds = prepare_dataset(sub, rank=rank, progress=progress)
        self.dataset = ds
        self.bad_files = list(ds.bad_files)
        self.batch_size = min(batch_size, max(1, len(ds)))
        self.rank, self.world_size = rank, world_size
        self.size = size or d.weak.size
        self.resize_shorter = resize_shorter or d.eval_resize
        self._shard = ds.block(rank, world_size)

    def __len__(self) -> int:
        return -(-len(self._shard) // self.batch_size)

    @property
    def images(self) -> int:
        """Images a pass yields now: this rank's shard less the files passes have left out."""
        return len(self._shard)

    def _pipeline(self, start: int) -> DALIGenericIterator:
        """The pass from this shard's file `start` on (the rank's files, read as one shard)."""
        d = self.cfg.data
        pipe = eval_pipeline(d, self._shard.files[start:], self._shard.labels[start:], self.size, self.resize_shorter,
                             gpu=self.device.type == "cuda", batch_size=self.batch_size,
                             num_threads=d.num_threads, device_id=_device_id(self.device), seed=d.seed)
        pipe.build()
        # prepare_first_batch=False: the first batch is run by the first next(), inside __iter__'s
        # handler; run in the constructor (the default), a file DALI cannot decode in it escaped
        # the handler and ended the pass (and the run, through the kNN monitor)
        return DALIGenericIterator(pipe, ["images", "labels"], reader_name="Reader", last_batch_policy=_partial(),
                                   prepare_first_batch=False)

    def _drop_failed(self, start: int) -> bool:
        """After DALI failed a batch: the bad files of the batches from `start` on that DALI had in
        flight (PIL first, then DALI's decoder alone), left out from now on; False if none."""
        depth = max(1, int(self.cfg.data.prefetch_queue_depth))
        window = self._shard.files[start:start + (2 + depth) * self.batch_size]
        found = failed_files(window, self.cfg.data, _device_id(self.device))
        for path, reason in found.items():
            report_left_out(path, reason, self.rank)
            self.bad_files.append(path)
        self._shard = self._shard.without(found)
        return bool(found)

    def __iter__(self):
        if not len(self._shard):  # more ranks than files
            return
        done, it = 0, self._pipeline(0)
        while True:
            try:
                out = next(it)[0]
            except StopIteration:
                break
            except RuntimeError:  # DALI failed a batch: a bad file, else not the data's error
                del it
                if not self._drop_failed(done):
                    raise
                if done == len(self._shard):  # the bad files were the pass's last
                    return
                it = self._pipeline(done)
                continue
            x = _to_torch_image(out["images"], self.dtype)
            done += x.shape[0]
            yield x, out["labels"].reshape(-1).to(torch.int64)
        del it


def _partial():
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy

    return LastBatchPolicy.PARTIAL
