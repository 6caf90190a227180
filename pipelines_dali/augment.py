"""ReSSL's views as plain DALI fn-graph functions: decoded uint8 HWC images in, normalised NHWC out.

weak (teacher):    random resized crop -> horizontal flip -> normalise
strong (student):  random resized crop -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p)
                   -> solarize (p, off by default) -> horizontal flip -> normalise

Each op with a probability is made per-sample identity by its arguments instead of splitting the
batch with conditionals (`docs: per-sample arguments that make an op an identity`):
- contrast, as torchvision (and PIL's ImageEnhance.Contrast, which the official code runs), blends
  each image with its own mean grey level: `contrast_own_mean`. DALI's `color_twist` contrast pivots
  on mid-grey (128) instead: on a dark image (mean 60) a factor 0.6 brightened it by ~28 levels
  where torchvision does not (measured); so contrast is its own op, before the colour twist.
- brightness, saturation, hue and grayscale are one fused `color_twist` (a linear colour
  transform): a sample that is not jittered gets brightness = saturation = 1, hue = 0; a gray
  sample gets saturation 0 (luma replicated to 3 channels). Remaining differences from
  torchvision's ColorJitter: a fixed order (contrast, then brightness, saturation, hue; torchvision
  draws a random order: contrast and brightness commute without clipping, the rest nearly), and
  grayscale before the jitter's final clamp. Hue is in degrees (`augment.hue=0.1` of the circle is
  +-36 degrees) and DALI rotates it in YIQ where torchvision rotates in HSV: the same nominal shift
  moves a pixel's HSV hue by a different amount (measured 25-50 degrees for a nominal 36, mean 36.8),
  so the hue jitter's distribution matches in mean, not per pixel.
- blur is the exception: `if coin:` (DALI conditionals, `enable_conditionals=True` in the
  pipeline) so that only the chosen half of the batch pays for the kernel.
- flip is fused into crop_mirror_normalize (`mirror`).

With `debug=True` the per-sample decisions (0/1 floats) are returned too, for tests.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types

# torchvision RandomResizedCrop's aspect-ratio range
ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)

DALI_DTYPES = {"fp16": types.FLOAT16, "fp32": types.FLOAT, "bf16": types.FLOAT}  # bf16: cast in torch


def coin(p: float):
    """Per-sample 0/1 float with P(1) = p."""
    return fn.cast(fn.random.coin_flip(probability=float(p)), dtype=types.FLOAT)


def _factor(strength: float, apply):
    """torchvision's factor ~ U[max(0, 1 - s), 1 + s] where applied, else 1."""
    if strength <= 0:
        return None
    u = fn.random.uniform(range=[max(0.0, 1.0 - strength), 1.0 + strength])
    return 1.0 + apply * (u - 1.0)


# torchvision's rgb_to_grayscale weights (ITU-R 601 luma), for the contrast's mean grey level
LUMA = (0.2989, 0.587, 0.114)


def contrast_own_mean(images, factor, gpu: bool = False):
    """torchvision's adjust_contrast on uint8 HWC images: factor * x + (1 - factor) * mean_luma(x),
    clamped to [0, 255]; `factor` a per-sample float (1 = identity). mean_luma is the image's mean
    grey level (luma weights as torchvision's grayscale). A few elementwise passes per image."""
    x = fn.cast(images, dtype=types.FLOAT)
    rgb = fn.reductions.mean(x, axes=[0, 1])  # (3,) per-sample channel means
    mean = rgb[0] * LUMA[0] + rgb[1] * LUMA[1] + rgb[2] * LUMA[2]
    f = factor.gpu() if gpu else factor
    out = x * f + mean * (1.0 - f)
    return fn.cast(dmath.clamp(out, 0.0, 255.0), dtype=types.UINT8)


def random_resized_crop(images, crop):
    """crop: a CropConfig (size px, scale_min..scale_max of the image area). Bilinear, antialiased.
    torchvision's area and aspect-ratio draws (10 tries); where none fits (very wide or tall
    images) torchvision takes a centre crop and DALI one of the same size at a random place: DALI
    has no argument for it (found in review: a 100x2000 image gave (100, 133) crops at x 812, 70,
    611, ... where torchvision's is at 933)."""
    return fn.random_resized_crop(images, size=[crop.size, crop.size],
                                  random_area=[crop.scale_min, crop.scale_max],
                                  random_aspect_ratio=list(ASPECT_RANGE),
                                  interp_type=types.INTERP_LINEAR, antialias=True)


