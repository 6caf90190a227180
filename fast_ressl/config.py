"""Typed configuration: the dataclasses below hold the only defaults.

A run's config = defaults <- YAML recipe <- dotted `key=value` overrides, merged by OmegaConf
structured configs, so an unknown key or a value of the wrong type is an error that names the key.
Recipes are read with `yaml.safe_load` semantics (a `!!python/object` tag is refused). Invariants that
span several keys are checked in `validate` once the world size is known.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad recipe, override or combination of values; the message names the key."""


# ----------------------------------------------------------------------------- schema
@dataclass
class CropConfig:
    """One random-resized-crop view: output side in px and the crop's area range (fraction of image)."""

    size: int = 224
    scale_min: float = 0.2
    scale_max: float = 1.0


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # any timm model name; built with num_classes=0 (pooled features)
    # Projector Linear(feat, hidden)-ReLU-Linear(hidden, dim) with no BN, as in the official ImageNet code.
    proj_hidden_dim: int = 4096
    proj_dim: int = 512
    # BatchNorm1d after the projector's hidden Linear. Off = the official ImageNet head. On, the demo
    # (1.4k digits, 176 steps) stopped collapsing to a uniform relation (loss stuck at log K) and its
    # kNN rose from 49.3% to 53.2% (measured; see configs/demo.yaml).
    proj_bn: bool = False
    # BatchNorm1d without affine parameters on the projector's output (student and teacher), before
    # the L2 normalisation. Why: in the demo's collapsed runs one direction shared by all keys grew
    # from 33% to 83% of the projection's energy (effective rank 86 -> 15); neither the relation loss
    # nor InfoNCE sees an offset common to every key, but after normalisation it makes every cosine
    # alike, so the relation goes uniform. Centring each batch removes that direction. Off = the
    # official head.
    proj_out_bn: bool = False
    # Extended ReSSL (TPAMI 2024), our reading: Linear-BN-ReLU-Linear on the student only.
    predictor: bool = False
    pred_hidden_dim: int = 4096
    # CIFAR-style ResNet stem (3x3 stride-1 conv, no max-pool) for 32-64 px inputs; ResNets only.
    small_input_stem: bool = False
    # timm ResNets zero the last BN weight of every residual block by default; the official ReSSL
    # code (torchvision, zero_init_residual=False) does not, and that one difference changed the
    # demo's learning curve in a side-by-side run. false = the official init. Only ResNet-family
    # builders take the option; timm's EfficientNet and MobileNetV3 never zero-init a BN (checked:
    # 0 all-zero BN weights at init), so false is their only behaviour and true is refused.
    zero_init_last: bool = False
    # BatchNorm statistics over groups of this many images of the per-rank batch (0 = the whole
    # batch). The official ImageNet run normalised over 32 images per GPU (8 GPUs, shuffle-BN); one
    # GPU at batch 256 with bn_group_size=32 reproduces those statistics: the student's BN splits
    # its batch into groups (SplitBatchNorm), the teacher's batch is shuffled before its grouped BN
    # and unshuffled after (shuffle-BN within the batch).
    bn_group_size: int = 0
    compile: bool = False  # torch.compile the student and teacher networks too
    # torch.compile's mode for the networks (needs compile=true): default | reduce-overhead (CUDA
    # graphs: one launch per compiled graph instead of one per kernel, for launch-bound steps) |
    # max-autotune (CUDA graphs + autotuned kernels; minutes of compiling) |
    # max-autotune-no-cudagraphs. fast_ressl/compiling.py says what the loop does for CUDA graphs.
    compile_mode: str = "default"
    # Teacher BatchNorm across ranks: shuffle (MoCo's shuffle-BN, the original ImageNet recipe), sync
    # (SyncBatchNorm, CUDA only) or local (per-rank batch statistics). auto = local on one rank,
    # shuffle on several.
    teacher_bn: str = "auto"


