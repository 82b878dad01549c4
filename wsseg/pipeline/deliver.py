"""The last stages: export what the run trained (and score the deployed models themselves), then score
every producer's masks and draw the overlay grids."""

from __future__ import annotations

import logging

from wsseg.config_schema import RecipeConfig
from wsseg.pipeline.context import RunContext, Stage

log = logging.getLogger("wsseg")


class ExportStage(Stage):
    """ONNX (and INT8) export; the evaluation images are then segmented with the ONNX models themselves,
    so the table shows what export (and INT8) costs in Dice."""

    name = "export"
    reads = ("artifacts", "exports", "config.export", "eval_set")
    writes = ("mask_dirs", "metrics.export")

    def enabled(self, config: RecipeConfig) -> bool:
        return config.export is not None and config.export.enabled

    def main_only(self) -> bool:
        return True

    def run(self, context: RunContext) -> None:
        from wsseg.deploy.onnx_export import export_run_models
        from wsseg.deploy.predict_onnx import write_onnx_masks

        config, layout = context.config, context.layout
        with context.timer("export"):
            calibration_set = None
            if config.segment is not None and config.export.int8:  # INT8 calibrates on the U-Net's training images
                calibration_set = context.catalog.concat(config.segment.train, "segment.train")
            context.metrics["export"] = export_run_models(layout, config.export, context.artifacts, calibration_set,
                                                          context.exports)
        for name, path in (("unet_onnx", layout.model_onnx), ("unet_onnx_int8", layout.model_int8)):
            if path.is_file():
                context.mask_dirs[name] = write_onnx_masks(path, context.eval_set, layout.masks(name))


class EvaluateStage(Stage):
    """Dice and IoU of every producer against the evaluation images' masks, `per_image.csv` and the grids."""

    name = "evaluate"
    reads = ("mask_dirs", "eval_set")
    writes = ("metrics",)

    def main_only(self) -> bool:
        return True

    def run(self, context: RunContext) -> None:
        from wsseg.report_grid import write_run_grids
        from wsseg.stages.evaluate import evaluate_mask_dir, write_per_image_csv

        eval_set = context.eval_set
        if not eval_set.has_masks:
            log.warning("maps.dataset %s has no masks: masks written, nothing to evaluate", eval_set.describe())
            return
        all_rows = []
        with context.timer("evaluate"):
            for name, mask_dir in context.mask_dirs.items():
                rows, summary = evaluate_mask_dir(name, mask_dir, eval_set, context.progress)
                all_rows.extend(rows)
                context.metrics[name] = summary
                log.info("%s: dice %.4f iou %.4f", name, summary["dice"], summary["iou"])
        write_per_image_csv(context.layout.per_image, all_rows)
        with context.timer("report"):
            write_run_grids(context.layout.root, eval_set, all_rows,
                            [m for m in context.mask_dirs if context.layout.maps(m).is_dir()])