def normalize(images, mean: Sequence[float], std: Sequence[float], dtype: str, flip_p: float):
    """Flip (p) + (x/255 - mean)/std in one pass -> NHWC in the output dtype. Returns (images, flip)."""
    flip = fn.random.coin_flip(probability=float(flip_p))
    out = fn.crop_mirror_normalize(images, dtype=DALI_DTYPES[dtype], output_layout="HWC",
                                   mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
                                   mirror=flip)
    return out, flip


def weak_view(images, crop, aug, mean, std, dtype: str):
    """The teacher's view: crop + flip + normalise, nothing else."""
    out, _ = normalize(random_resized_crop(images, crop), mean, std, dtype, aug.flip_p)
    return out


def strong_view(images, crop, aug, mean, std, dtype: str, gpu: bool = False
                ) -> Tuple[object, Dict[str, object]]:
    """The student's view. aug: an AugmentConfig. Returns (images, per-sample decisions)."""
    x = random_resized_crop(images, crop)
    jitter = coin(aug.jitter_p)
    gray = coin(aug.grayscale_p)
    # An op whose probability is 0 is left out of the graph, not run as an identity: the contrast
    # pass and the colour twist cost the same for every sample whatever their factors (a user's
    # jitter_p=0, and bench's `--ablate augment`, which would otherwise still time them).
    jittered = aug.jitter_p > 0
    brightness = _factor(aug.brightness, jitter) if jittered else None
    contrast = _factor(aug.contrast, jitter) if jittered else None
    saturation = _factor(aug.saturation, jitter) if jittered else None
    if aug.grayscale_p > 0:
        keep_colour = 1.0 - gray
        saturation = keep_colour if saturation is None else saturation * keep_colour
    kwargs = {}
    if saturation is not None:
        kwargs["saturation"] = saturation
    if brightness is not None:
        kwargs["brightness"] = brightness
    if contrast is not None:
        x = contrast_own_mean(x, contrast, gpu=gpu)
    if jittered and aug.hue > 0:
        kwargs["hue"] = jitter * fn.random.uniform(range=[-360.0 * aug.hue, 360.0 * aug.hue])
    if kwargs:
        x = fn.color_twist(x, **kwargs)

    # Blur only the chosen samples (a conditional splits the batch): ~10% faster on CPU than a
    # 1-tap identity blur of the others.
    blur_flag = fn.random.coin_flip(probability=float(aug.blur_p), dtype=types.BOOL)
    blur = fn.cast(blur_flag, dtype=types.FLOAT)
    if aug.blur_p > 0:
        if blur_flag:
            x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=[aug.blur_sigma_min, aug.blur_sigma_max]))
        else:
            x = x

    decisions = {"jitter": jitter, "gray": gray, "blur": blur}
    if aug.solarize_p > 0:
        sol = coin(aug.solarize_p)
        s = sol.gpu() if gpu else sol
        xi = fn.cast(x, dtype=types.INT32)
        mask = fn.cast(xi >= int(round(255 * aug.solarize_threshold)), dtype=types.INT32)
        flat = fn.cast(s, dtype=types.INT32)
        x = fn.cast(xi + mask * flat * (255 - 2 * xi), dtype=types.UINT8)
        decisions["solarize"] = sol
    out, flip = normalize(x, mean, std, dtype, aug.flip_p)
    decisions["flip"] = flip
    return out, decisions


def center_view(images, size: int, resize_shorter: int, mean, std, dtype: str):
    """Eval: resize the shorter side to `resize_shorter`, center crop `size`, normalise (no flip)."""
    x = fn.resize(images, resize_shorter=resize_shorter, interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.crop_mirror_normalize(x, crop=[size, size], crop_pos_x=0.5, crop_pos_y=0.5,
                                    dtype=DALI_DTYPES[dtype], output_layout="HWC",
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])