@dataclass
class MethodConfig:
    queue_size: int = 131072  # K; must be a multiple of the global batch
    tau_s: float = 0.1  # student temperature
    tau_t: float = 0.04  # teacher (sharpened) temperature
    momentum: float = 0.999  # teacher EMA momentum m: teacher <- m*teacher + (1-m)*student
    momentum_schedule: str = "constant"  # constant | cosine (m -> momentum_end over the run)
    momentum_end: float = 1.0
    compile_loss: bool = True  # run ressl_loss through torch.compile; False = eager
    # Extended ReSSL, our reading: InfoNCE (positive = teacher key of the same image, negatives = the
    # queue) for the first `infonce_warmup_epochs`, then the relation loss.
    infonce_warmup_epochs: float = 0.0
    infonce_tau: float = 0.2
    infonce_handover: str = "hard"  # hard | linear (relation weight ramps 0 -> 1 over the warm-up)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.05  # per 256 images; the run uses lr * global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4  # see weight_decay_filter for which parameters get it
    # Which parameters get no weight decay (nor LARS/LAMB adaptation): ndim = every 1-D parameter
    # (norm scales/shifts and biases, the usual modern rule); name = names containing 'bn' or
    # 'bias', as the official ImageNet code (ResNet-50's 4 downsample BN weights, named
    # downsample.1, are decayed); none = decay everything, as the authors' small-data code.
    weight_decay_filter: str = "ndim"
    warmup_epochs: float = 5.0  # linear per-iteration warm-up, then half-cosine to min_lr
    min_lr: float = 0.0
    fused: Optional[bool] = None  # None = use torch's fused kernel where the device supports it
    # Implementation: auto = torch for sgd/adamw, timm for lars/lamb; apex = NVIDIA apex FusedLAMB
    # (lamb only; falls back to timm with a logged reason when apex or CUDA is missing).
    impl: str = "auto"  # auto | torch | timm | apex (allowed per name: OPTIM_IMPLS)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, lamb
    eps: float = 1e-6  # adamw, lamb (LAMB's usual value; torch's AdamW default is 1e-8)
    trust_coeff: float = 0.001  # lars: trust coefficient eta of the layer-wise LR


