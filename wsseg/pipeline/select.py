"""The `select` stage: the run chooses its own pseudo-mask producer on a few labelled training images.

Candidates are every map method of `maps.methods` at each `select.image_sizes` and `select.tta`, each with
each threshold rule (fixed, per-image Otsu, calibrated); the `select.refine_top` best of those map sets are
tried again through every refinement chain of `select.refine`. Maps of the labelled images are computed once
per (method, size, TTA) and shared by every rule and chain. A calibrated threshold is scored leave-one-out (the
threshold chosen on the other images), so no candidate is scored on the images that chose it. The winner by
mean Dice becomes the `selected` producer: the maps of the run are made by its method alone (every method with
`select.evaluate_all_methods`) at its size and TTA, and `segment.masks: selected` trains the U-Net on it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Dict, List

import numpy as np

from wsseg.config_schema import MaskVariantConfig, RecipeConfig, RefineStepConfig, TTAConfig
from wsseg.metrics import dice
from wsseg.pipeline.candidates import (CRF_LEVEL, Candidate, candidate_maps, choose, grid, labelled_set,
                                       leave_one_out_means, score_rules, selection_estimate)
from wsseg.pipeline.context import RunContext, Stage
from wsseg.pipeline.executor import fingerprint
from wsseg.stages.pseudo_masks import MaskRule

log = logging.getLogger("wsseg")
SELECTED = "selected"  # the producer the stage makes (segment.masks: selected)


class SelectStage(Stage):
    """Score the candidate producers on `select.labelled`, then make the recipe use the best one."""

    name = "select"
    reads = ("producers", "config.select", "config.maps", "config.pseudo_masks")
    writes = ("config", "producers", "metrics.select")

    def enabled(self, config: RecipeConfig) -> bool:
        return config.select is not None

    def run(self, context: RunContext) -> None:
        config, sel = context.config, context.config.select
        if sel.labelled is None:
            choice = label_free_default(config)
            log.warning("select: no labelled images (select.labelled), so nothing is chosen by measurement: the "
                        "label-free default (%s) is used", choice.label)
            context.metrics["select"] = {"labelled_images": 0, "choice": choice.row(), "candidates": [],
                                         "note": "label-free default: no labelled images"}
        else:
            with context.timer("select"):
                rows = self.score(context)
            chosen = rows[choose([r["dice"] for r in rows], [r.get("seconds_per_image") for r in rows],
                                 sel.prefer_faster_within)]
            choice = _from_row(chosen)
            estimate = selection_estimate(rows, sel.prefer_faster_within)
            context.metrics["select"] = {"labelled_images": sel.n_images, "choice": chosen, "candidates": rows,
                                         "choice_unseen_estimate": estimate}
            log.info("select: %s (Dice %.3f on %d labelled images, leave-one-out %.3f-%.3f; %d candidates)",
                     chosen["candidate"], chosen["dice"], sel.n_images, chosen["loo_low"], chosen["loo_high"],
                     len(rows))
            if estimate is not None:
                log.info("select: the choice scored on images it was not chosen on (nested leave-one-out): %.3f",
                         estimate)
            write_select_outputs(context, rows, chosen)
        context.config = apply_choice(config, choice)
        if not sel.evaluate_all_methods:
            needed = methods_needed(context.config)
            context.producers = {name: p for name, p in context.producers.items() if name in needed}

    @staticmethod
    def score(context: RunContext) -> List[Dict]:
        """Every candidate's row, best first (cached on the producers, the labelled images and the grid)."""
        config, sel = context.config, context.config.select
        digest = fingerprint({n: p.fingerprint for n, p in context.producers.items()}, sel, config.seed,
                             config.pseudo_masks.threshold, config.maps.fit_dataset, config.on_bad_image,
                             config.pseudo_masks.calibrate.grid if config.pseudo_masks.calibrate else None)

        def work():
            dataset, truths = labelled_set(context)
            scored = []
            map_sets = {}
            for method in config.maps.methods:
                for size in sel.image_sizes:
                    for k, tta in enumerate(sel.tta):
                        map_set = candidate_maps(context, method, size, tta, dataset, f"{method}-{size}-tta{k}")
                        map_sets[(method, size, k)] = map_set
                        scored += score_rules(Candidate(method, size, tta, seconds_per_image=map_set.seconds_per_image),
                                              dataset, truths, map_set.folder,
                                              sel.threshold_modes, config.pseudo_masks.threshold, grid(config))
            best_sets = []
            for c in sorted(scored, key=lambda c: -c.dice):
                key = (c.method, c.image_size, sel.tta.index(c.tta))
                if key not in best_sets:
                    best_sets.append(key)
            for method, size, k in best_sets[:sel.refine_top]:
                for chain in sel.refine:
                    if chain:
                        map_set = map_sets[(method, size, k)]
                        scored += score_rules(Candidate(method, size, sel.tta[k], list(chain),
                                                        seconds_per_image=map_set.seconds_per_image),
                                              dataset, truths, map_set.folder, sel.threshold_modes,
                                              config.pseudo_masks.threshold, grid(config))
            return [c.row() for c in sorted(scored, key=lambda c: -c.dice)]

        return context.cached("select", digest, work)


