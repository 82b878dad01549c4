"""What a run ran on: package versions, Python, platform, threads and accelerator.

Recorded in every run directory (`environment.json`, and a line in `run.log` per run or resume), since
numbers move with the stack: the same recipe on the same CPU gave a CP-CHILD classifier of accuracy
0.972 in one environment and 0.959 in another (docs/experiments.md)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Dict

# The distributions whose versions can change a run's numbers (decoding, resizing, augmentation, kernels).
PACKAGES = ("wsseg", "torch", "torchvision", "timm", "segmentation-models-pytorch", "grad-cam", "albumentations",
            "albucore", "opencv-python-headless", "opencv-python", "pillow", "numpy", "scikit-learn", "pydensecrf2",
            "onnx", "onnxruntime", "onnxruntime-gpu")


def package_versions() -> Dict[str, str]:
    """Installed version of each of PACKAGES; the ones not installed are left out."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def environment_report() -> Dict:
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": package_versions(),
    }


def describe(report: Dict) -> str:
    """One line for the log: Python, torch threads, accelerator and the package versions."""
    packages = ", ".join(f"{k} {v}" for k, v in report["packages"].items())
    accelerator = f"CUDA {report['cuda']} on {report['gpu']}" if report["cuda"] else "no GPU"
    return f"Python {report['python']}, {report['torch_threads']} torch threads, {accelerator}; {packages}"
