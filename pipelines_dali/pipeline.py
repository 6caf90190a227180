"""@pipeline_def wrappers: reader -> decode once -> weak / strong views -> normalised NHWC.

The same graph runs on a GPU (`device="mixed"` decoding, everything after it on the GPU) and in
DALI's CPU-only mode (`device_id=None`). Output order: x_weak, x_strong0..V-1, labels
(+ debug decisions of the first strong view: jitter, gray, blur, flip).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from .augment import center_view, strong_view, weak_view

READER_NAME = "Reader"
DEBUG_KEYS = ("jitter", "gray", "blur", "flip")


def read_files(files: Sequence[str], labels: Sequence[int]):
    """The given files in the given order (shuffling and sharding are done by the caller)."""
    return fn.readers.file(files=list(files), labels=list(labels), random_shuffle=False,
                           name=READER_NAME)


def read_webdataset(paths: Sequence[str], index_paths: Sequence[str], shard_id: int, num_shards: int,
                    shuffle_buffer: int):
    """Tar shards: an image component (jpg/jpeg/png/...) and a `cls` label component.

    The label is the ASCII integer text of `cls`, padded to 12 bytes here and parsed in torch."""
    image, cls = fn.readers.webdataset(
        paths=list(paths), index_paths=list(index_paths),
        ext=["jpg;jpeg;png;JPEG;JPG;webp;bmp", "cls;label"], missing_component_behavior="error",
        random_shuffle=shuffle_buffer > 1, initial_fill=max(1, shuffle_buffer),
        shard_id=shard_id, num_shards=num_shards, name=READER_NAME)
    cls = fn.pad(cls, fill_value=32, shape=[12])  # ' ' padding; parsed by loader.parse_ascii_labels
    return image, cls


def decode(encoded, data, gpu: bool, preallocate: bool = True):
    """Decode once to uint8 RGB HWC (EXIF orientation applied; gray/CMYK/PNG converted to RGB).
    preallocate=False leaves out the GPU decoder's allocation hints (no effect on what it decodes)."""
    if gpu:
        hints = dict(device_memory_padding=data.device_memory_padding,
                     host_memory_padding=data.host_memory_padding,
                     preallocate_width_hint=data.preallocate_width_hint,
                     preallocate_height_hint=data.preallocate_height_hint) if preallocate else {}
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                 hw_decoder_load=data.hw_decoder_load, **hints)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


@pipeline_def
def decode_pipeline(data, files: List[str], gpu: bool = False):
    """The files, in order, through the training pipeline's decoder alone (batch = all of them):
    which of a failed batch's files DALI itself cannot decode (loader.undecodable)."""
    encoded, _ = fn.readers.file(files=list(files), random_shuffle=False)
    return decode(encoded, data, gpu, preallocate=False)


def out_dtype(dtype: str, gpu: bool) -> str:
    """DALI's output dtype. On the CPU, fp16 is produced as fp32 and cast by torch: DALI's CPU
    float16 conversion is slow (measured here: 2 crops + normalise 531 img/s fp16 vs 603 fp32 out,
    full pipeline 296 vs 349), torch's vectorised cast is cheaper than the difference."""
    return dtype if gpu else "fp32"


@pipeline_def(enable_conditionals=True)
def train_pipeline(data, source: str, gpu: bool = False, debug: bool = False,
                   files: Optional[List[str]] = None, labels: Optional[List[int]] = None,
                   wds_paths: Optional[List[str]] = None, wds_index: Optional[List[str]] = None,
                   shard_id: int = 0, num_shards: int = 1, shuffle_buffer: int = 1):
    """data: a DataConfig. source 'files' (files/labels in reading order) or 'webdataset'."""
    if source == "webdataset":
        encoded, labels_out = read_webdataset(wds_paths, wds_index, shard_id, num_shards, shuffle_buffer)
    else:
        encoded, labels_out = read_files(files, labels)
    images = decode(encoded, data, gpu)
    dtype = out_dtype(data.dtype, gpu)
    x_weak = weak_view(images, data.weak, data.augment, data.mean, data.std, dtype)
    x_strong = []
    first_decisions = None
    for crop in data.strong:
        x, decisions = strong_view(images, crop, data.augment, data.mean, data.std, dtype, gpu=gpu)
        x_strong.append(x)
        first_decisions = first_decisions or decisions
    if gpu:
        labels_out = labels_out.gpu()
    outputs = [x_weak, *x_strong, labels_out]
    if debug:
        outputs += [first_decisions[k] for k in DEBUG_KEYS]
    return tuple(outputs)


@pipeline_def
def eval_pipeline(data, files: List[str], labels: List[int], size: int, resize_shorter: int,
                  gpu: bool = False):
    """Resize shorter side -> center crop -> normalise, in file order; pad_last_batch so that every
    file is read exactly once per epoch (the loader trims the padding). The caller shards `files`."""
    encoded, lab = fn.readers.file(files=list(files), labels=list(labels), random_shuffle=False,
                                   pad_last_batch=True, name=READER_NAME)
    images = decode(encoded, data, gpu)
    x = center_view(images, size, resize_shorter, data.mean, data.std, out_dtype(data.dtype, gpu))
    return x, (lab.gpu() if gpu else lab)