@dataclass
class AugmentConfig:
    """The strong (student) view's colour pipeline, MoCo-v2 style; probabilities per image."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # fraction of the full hue circle as in torchvision (0.1 = +-36 degrees)
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on the [0, 1] intensity scale
    flip_p: float = 0.5  # horizontal flip, both views


@dataclass
class DataConfig:
    source: str = "folder"  # synthetic | folder | filelist | webdataset | embedded
    loader: str = "dali"  # dali | torch (torchvision reference loader)
    root: Optional[str] = None  # class-folder root, file-list base dir or shard dir
    file_list: Optional[str] = None  # `path label` lines (source=filelist)
    num_samples: int = 1281167  # synthetic source: images per epoch (ImageNet-1k train size)
    num_classes: int = 1000  # synthetic source: label range
    weak: CropConfig = field(default_factory=CropConfig)  # the one teacher view
    strong: List[CropConfig] = field(default_factory=lambda: [CropConfig()])  # V student views
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    dtype: str = "fp16"  # loader output: fp16 | bf16 | fp32
    num_threads: int = 4  # DALI CPU threads / torch DataLoader workers per rank
    seed: int = 0  # shuffling and augmentation seed (combined with the epoch and rank)
    # DALI on a GPU: share of JPEGs on the hardware decoder, and allocation hints for ImageNet
    # (NVIDIA's ResNet-50 example's paddings; DALI preallocates one device buffer of
    # device_memory_padding and two pinned host buffers of host_memory_padding per thread).
    hw_decoder_load: float = 0.65
    device_memory_padding: int = 211025920
    host_memory_padding: int = 140544512
    preallocate_width_hint: int = 5980
    preallocate_height_hint: int = 6430
    prefetch_queue_depth: int = 2
    max_bad_fraction: float = 0.01  # stop before training if more files than this share are bad
    eval_resize: int = 256  # eval pipeline: shorter side, then center crop of weak.size
    # Bad files: decode everything once before the first epoch unless a denylist exists (see
    # fast_ressl/datasets.py); denylist None = beside the data if writable, else ~/.cache/fast_ressl.
    scan: bool = True
    denylist: Optional[str] = None
    # source=embedded: where the demo JPEG folders are materialised on first use (train/ and val/).
    embedded_dir: str = "data/embedded"
    shuffle_buffer: int = 4096  # source=webdataset: DALI reader's shuffle buffer (samples)
    val_root: Optional[str] = None  # class folders for kNN/linear eval (embedded: <embedded_dir>/val)


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256  # global (all ranks); per rank = batch_size // world_size
    # auto | bf16 | fp16 (with GradScaler) | fp32. auto = bf16 on CUDA, fp32 on CPU, where bf16
    # autocast ran end to end at 33 img/s vs fp32's 59 (2-core CPU, benchmarks/RESULTS.md); resolved
    # once the device is known (train.resolve_precision): config.yaml and checkpoints hold the result.
    precision: str = "auto"
    channels_last: bool = True
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (bitwise resume on GPU costs speed)
    log_every: int = 50  # steps between host syncs for metrics
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # numbered checkpoints kept (newest), besides last.pt
    max_nonfinite_steps: int = 20  # stop the run after this many non-finite losses in a row
    dist_timeout_s: float = 600.0  # a collective waiting longer (e.g. a dead peer) raises, no hang
    # Stop this invocation at this global step; schedules still span `epochs`. For smoke runs.
    stop_at_step: Optional[int] = None


@dataclass
class RunConfig:
    name: str = "ressl"  # run directory is runs/<name> unless `dir` is set
    dir: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalConfig:
    """Online kNN monitor (fast_ressl/evaluate.py): weighted kNN on L2-normalised backbone features."""

    knn_every_epochs: int = 1  # 0 = off; needs labelled eval data (embedded, or folder + data.val_root)
    knn_k: int = 200
    knn_t: float = 0.1  # vote weight exp(similarity / T)
    knn_train_samples: int = 10000  # fixed random labelled training subset (0 = all)
    knn_val_samples: int = 0  # 0 = the whole validation set
    knn_compare_random: bool = False  # at the end: also the same backbone randomly initialised
    batch_size: int = 256
    cache_mb: int = 1024  # keep decoded eval crops in memory when they fit (small data)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys that only steer one invocation; they may change on resume without changing the run.
RUN_CONTROL_KEYS = ("train.stop_at_step", "train.log_every", "run.device", "train.keep_checkpoints",
                    "train.dist_timeout_s",
                    # the kNN monitor only reads the weights: its settings never change the run
                    "eval.knn_every_epochs", "eval.knn_k", "eval.knn_t", "eval.knn_train_samples",
                    "eval.knn_val_samples", "eval.knn_compare_random", "eval.batch_size", "eval.cache_mb")

_CHOICES = {
    "method.momentum_schedule": ("constant", "cosine"),
    "model.teacher_bn": ("auto", "shuffle", "sync", "local"),
    "model.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "method.infonce_handover": ("hard", "linear"),
    "optim.name": ("sgd", "lars", "lamb", "adamw"),
    "optim.impl": ("auto", "torch", "timm", "apex"),
    "optim.weight_decay_filter": ("ndim", "name", "none"),
    "data.source": ("synthetic", "folder", "filelist", "webdataset", "embedded"),
    "data.loader": ("dali", "torch"),
    "data.dtype": ("fp16", "bf16", "fp32"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "run.device": ("auto", "cpu", "cuda"),
}


# Which optim.impl each optim.name can use (auto picks the first of the others).
OPTIM_IMPLS = {"sgd": ("auto", "torch"), "adamw": ("auto", "torch"), "lars": ("auto", "timm"),
               "lamb": ("auto", "timm", "apex")}


# ----------------------------------------------------------------------------- loading
class _SafeLoader(yaml.SafeLoader):
    """safe_load semantics; only the plain YAML tags are understood."""


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not a safe YAML recipe: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_SafeLoader) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _merge(base: DictConfig, data: dict, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}: bad key or value at '{key}': {msg}") from None


def load_config(path: str | os.PathLike | None = None, overrides: List[str] = (),
                world_size: int = 1) -> Config:
    """Defaults <- recipe file <- dotted overrides; validated. Returns a typed `Config` object."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)), str(path))
        if OmegaConf.select(cfg, "run.name") == "ressl" and "name" not in _read_yaml(Path(path)).get("run", {}):
            cfg.run.name = Path(path).stem
    for item in overrides:
        key, value = _parse_override(item)
        cfg = _merge(cfg, _nest(key, value), f"override {item!r}")
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj, world_size)
    return obj


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-key invariants; each error names the key(s) at fault."""
    for key, allowed in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")

    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    t, m, d, o = cfg.train, cfg.method, cfg.data, cfg.optim
    check(t.batch_size > 0, f"train.batch_size={t.batch_size} must be positive")
    check(t.batch_size % world_size == 0,
          f"train.batch_size={t.batch_size} (global) is not divisible by the world size {world_size}")
    check(m.queue_size > 0 and m.queue_size % t.batch_size == 0,
          f"method.queue_size={m.queue_size} must be a positive multiple of the global batch "
          f"train.batch_size={t.batch_size}")
    check(t.epochs > 0, f"train.epochs={t.epochs} must be positive")
    check(t.log_every > 0, f"train.log_every={t.log_every} must be positive")
    check(t.ckpt_every > 0, f"train.ckpt_every={t.ckpt_every} must be positive")
    check(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")
    check(cfg.model.compile or cfg.model.compile_mode == "default",
          f"model.compile_mode={cfg.model.compile_mode} applies to the compiled networks: "
          "add model.compile=true (or leave model.compile_mode=default)")
    e = cfg.eval
    check(e.knn_every_epochs >= 0, "eval.knn_every_epochs must be >= 0 (0 = off)")
    check(e.knn_k >= 1 and e.knn_t > 0, "eval.knn_k must be >= 1 and eval.knn_t positive")
    check(e.knn_train_samples >= 0 and e.knn_val_samples >= 0 and e.batch_size >= 1,
          "eval.knn_train_samples/knn_val_samples must be >= 0 (0 = all) and eval.batch_size >= 1")
    check(m.tau_s > 0 and m.tau_t > 0, "method.tau_s and method.tau_t must be positive")
    check(m.infonce_tau > 0, "method.infonce_tau must be positive")
    check(0.0 <= m.momentum <= 1.0, f"method.momentum={m.momentum} must lie in [0, 1]")
    check(0.0 <= m.momentum_end <= 1.0, f"method.momentum_end={m.momentum_end} must lie in [0, 1]")
    check(m.infonce_warmup_epochs >= 0, "method.infonce_warmup_epochs must be >= 0")
    check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    check(o.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    check(o.weight_decay >= 0, "optim.weight_decay must be >= 0")
    check(o.impl in OPTIM_IMPLS[o.name], f"optim.impl={o.impl} is not available for optim.name={o.name} "
          f"(use one of {', '.join(OPTIM_IMPLS[o.name])})")
    check(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
          f"optim.betas={list(o.betas)} needs two values in [0, 1)")
    check(o.eps > 0 and o.trust_coeff > 0, "optim.eps and optim.trust_coeff must be positive")
    check(len(d.strong) >= 1, "data.strong must list at least one student view")
    for i, crop in enumerate([d.weak, *d.strong]):
        name = "data.weak" if i == 0 else f"data.strong[{i - 1}]"
        check(crop.size > 0, f"{name}.size={crop.size} must be positive")
        check(0 < crop.scale_min <= crop.scale_max <= 1,
              f"{name}: need 0 < scale_min <= scale_max <= 1, got {crop.scale_min}, {crop.scale_max}")
    check(len(d.mean) == 3 and len(d.std) == 3, "data.mean and data.std need 3 values (RGB)")
    for key in ("jitter_p", "grayscale_p", "blur_p", "solarize_p", "flip_p"):
        p = getattr(d.augment, key)
        check(0.0 <= p <= 1.0, f"data.augment.{key}={p} must be a probability in [0, 1]")
    check(0 < d.augment.blur_sigma_min <= d.augment.blur_sigma_max,
          "data.augment: need 0 < blur_sigma_min <= blur_sigma_max")
    check(0 <= d.augment.hue <= 0.5, f"data.augment.hue={d.augment.hue} must lie in [0, 0.5]")
    check(d.num_samples >= t.batch_size, f"data.num_samples={d.num_samples} is smaller than one "
          f"global batch train.batch_size={t.batch_size}")
    check(d.num_threads >= 1, "data.num_threads must be >= 1")
    check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction must lie in [0, 1]")
    check(d.eval_resize >= d.weak.size, f"data.eval_resize={d.eval_resize} must be >= data.weak.size")
    if d.source in ("folder", "webdataset"):
        check(d.root is not None, f"data.source={d.source} needs data.root (a directory)")
    if d.source == "filelist":
        check(d.file_list is not None, "data.source=filelist needs data.file_list")
    check(cfg.model.bn_group_size >= 0, "model.bn_group_size must be >= 0 (0 = the whole per-rank batch)")
    if cfg.model.bn_group_size:
        # SyncBatchNorm normalises the teacher over the whole global batch: it replaced the grouped
        # BN layers and dropped the groups without a word (the student kept them; found in review)
        check(cfg.model.teacher_bn != "sync",
              f"model.teacher_bn=sync normalises the teacher over the global batch, model.bn_group_size="
              f"{cfg.model.bn_group_size} over groups: set model.bn_group_size=0 for sync, or teacher_bn "
              "shuffle/local/auto for groups")
        per_rank = t.batch_size // world_size
        # a per-rank batch no larger than the group is one group (plain BN): 8 GPUs x 32 with 32
        check(per_rank <= cfg.model.bn_group_size or per_rank % cfg.model.bn_group_size == 0,
              f"model.bn_group_size={cfg.model.bn_group_size} must divide the per-rank batch {per_rank} "
              f"(train.batch_size={t.batch_size} over {world_size} rank(s))")
    import timm  # a misspelt backbone is named before a run directory or any data work (it was a
    # traceback from timm.create_model, after the run directory had been made)

    check(timm.is_model(cfg.model.backbone),
          f"model.backbone={cfg.model.backbone!r} is not a timm model (`python -c \"import timm; "
          f"print(timm.list_models('*{cfg.model.backbone[:6]}*'))\"` lists similar names)")
    if cfg.model.small_input_stem:
        check(cfg.model.backbone.startswith("resnet"),
              f"model.small_input_stem needs a ResNet backbone, not {cfg.model.backbone}")


# ----------------------------------------------------------------------------- helpers
def get_key(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what `config.yaml` in the run directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_dict(data: dict) -> Config:
    """Rebuild a typed config from `to_dict` output (e.g. from a checkpoint); validated by schema."""
    cfg = _merge(OmegaConf.structured(Config), data, "stored config")
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def config_hash(cfg: Config) -> str:
    """Hash of everything that defines the run (run-control keys excluded): refuses silent resumes
    of a different experiment."""
    data = to_dict(cfg)
    for key in RUN_CONTROL_KEYS:
        section, name = key.split(".")
        data[section].pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
