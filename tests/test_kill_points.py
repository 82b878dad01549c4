"""SIGKILL at four points of a run (maps, masks, a self-training round, export); `--resume` then finishes
with the numbers of an uninterrupted run, and no file under its final name is half written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import tiny_demo_overrides

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

# Runs the CLI with one function replaced by one that kills the process on its (after+1)-th call: the kill
# lands at a chosen point of the pipeline, with no test hook in wsseg itself.
KILLING_DRIVER = """
import importlib, os, signal, sys
module, attr, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
target = importlib.import_module(module)
real, calls = getattr(target, attr), [0]
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] > after:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(target, attr, killing)
from wsseg.cli.main import main
sys.exit(main(sys.argv[4:]))
"""

POINTS = {  # where: (module, function, calls that go through before the kill)
    "while maps are written": ("wsseg.stages.maps", "save_map", 2),
    "while masks are written": ("wsseg.stages.pseudo_masks", "write_mask_png", 2),
    "inside a self-training round, its labels made, before it trains": ("wsseg.stages.segment", "train_segmenter", 1),
    "during export, the fp32 model written, before INT8": ("wsseg.deploy.quantize", "quantize_int8", 0),
}


def _overrides():
    return tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "pseudo_masks.variants=[]", "seed=5"]


def _numbers(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {name: {k: v for k, v in value.items() if isinstance(v, (int, float))}
            for name, value in metrics.items() if isinstance(value, dict) and "dice" in value}


def _no_half_written_files(run: Path) -> None:
    for path in run.rglob("*"):
        if path.name.startswith(".") or not path.is_file():
            continue  # temporary names are allowed to stay behind; final names must be whole
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".pth":
            torch.load(path, weights_only=False)
        elif path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
        elif path.suffix == ".json":
            json.loads(path.read_text())


def _run(*argv, driver=None):
    command = [sys.executable, "-c", KILLING_DRIVER, *driver] if driver else [sys.executable, "-m", "wsseg"]
    return subprocess.run(command + list(argv), env=ENV, capture_output=True, text=True, cwd=ROOT)


def test_a_run_killed_at_every_point_in_turn_resumes_to_the_same_numbers(tmp_path):
    """Killed while maps are written; its resume killed while masks are written; that one's inside a
    self-training round; that one's during export; the last resume finishes. Each resume starts from what a
    kill left, and the finished run's numbers are an uninterrupted run's."""
    reference = tmp_path / "reference"
    finished = _run("recipe", "run", "demo", "--out", str(reference), *_overrides())
    assert finished.returncode == 0, finished.stderr[-2000:]
    out = tmp_path / "killed"
    for n, (point, (module, function, after)) in enumerate(POINTS.items()):
        argv = ["recipe", "run", "demo", "--out", str(out), *_overrides()] if n == 0 else \
            ["recipe", "run", "--resume", str(out)]
        killed = _run(*argv, driver=[module, function, str(after)])
        assert killed.returncode == -9, f"the run was not killed {point}: {killed.stderr[-1500:]}"
        assert not (out / "metrics.json").exists()
        _no_half_written_files(out)
        if n == 0:  # the maps written before the kill are kept by the resume, not computed again
            kept = {p: p.stat().st_mtime_ns for p in (out / "maps").rglob("*.npy") if not p.name.startswith(".")}
            assert len(kept) == after
        if n == 1:
            assert {p: p.stat().st_mtime_ns for p in kept} == kept
    resumed = _run("recipe", "run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _numbers(reference), _numbers(out)
    assert got.keys() == expected.keys()
    for producer, values in expected.items():
        for key, value in values.items():
            assert got[producer][key] == pytest.approx(value, abs=1e-6), (producer, key)
    _no_half_written_files(out)
