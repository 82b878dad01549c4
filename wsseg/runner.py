"""Run a recipe: its stages, in order, in one run directory.

Each stage reads what earlier stages put in the RunContext and keys its work on the fingerprint of what it
read (wsseg.pipeline.executor), so `--resume` skips what is finished and continues what is not; training
stages resume mid-way from their per-epoch state. Under torchrun every rank runs this code: training is
data-parallel, maps and masks are sharded, stages marked `main_only` (export, evaluation) run on rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from wsseg import distributed as dist
from wsseg.config import to_yaml
from wsseg.config_schema import RecipeConfig
from wsseg.data import DatasetCatalog
from wsseg.data.image_cache import ImageCache
from wsseg.environment import describe as describe_environment, environment_report
from wsseg.errors import StageFailure, WssegError
from wsseg.pipeline.context import RunContext, Stage
from wsseg.pipeline.deliver import EvaluateStage, ExportStage
from wsseg.pipeline.executor import StageExecutor, StageTimer, fingerprint  # noqa: F401 (re-exported)
from wsseg.pipeline.layout import RunLayout
from wsseg.pipeline.map_methods import ClassifierStage, MapMethodsStage
from wsseg.pipeline.masks import MapsStage, MaskRulesStage, PseudoMasksStage
from wsseg.pipeline.select import SelectStage
from wsseg.progress import ProgressFn, no_progress
from wsseg.report import bar_chart, markdown_report
from wsseg.stages.common import write_json
from wsseg.stages.self_training import SegmentStage

log = logging.getLogger("wsseg")

#: A recipe's stages in the order they run; each one skips itself when the recipe leaves it out.
RECIPE_STAGES: List[Stage] = [
    ClassifierStage(),   # image labels -> classifier checkpoint
    MapMethodsStage(),   # classifier -> a map producer per maps.methods entry (methods that train, e.g. CCAM, here)
    SelectStage(),       # producers, select.labelled -> the recipe's maps size, TTA and `selected` producer
    MapsStage(),         # producers, maps.dataset -> maps/<method>/
    MaskRulesStage(),    # producers, pseudo_masks -> a rule per producer and variant (calibrated thresholds)
    PseudoMasksStage(),  # rules, maps -> masks/<producer>/, blind references
    SegmentStage(),      # rules, segment -> U-Net (+ self-training rounds) -> masks/unet*/
    ExportStage(),       # trained models -> model.onnx, model.int8.onnx, masks of the ONNX models
    EvaluateStage(),     # every mask folder -> metrics, per_image.csv, overlay grids
]


@dataclass
class RunResult:
    out_dir: Path
    metrics: Dict[str, Dict] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    artifacts: Dict[str, Path] = field(default_factory=dict)


def run_recipe(config: RecipeConfig, out_dir: Path, data_root: Optional[Path] = None,
               progress: ProgressFn = no_progress, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Run every stage the recipe enables; returns metrics per mask producer and stage timings."""
    dist.init_from_env(config.device)
    layout = RunLayout(prepare_run_dir(out_dir, overwrite, resume))
    if dist.is_main():
        layout.config.write_text(to_yaml(config))
    with run_log(layout.log(dist.rank())):
        environment = environment_report()
        log.info("environment: %s", describe_environment(environment))
        if dist.is_main():
            write_json(layout.environment, environment)
        try:
            return execute(config, layout, data_root, progress, resume)
        except (WssegError, KeyboardInterrupt):
            raise  # errors wsseg raises on purpose already name the file or key at fault
        except Exception as exc:
            # The full traceback goes to run.log (INFO: the console shows it with -v only).
            log.info("run stopped by an unexpected error", exc_info=True)
            raise StageFailure(exc, getattr(exc, "wsseg_stage", ""), getattr(exc, "wsseg_image", ""),
                               layout.log(dist.rank()), resume_command(layout.root, data_root)) from exc


def execute(config: RecipeConfig, layout: RunLayout, data_root=None, progress: ProgressFn = no_progress,
            resume: bool = False, stages: Optional[List[Stage]] = None) -> RunResult:
    """Run `stages` (default RECIPE_STAGES) of `config` in `layout`'s folder."""
    started = time.perf_counter()
    device = dist.local_device(config.device)
    log.info("recipe %s on %s (rank %d of %d)", config.name, device, dist.rank(), dist.world_size())
    catalog = DatasetCatalog(data_root, config.on_bad_image,  # every dataset of the run, built once
                             ImageCache(layout.image_cache) if config.image_cache else None)
    context = RunContext(config, layout, StageExecutor(layout, resume), catalog, device, progress)
    context.metrics["skipped_images"] = catalog.skipped
    context.eval_set = context.dataset(config.maps.dataset, "maps.dataset")
    for stage in RECIPE_STAGES if stages is None else stages:
        if not stage.enabled(config):
            continue
        if dist.is_main() or not stage.main_only():
            stage.run(context)
        if stage.main_only():
            dist.barrier()
    if context.executor.skipped:
        context.metrics["resumed_skipped_stages"] = context.executor.skipped
    if catalog.image_cache is not None:  # decodes this process made or saved (data-loader workers not counted)
        context.metrics["image_cache"] = {"hits": catalog.image_cache.hits, "misses": catalog.image_cache.misses}
    # This invocation's wall time (stage timings overlap: a U-Net's threshold calibration is inside its stage).
    context.metrics["wall_s"] = time.perf_counter() - started
    return finish_run(config.name, layout, context.metrics, context.executor.timer.timings, context.artifacts)


def prepare_run_dir(out_dir: Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run folder. An existing non-empty one is an error unless `overwrite` (replace it) or
    `resume` (continue it). Rank 0 decides; every rank gets the same answer."""
    out_dir = Path(out_dir)
    problem = None
    if dist.is_main():
        try:
            if out_dir.exists() and any(out_dir.iterdir()) and not resume:
                if not overwrite:
                    raise WssegError(f"run directory {out_dir} already exists and is not empty; choose another "
                                     "--out, pass --resume to continue it or --overwrite to replace it")
                shutil.rmtree(out_dir)
            if resume and not RunLayout(out_dir).config.is_file():
                raise WssegError(f"cannot resume {out_dir}: it holds no config.yaml")
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except WssegError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot write to run directory {out_dir}: {exc.strerror or exc}"
    problem = dist.broadcast_object(problem)
    if problem:
        raise WssegError(problem)
    return out_dir


@contextlib.contextmanager
def run_log(path: Path):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(previous)


def resume_command(out_dir: Path, data_root: Optional[Path] = None) -> str:
    """The command that continues a stopped run from its last finished stage."""
    import shlex

    root = f" --data-root {shlex.quote(str(data_root))}" if data_root is not None else ""
    return f"wsseg recipe run --resume {shlex.quote(str(out_dir))}{root}"


def finish_run(name: str, layout, metrics: Dict[str, Any], timings: Dict[str, float],
               artifacts: Optional[Dict[str, Path]] = None) -> RunResult:
    """Write metrics.json, report.md and the methods chart (rank 0)."""
    layout = layout if isinstance(layout, RunLayout) else RunLayout(layout)
    if not metrics.get("skipped_images"):
        metrics.pop("skipped_images", None)
    if dist.is_main():
        write_json(layout.metrics, {**metrics, "timings_s": timings})
        layout.report.write_text(markdown_report(name, metrics, timings))
        if any(isinstance(v, dict) and "dice" in v for v in metrics.values()):
            bar_chart(layout.plots / "methods.png", metrics, f"{name}: mask quality")
    return RunResult(layout.root, metrics, timings, dict(artifacts or {}))
