"""The U-Net stage: a U-Net trained on pseudo-masks (or real masks), then `segment.self_training_rounds`
rounds, each trained on the previous U-Net's confident, refined predictions of the training images.

Round k is keyed on everything it learns from, and recorded as `unet_round<k>` whether or not it is the
last: adding a round to a finished run reuses the U-Nets it already has. The last round's U-Net is
published as `checkpoints/unet.pth`, with how it predicts in `unet.predict.json` beside it; with
`select.rounds_by: unet` or `refinement` the best round's U-Net (on the held-out labelled images) is, and its masks
are `masks/unet`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from wsseg import distributed as dist
from wsseg.config_schema import CLASSIFIER_WEIGHTS, RecipeConfig, SegmentConfig
from wsseg.pipeline.context import RunContext, Stage
from wsseg.pipeline.executor import fingerprint
from wsseg.pipeline.masks import maps_for, rule_digest
from wsseg.stages.unet_predict import Predictors, backend_key

log = logging.getLogger("wsseg")


class SegmentStage(Stage):
    """Train the U-Net (and its self-training rounds); masks of the evaluation images from each."""

    name = "unet"
    reads = ("config.segment", "rules", "producers", "classifier", "eval_set")
    writes = ("mask_dirs", "artifacts.unet", "metrics.unet_training")

    def enabled(self, config: RecipeConfig) -> bool:
        return config.segment is not None

    def run(self, context: RunContext) -> None:
        from wsseg.stages.unet_labels import corrected_mask_files, corrections_digest, pseudo_mask_source, with_corrections

        seg = context.config.segment
        train_set = context.catalog.concat(seg.train, "segment.train")
        rule, map_dirs, upstream = None, None, "ground_truth"
        if seg.masks != "ground_truth":
            rule = context.rules[seg.masks]
            with context.timer("maps_train"):
                map_dirs = {m: maps_for(context, m, train_set, "maps_train", seg.train, only_positives=True)
                            for m in rule.maps_needed}
            # The maps' own digests: a change of size, TTA or fit set must retrain the U-Net, not just remap.
            upstream = rule_digest(context, rule, seg.train)
        chooser = rounds_chooser(context)
        if chooser is not None and chooser.holds_out:  # the rounds are judged on images the U-Nets never saw
            train_set = chooser.held_out(train_set)
            upstream = fingerprint(upstream, "without", sorted(r.stem for r in chooser.dataset.records))
            log.info("select.rounds_by=%s: %d labelled images kept out of the U-Net's training (%d left)",
                     chooser.rule, len(chooser.dataset), len(train_set))
        labels = pseudo_mask_source(train_set, rule, map_dirs, seg.ignore_band,
                                    cache_dir=None if rule is None else
                                    context.layout.labels(seg.masks, fingerprint(upstream, seg.ignore_band)))
        # Hand-corrected masks replace the labels of the images they cover, in every round.
        corrections = corrected_mask_files(seg.corrected_masks) if seg.corrected_masks else {}
        if corrections:
            log.info("segment.corrected_masks: %d corrected masks replace their images' labels", len(corrections))
        labels = with_corrections(labels, train_set, corrections)
        upstream = fingerprint(upstream, corrections_digest(corrections) if corrections else None)
        encoder_from = None
        if seg.encoder_weights == CLASSIFIER_WEIGHTS:
            seg = replace(seg, encoder_weights=str(context.classifier_checkpoint))
            encoder_from = context.classifier_fingerprint
        checkpoint, checkpoints = None, []
        for round_index in range(seg.self_training_rounds + 1):
            checkpoint, labels, upstream = self.round(context, seg, train_set, round_index, labels, upstream,
                                                      encoder_from, checkpoint, corrections, chooser)
            checkpoints.append(checkpoint)
            if labels is None:  # the last round: its labels (or its U-Net) stopped gaining on the labelled images
                break
        if chooser is not None and chooser.holds_out:  # the best round's U-Net and masks are the run's
            checkpoint = checkpoints[chooser.best_round]
            best_masks = context.layout.masks(f"unet_round{chooser.best_round}")
            if dist.is_main():
                shutil.rmtree(context.layout.masks("unet"), ignore_errors=True)
                shutil.copytree(best_masks, context.layout.masks("unet"))
            context.mask_dirs["unet"] = context.layout.masks("unet")
        if dist.is_main():
            publish(checkpoint, context.layout.unet)
        dist.barrier()
        context.artifacts["unet"] = context.layout.unet

    @staticmethod
    def round(context: RunContext, seg: SegmentConfig, train_set, round_index: int, labels, upstream: str,
              encoder_from, previous_checkpoint, corrections=None, chooser=None):
        """Train round `round_index` on `labels`, write its masks; returns its checkpoint and, unless it is
        the last round, the next round's labels (None after the last) and what they are keyed on. With a
        `chooser` (select), a round whose labels do not gain on the labelled images is the last."""
        from wsseg.models.segmenter import save_prediction_settings, with_prediction
        from wsseg.parallel import cpu_workers
        from wsseg.stages.segment import load_segmenter, train_segmenter, write_masks
        from wsseg.stages.unet_labels import confident_mask_source, fill_label_cache, with_corrections

        config, layout = context.config, context.layout
        rounds = seg.self_training_rounds
        last = round_index == rounds
        holds_out = chooser is not None and chooser.holds_out
        name = "unet" if last and not holds_out else f"unet_round{round_index}"
        key = f"unet_round{round_index}"
        probabilities_predict = label_prediction(config.segment)
        digest = fingerprint(round_inputs(config.segment, round_index), config.backbone, config.seed, upstream,
                             round_index, encoder_from)
        round_config = replace(seg, epochs=seg.self_training_epochs or seg.epochs) if round_index else seg
        start_from = previous_checkpoint if round_index and seg.self_training_init == "previous" else None

        def train():
            with context.timer("unet_labels"):
                fill_label_cache(labels, dist.shard(range(len(train_set))), cpu_workers(config.workers),
                                 context.progress)
            dist.barrier()
            result = train_segmenter(round_config, config.backbone, train_set, labels, layout.checkpoints,
                                     context.device, (config.seed if seg.seed is None else seg.seed) + round_index,
                                     context.progress, name=key,
                                     state_tag=digest, start_from=start_from)
            return {"checkpoint": str(result.checkpoint), "metrics": result.metrics}

        with context.timer("unet"):
            result = context.cached(key, digest, train, lambda r: [Path(r["checkpoint"])])
            context.metrics[f"{name}_training"] = result["metrics"]
            checkpoint = Path(result["checkpoint"])
            model, meta = load_segmenter(checkpoint)
            model = model.to(context.device)
            with Predictors(model, context.device, seg.inference_backend, train_set) as predictors:
                label_meta = with_prediction(replace(meta, threshold=seg.threshold), probabilities_predict)
                if not last and chooser is not None and not holds_out and \
                        not chooser.labels_gain(model, label_meta, round_index, predictors.get(label_meta)):
                    last, name = True, "unet"
                meta = predicting_as_configured(context, name, model, meta, predictors)
                if holds_out and not chooser.another_round(model, meta, round_index, predictors.get(meta),
                                                           label_meta, predictors.get(label_meta)):
                    last = True
                if dist.is_main():
                    save_prediction_settings(checkpoint, meta)
                context.mask_dirs[name] = layout.masks(name)
                passes = [(meta, {layout.masks(name): ((), meta.threshold)})]  # one prediction pass per way of predicting
                if not last and seg.self_training_refine:  # the next round's labels, on the evaluation images too
                    context.mask_dirs[f"{name}_refined"] = layout.masks(f"{name}_refined")
                    refined = {layout.masks(f"{name}_refined"): (seg.self_training_refine, seg.threshold)}
                    if (label_meta.input_size, label_meta.flips) == (meta.input_size, meta.flips):
                        passes[0][1].update(refined)
                    else:
                        passes.append((label_meta, refined))

                def write_evaluation_masks():
                    for pass_meta, mask_sets in passes:
                        write_masks(model, pass_meta, context.eval_set, mask_sets, context.device, seg.batch_size,
                                    context.progress, indices=dist.shard(range(len(context.eval_set))),
                                    predictor=predictors.get(pass_meta))
                    return [str(folder) for _, mask_sets in passes for folder in mask_sets]

                # Keyed on the model and how it predicted: a resumed run (or a bench's finished point) reads them.
                masks_digest = fingerprint(digest, [(m, {f.name: v for f, v in sets.items()}) for m, sets in passes],
                                           config.maps.dataset, config.on_bad_image, *backend_key(seg.inference_backend))
                context.cached(f"{name}_masks", masks_digest, write_evaluation_masks, lambda r: [Path(p) for p in r])
                if not last:  # the next round learns from this model's confident pixels
                    prob_dir = probabilities(context, name, model, label_meta, train_set, digest, seg.batch_size,
                                             predictors)
                    labels_fp = fingerprint(digest, seg.confident_band, seg.self_training_refine, probabilities_predict,
                                            *backend_key(seg.inference_backend))
                    labels = with_corrections(
                        confident_mask_source(train_set, prob_dir, seg.confident_band, seg.self_training_refine,
                                              cache_dir=layout.labels(name, labels_fp), threshold=seg.threshold),
                        train_set, corrections or {})  # self-training never overwrites a correction
            dist.barrier()
        # The next round is keyed on this one, and on what made its labels' probabilities.
        upstream = digest if seg.inference_backend == "torch" else fingerprint(digest, seg.inference_backend)
        return checkpoint, None if last else labels, upstream


def rounds_chooser(context: RunContext):
    """Self-training rounds chosen on the `select` images (up to segment.self_training_rounds), when the
    recipe has labelled ones; else every round runs."""
    from wsseg.pipeline.select import RoundChooser

    sel = context.config.select
    if sel is None or sel.labelled is None or not sel.choose_rounds or not context.config.segment.self_training_rounds:
        return None
    return RoundChooser(context)


def label_prediction(seg: SegmentConfig):
    """How U-Nets make the probabilities of the next round's labels: this shapes those labels. How they make
    their masks otherwise (`predict`, unless `self_training_predict` differs), and at which threshold, does not."""
    return replace(seg.self_training_predict or seg.predict, threshold=None, threshold_mode="fixed")


def round_inputs(seg: SegmentConfig, round_index: int) -> SegmentConfig:
    """The part of `segment` round `round_index` learns from. Not the number of rounds: round k of a run with
    more rounds is the final U-Net of one with k. Round 0 learns from the pseudo-masks: how later rounds
    make their labels is not its input."""
    own = replace(seg, self_training_rounds=0, predict=label_prediction(seg), self_training_predict=None)
    if round_index:
        return own
    defaults = SegmentConfig()
    return replace(own, self_training_refine=[], confident_band=defaults.confident_band,
                   self_training_init=defaults.self_training_init, threshold=defaults.threshold,
                   self_training_epochs=defaults.self_training_epochs, predict=defaults.predict)


def probabilities(context: RunContext, name: str, model, meta, train_set, digest: str, batch_size: int,
                  predictors) -> Path:
    """A U-Net's probabilities of its training images, from which the next round's labels are made."""
    from wsseg.stages.segment import write_probabilities

    def write(done):
        todo = [i for i in range(len(train_set)) if train_set.records[i].stem not in done]
        if not todo:  # every probability was written before an interruption
            return
        write_probabilities(model, meta, train_set, prob_dir, context.device, batch_size, context.progress,
                            indices=dist.shard(todo), predictor=predictors.get(meta))
        dist.barrier()

    seg = context.config.segment
    prob_dir = context.layout.probabilities(name)
    digest = fingerprint(digest, label_prediction(seg), *backend_key(seg.inference_backend))
    return context.executor.cached_folder(f"{name}_probabilities", digest, prob_dir, write)


def predicting_as_configured(context: RunContext, name: str, model, meta, predictors):
    """The U-Net's meta as `segment.predict` says, its threshold calibrated on the calibration images if asked
    (prediction settings are not part of a U-Net's fingerprint: a reused U-Net follows the recipe)."""
    from wsseg.models.segmenter import with_prediction
    from wsseg.stages.segment import calibrate_unet_threshold

    seg = context.config.segment
    wanted = with_prediction(replace(meta, threshold=seg.threshold), seg.predict)
    if seg.predict.threshold_mode == "calibrated":
        dataset = context.calibration_images()
        with context.timer("unet_threshold"):
            threshold, curve = calibrate_unet_threshold(model, wanted, dataset,
                                                        context.config.pseudo_masks.calibrate.grid, context.device,
                                                        seg.batch_size, predictors.get(wanted))
        threshold = dist.broadcast_object(threshold)  # every rank thresholds its shard as rank 0 does
        wanted = replace(wanted, threshold=threshold)
        context.record_calibration(name, threshold, len(dataset), curve)
    if wanted != meta:
        log.info("%s: predicts at %d px, flips %s, threshold %.2f (segment.predict)", name, wanted.input_size,
                 wanted.flips or "none", wanted.threshold)
    return wanted


def publish(checkpoint: Path, published: Path) -> None:
    """Make the last round's U-Net (and how it predicts) the run's `unet.pth`: a hard link where the file
    system has them, else a copy; replaced atomically, so the earlier round's file is never written through."""
    from wsseg.models.segmenter import prediction_settings_path

    for source, target in ((checkpoint, published),
                           (prediction_settings_path(checkpoint), prediction_settings_path(published))):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