def methods_needed(config: RecipeConfig) -> set:
    """The map methods whose masks the rest of the run reads: every variant's source (the selected producer's
    among them) and the methods its refinement combines with, and `segment.masks` when it names a method."""
    needed = set()
    for variant in config.pseudo_masks.variants:  # what a variant reads is its rule's to say
        needed.update(MaskRule(variant.source, steps=variant.refine).maps_needed)
    if config.segment is not None:
        needed.add(config.segment.masks)
    return needed & set(config.maps.methods)


def label_free_default(config: RecipeConfig) -> Candidate:
    """Without labelled images: the first map method at the recipe's size and TTA, refined by a dense CRF and
    taken at its 0.5 (what the hand-tuned polyp and pet recipes came to)."""
    return Candidate(config.maps.methods[0], config.maps.image_size, config.maps.tta,
                     [RefineStepConfig("dense_crf")], "fixed", CRF_LEVEL)


def _from_row(row: Dict) -> Candidate:
    return Candidate(row["method"], row["image_size"], TTAConfig(row["tta"]["hflip"], list(row["tta"]["scales"])),
                     [RefineStepConfig(s["name"], None, dict(s["options"])) for s in row["refine"]],
                     row["threshold_mode"], row["threshold"], row["dice"])


def apply_choice(config: RecipeConfig, choice: Candidate) -> RecipeConfig:
    """The recipe as the rest of the run uses it: maps at the chosen size and TTA, the `selected` producer
    (a calibrated threshold is fixed at the value the labelled images chose; Otsu's is each image's own)."""
    otsu = choice.threshold_mode == "otsu"
    variant = MaskVariantConfig(SELECTED, choice.method, list(choice.refine), None if otsu else choice.threshold,
                                "otsu" if otsu else "fixed")
    pseudo_masks = replace(config.pseudo_masks,
                           variants=[v for v in config.pseudo_masks.variants if v.name != SELECTED] + [variant])
    maps = replace(config.maps, image_size=choice.image_size, tta=choice.tta)
    return replace(config, maps=maps, pseudo_masks=pseudo_masks)


