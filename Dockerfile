# fast_ressl training image.
#
#   docker build -t fast-ressl:0.1.0 .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --stop-timeout 120 \
#       -v /data/imagenet:/data:ro -v "$PWD/runs:/runs" fast-ressl:0.1.0 \
#       train configs/imagenet_resnet50.yaml data.root=/data/train run.dir=/runs/rn50
#
# Base image: the CUDA "base" image (CUDA runtime + the NVIDIA container environment) plus the very
# pip packages the README installs, rather than an NVIDIA NGC PyTorch container, because:
#  - the requirement source stays setup.py, the same one `make venv`/CI installs, so the image gets
#    torch/torchvision/timm/DALI from the ranges CI tests (torch 2.14 cu130, nvidia-dali-cuda130; there
#    is no lock file, so both resolve the newest releases inside those ranges when they are built);
#    an NGC container ships its own torch build, outside what CI tests, and replacing it would break
#    the apex and DALI builds that are the reason to pick it;
#  - the PyPI torch and DALI wheels carry their own CUDA libraries (cuBLAS, cuDNN, NCCL, nvJPEG as
#    nvidia-* wheels), so only the CUDA runtime and the driver hooks are needed from the base:
#    the "base" flavour (a few hundred MB) instead of an NGC image of ~10 GB or more;
#  - NVIDIA_REQUIRE_CUDA in this base makes the container toolkit refuse a host driver too old for
#    CUDA 13 with a clear message at `docker run`, instead of a late CUDA error in the trainer.
# The cost: no apex. `optim.impl=apex` then falls back to timm's LAMB with a logged reason.
# The tag pins CUDA 13.0.0 on Ubuntu 24.04 (matching the cu130 torch and DALI wheels); add the
# digest shown by `docker buildx imagetools inspect` to pin it bit-for-bit in a release.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

# Distribution packages: python3 + venv (Ubuntu 24.04: Python 3.12, inside setup.py's >=3.10);
# tini, the init that forwards SIGTERM to the trainer and reaps loader worker processes; and gcc,
# libc6-dev (gcc only recommends it: stdlib.h) and python3-dev (Python.h), which torch.compile needs
# at run time on CUDA: Triton builds each kernel's launcher as a Python extension with them, and the
# relation loss is compiled by default (without them the loss runs eagerly, with a warning, and
# model.compile=true is refused; fast_ressl/compiling.py); g++ for the same on the CPU (inductor's
# C++ kernels: the README's CPU smoke test of the image).
# Versions are not pinned (hadolint DL3008): the base tag fixes the Ubuntu release, and the Ubuntu
# archive drops superseded point versions, so exact pins would break every rebuild after a security
# update; none of these packages takes part in the numerics.
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini gcc g++ libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu's python3 is "externally managed" (PEP 668): install into a virtualenv, as the README does.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

WORKDIR /opt/fast_ressl
# Dependencies first, from setup.py alone, so that code edits do not re-download torch: installing
# the project with only setup.py present installs all its install_requires (an empty package).
COPY setup.py ./
# the plot extra (matplotlib): a run's curves.png is drawn at its end, in the container too.
# DL3013 reads ".[plot]" as an unpinned package; it is this project, whose ranges live in setup.py.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[plot]"
# Then the code itself, without touching the dependencies resolved above.
COPY fast_ressl ./fast_ressl
COPY pipelines_dali ./pipelines_dali
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && rm -rf build ./*.egg-info

# A non-root user. UID/GID default to 1000 (the usual first desktop user) so that files written to a
# bind-mounted runs/ belong to that host user; rebuild with --build-arg UID=$(id -u) or run with
# --user to match another one. Ubuntu 24.04 ships a user "ubuntu" with UID 1000: replace it.
ARG UID=1000
ARG GID=1000
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
    && groupadd --gid "$GID" ressl \
    && useradd --uid "$UID" --gid "$GID" --create-home --shell /usr/sbin/nologin ressl \
    && mkdir -p /workspace/runs /runs /cache \
    && chown ressl:ressl /workspace /workspace/runs /runs /cache \
    && chmod 1777 /cache

# Recipes are read relative to the working directory (`train configs/...`); runs/ defaults to
# /workspace/runs unless run.dir points at a mounted volume such as /runs.
WORKDIR /workspace
COPY --chown=ressl:ressl configs ./configs

# Caches in /cache (writable for any --user UID): the bad-file denylist of a read-only dataset
# (fast_ressl/datasets.py writes it under XDG_CACHE_HOME) and the torch.compile/triton kernels.
# Mount a host folder there (-v "$PWD/cache:/cache") so that the next container skips the scan and
# reuses the compiled kernels.
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torchrun's c10d rendezvous (several nodes) gives every
# restart round a store of its own; with one store for all rounds, nodes that count their restarts
# differently failed to connect on the first restart (fast_ressl/dist.py, tests/test_faults.py).
ENV XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TINI_SUBREAPER=1 \
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110 \
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# Numeric (hadolint DL3066): resolvable even when the host has no such user name.
USER ${UID}:${GID}

# `docker stop` sends STOPSIGNAL to PID 1 (tini), which forwards it to the trainer, then SIGKILLs
# after the grace period (`docker stop --time N` / `docker run --stop-timeout N`; default 10 s).
# SIGTERM is the signal the trainer's preemption path is designed around (it arrives with the
# preemption-handling issue): stop at the next step boundary, write one checkpoint, exit 143; give it
# a grace period longer than a checkpoint save.
# Under torchrun (multi-GPU), torchrun forwards SIGTERM to its workers and SIGKILLs them after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch's default: 30); 110 s above fits inside
# `--stop-timeout 120`, leaving the rest for torchrun itself to exit.
STOPSIGNAL SIGTERM
# Exec form: tini is PID 1 and the console script from setup.py receives signals directly (no shell).
ENTRYPOINT ["/usr/bin/tini", "--", "fast-ressl"]
CMD ["--help"]