class RoundChooser:
    """Whether a self-training round's labels gain on the labelled images: the Dice of the round U-Net's
    refined predictions (the next round's labels) against the previous labels' (round 0: the selected
    pseudo-masks, scored by the select stage). Recorded in metrics.select.rounds."""

    def __init__(self, context: RunContext):
        self.context = context
        self.dataset, self.truths = labelled_set(context)
        self.rule = context.config.select.rounds_by
        # unet and refinement judge the rounds on labelled images the U-Nets never saw, and keep the best U-Net.
        self.holds_out = self.rule in ("unet", "refinement")
        selected = context.metrics.get("select", {}).get("choice", {})
        self.best = float(selected.get("dice", 0.0))
        # Per-image scores are kept so that a rule other than "the mean gained" (a paired test, a margin) can be
        # judged on finished runs.
        self.history = [{"labels": "pseudo-masks", "dice": self.best,
                         "per_image": [float(v) for v in selected.get("per_image", [])]}]
        self.best_unet, self.best_round = -1.0, 0
        context.metrics.setdefault("select", {})["rounds"] = self.history

    def held_out(self, train_set):
        """`rounds_by: unet | refinement`: the U-Net's training images without the labelled ones."""
        from wsseg.pipeline.candidates import without_images

        return without_images(train_set, self.dataset)

    def _probabilities(self, model, meta, predictor):
        """(index, probability at the image's size) of each labelled image, the U-Net predicting as `meta` says."""
        from wsseg.progress import no_progress
        from wsseg.stages.segment import _image_probabilities

        return _image_probabilities(model, meta, self.dataset, self.context.device,
                                    self.context.config.segment.batch_size, no_progress, None, predictor)

    def _label_scores(self, model, label_meta, predictor):
        """Per-image Dice on the labelled images of the round U-Net's refined predictions (the next round's labels)
        and of its own masks at the labels' threshold."""
        from wsseg.stages.unet_labels import refined_mask

        seg = self.context.config.segment
        refined, own = [], []
        for index, prob in self._probabilities(model, label_meta, predictor):
            refined.append(dice(refined_mask(prob, self.dataset, index, seg.self_training_refine, seg.threshold),
                                self.truths[index]))
            own.append(dice(prob >= seg.threshold, self.truths[index]))
        return refined, own

    def another_round(self, model, meta, round_index: int, predictor, label_meta, label_predictor) -> bool:
        """`rounds_by: unet | refinement`: scores round `round_index`'s U-Net, predicting as `meta` says, on the
        labelled images (held out of its training), and its refined predictions there as `label_meta` makes them
        (the next round's labels). Whether another round follows: unet, when this U-Net beats every earlier round's;
        refinement, when its refined predictions beat its own masks. The best U-Net so far is the run's."""
        per_image = [dice(prob >= meta.threshold, self.truths[index])
                     for index, prob in self._probabilities(model, meta, predictor)]
        score = float(np.mean(per_image))
        gained = score > self.best_unet
        refined, own = self._label_scores(model, label_meta, label_predictor)
        labels_score = float(np.mean(refined))
        go_on = gained if self.rule == "unet" else labels_score > score
        self.history.append({"unet": f"round {round_index}", "dice": score, "gained": gained,
                             "per_image": [float(v) for v in per_image], "labels_dice": labels_score,
                             "labels_per_image": [float(v) for v in refined],
                             "unet_at_labels_threshold": float(np.mean(own)), "another_round": go_on})
        earlier = max(self.best_unet, 0.0)
        if gained:
            self.best_unet, self.best_round = score, round_index
        verdict = "another round" if go_on else f"no more rounds; round {self.best_round}'s U-Net is the run's"
        if self.rule == "unet":
            log.info("select: round %d's U-Net %.3f on the held-out labelled images against %.3f: %s", round_index,
                     score, earlier, verdict)
        else:
            log.info("select: round %d's U-Net %.3f on the held-out labelled images, its refined predictions %.3f: %s",
                     round_index, score, labels_score, verdict)
        self.context.metrics["select"]["self_training_rounds"] = self.best_round
        return go_on

    def labels_gain(self, model, meta, round_index: int, predictor) -> bool:
        """`rounds_by: labels`: whether round `round_index`'s refined predictions gain on the labels before."""
        per_image, unrefined = self._label_scores(model, meta, predictor)
        score = float(np.mean(per_image))
        gained = score > self.best
        # The U-Net's own masks there too (no refinement): recorded, not used, so that a rule on them can be
        # judged against this one across runs.
        self.history.append({"labels": f"round {round_index}", "dice": score, "gained": gained,
                             "unet_dice": float(np.mean(unrefined)), "per_image": [float(v) for v in per_image],
                             "unet_per_image": [float(v) for v in unrefined]})
        log.info("select: round %d's labels %.3f on the labelled images against %.3f: %s", round_index, score,
                 self.best, "another round" if gained else f"round {round_index} is the last")
        self.best = max(self.best, score)
        # self-training rounds after round 0: this one is the last, or at least one more follows
        self.context.metrics["select"]["self_training_rounds"] = round_index + 1 if gained else round_index
        return gained


def write_select_outputs(context: RunContext, rows: List[Dict], chosen: Dict) -> None:
    """select.json (every candidate, best first) and plots/select.png (the best 15 and the choice, with their
    spread and cost)."""
    from wsseg import distributed as dist
    from wsseg.stages.common import write_json

    if not dist.is_main():
        return
    layout = context.layout
    write_json(layout.root / "select.json", {"labelled_images": context.config.select.n_images,
                                             "choice": chosen, "candidates": rows})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = (rows[:15] if any(r is chosen for r in rows[:15]) else rows[:14] + [chosen])[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(top) + 1.2))
    y = np.arange(len(top))
    spread = [[r["dice"] - r["loo_low"] for r in top], [r["loo_high"] - r["dice"] for r in top]]
    ax.barh(y, [r["dice"] for r in top], xerr=spread, color=["tab:green" if r is chosen else "tab:blue" for r in top], capsize=2)
    ax.set_yticks(y, [r["candidate"] + _cost_label(r) for r in top], fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"mean Dice on {context.config.select.n_images} labelled images (bars: leave-one-out range)")
    ax.set_title("select: candidate pseudo-mask producers")
    fig.tight_layout()
    layout.plots.mkdir(parents=True, exist_ok=True)
    fig.savefig(layout.plots / "select.png", dpi=120)
    plt.close(fig)


def _cost_label(row: Dict) -> str:
    from wsseg.report import cost_ms

    cost = cost_ms(row)
    return f"  ({cost} ms/image)" if cost else ""


__all__ = ["Candidate", "SELECTED", "SelectStage", "apply_choice", "label_free_default", "leave_one_out_means",
           "methods_needed", "score_rules"]
