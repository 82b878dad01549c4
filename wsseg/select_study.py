"""How reliably a few labelled images choose the pseudo-mask producer (`wsseg bench select`).

The `select` stage picks the best of many candidates on ten or twenty images, so its choice moves with the
draw of those images. This bench scores every candidate of a run's select grid per image on a larger pool of
labelled *training* images, then replays the select rule on many random draws of `n` images from the pool and
scores each choice on the pool's other images: the Dice a user can expect from `select` at `n` labelled images,
next to the best candidate's. Everything is computed on training images; the evaluation split is not read.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from wsseg.metrics import dice
from wsseg.pipeline.candidates import CRF_LEVEL, Candidate, candidate_maps, choose, grid, leave_one_out_choice
from wsseg.pipeline.context import RunContext
from wsseg.progress import ProgressFn, no_progress
from wsseg.refine import MAP_STEPS, needs_image, refine_map
from wsseg.stages.pseudo_masks import MaskRule, RefinedMap


@dataclass
class PoolScores:
    """Per-image Dice on the pool of every candidate: `per_image[j]` (images) for a fixed or Otsu rule,
    `by_threshold[j]` (images x calibration grid) for a calibrated one."""

    labels: List[str] = field(default_factory=list)
    map_set: List[str] = field(default_factory=list)  # "method size tta": the maps a candidate reads
    refined: List[bool] = field(default_factory=list)  # whether a refinement chain follows the map
    per_image: List[Optional[np.ndarray]] = field(default_factory=list)
    by_threshold: List[Optional[np.ndarray]] = field(default_factory=list)
    # What one image costs the candidate (its maps and its chain, as the select stage measures it); None where
    # unknown (pool records cached before it was measured).
    seconds: List[Optional[float]] = field(default_factory=list)

    def on(self, draw: np.ndarray, rest: np.ndarray):
        """Each candidate's mean Dice on `draw` as `select` scores it (a calibrated threshold leave-one-out),
        and on `rest` as the run would use it (the threshold the whole draw chose)."""
        seen, unseen = [], []
        for scores, table in zip(self.per_image, self.by_threshold):
            if table is None:
                seen.append(scores[draw].mean())
                unseen.append(scores[rest].mean())
            else:  # select's own leave-one-out, so that ties break as they do in a run
                per_image, best = leave_one_out_choice(table[draw].T)
                seen.append(np.mean(per_image))
                unseen.append(table[rest, best].mean())
        return np.array(seen), np.array(unseen)


def score_pool(context: RunContext, pool, progress: ProgressFn = no_progress, workers: int = 1) -> PoolScores:
    """Every candidate of `config.select` on every image of `pool` (labelled training images), one cached
    record per map set (a stopped bench continues). Chains that share their map steps share one refined map per
    image. A calibrated rule needs a mask per grid threshold, so it is left out for chains whose mask steps cut
    graphs (GrabCut): 17 graph cuts per image and map set."""
    from wsseg.pipeline.executor import fingerprint

    config, sel = context.config, context.config.select
    scores = PoolScores()
    sets = list(itertools.product(config.maps.methods, sel.image_sizes, range(len(sel.tta))))
    for method, size, k in progress(sets, total=len(sets), description="candidates on the pool"):
        name = f"{method}-{size}-tta{k}"
        digest = fingerprint(context.producers[method].fingerprint, size, sel.tta[k], sel.refine, sel.threshold_modes,
                             config.pseudo_masks.threshold, grid(config), [r.stem for r in pool.records])
        rows = context.cached(f"select_pool_{name}", digest,
                              lambda: _score_map_set(context, pool, method, size, k, workers))
        for row in rows:
            scores.labels.append(row["candidate"])
            scores.map_set.append(f"{method} {size}px tta{k}")
            scores.refined.append(row["refined"])
            scores.per_image.append(None if row["per_image"] is None else np.array(row["per_image"]))
            scores.by_threshold.append(None if row["by_threshold"] is None else np.array(row["by_threshold"]))
            scores.seconds.append(row.get("seconds_per_image"))
    return scores


def _score_map_set(context: RunContext, pool, method: str, size: int, k: int, workers: int) -> List[Dict]:
    from wsseg.parallel import process_map

    config, sel = context.config, context.config.select
    tta, thresholds = sel.tta[k], grid(config)
    truths = [pool.load_mask(i).astype(bool) for i in range(len(pool))]
    map_set = candidate_maps(context, method, size, tta, pool, f"{method}-{size}-tta{k}", "maps_select_pool")
    rules = [MaskRule(method, CRF_LEVEL if any(s.name == "dense_crf" for s in chain) else
                      config.pseudo_masks.threshold, "fixed", list(chain)) for chain in sel.refine]
    calibrate = ["calibrated" in sel.threshold_modes and not needs_image([s for s in r.steps if s.name not in MAP_STEPS])
                 for r in rules]

    def one(i: int):
        # The map and the image are read once per image; chains with the same map steps share their refined map.
        # A chain's cost is what the select stage counts: reading the map (and the image where a step needs it),
        # its map steps and one mask, whose steps may cut a graph.
        made, rows = {}, []
        start = time.perf_counter()
        image = pool.load_image(i) if any(needs_image(r.steps) for r in rules) else None
        read_image = time.perf_counter() - start
        start = time.perf_counter()
        source = MaskRule(method).refined(pool, i, {method: map_set.folder}).activation
        read = time.perf_counter() - start
        for rule, with_grid in zip(rules, calibrate):
            key = tuple(repr(s) for s in rule.steps if s.name in MAP_STEPS)
            if key not in made:
                start = time.perf_counter()
                made[key] = (refine_map(source, image, rule.steps, {method: source}), time.perf_counter() - start)
            activation, refine_seconds = made[key]
            refined = RefinedMap(activation, image, source)
            start = time.perf_counter()
            mask = rule.mask(refined)
            seconds = (read + (read_image if needs_image(rule.steps) else 0.0) + refine_seconds
                       + time.perf_counter() - start)
            otsu = MaskRule(method, rule.threshold, "otsu", rule.steps)
            rows.append((dice(mask, truths[i]), dice(otsu.mask(refined), truths[i]),
                         [dice(rule.mask(refined, t), truths[i]) for t in thresholds] if with_grid else None, seconds))
        return rows

    per_image = process_map(one, range(len(pool)), workers, description=f"{method} {size}px tta{k}")
    rows = []
    for c, (rule, with_grid) in enumerate(zip(rules, calibrate)):
        seconds = map_set.seconds_per_image + float(np.mean([row[c][3] for row in per_image]))
        for m, mode in enumerate(("fixed", "otsu")):
            if mode in sel.threshold_modes:
                label = Candidate(method, size, tta, list(rule.steps), mode, rule.threshold).label
                rows.append({"candidate": label, "refined": bool(rule.steps), "by_threshold": None,
                             "per_image": [float(row[c][m]) for row in per_image], "seconds_per_image": seconds})
        if with_grid:
            label = Candidate(method, size, tta, list(rule.steps), "calibrated", float("nan")).label
            rows.append({"candidate": label, "refined": bool(rule.steps), "per_image": None,
                         "by_threshold": [[float(v) for v in row[c][2]] for row in per_image],
                         "seconds_per_image": seconds})
    return rows


def select_rule(scores: PoolScores, seen: np.ndarray, refine_top: int, prefer_faster_within: float = 0.0) -> int:
    """The candidate `select` keeps given its means on the drawn images: among the unrefined candidates of every
    map set and the refined ones of the `refine_top` map sets with the best unrefined candidate, the one `choose`
    takes (the best, or with a margin the fastest close to it)."""
    unrefined = [j for j in np.argsort(-seen, kind="stable") if not scores.refined[j]]
    best_sets = list(dict.fromkeys(scores.map_set[j] for j in unrefined))[:refine_top]
    allowed = [j for j in range(len(seen)) if not scores.refined[j] or scores.map_set[j] in best_sets]
    seconds = scores.seconds or [None] * len(seen)
    return allowed[choose([float(seen[j]) for j in allowed], [seconds[j] for j in allowed], prefer_faster_within)]


def replay(scores: PoolScores, n_images: int, draws: int = 1000, refine_top: int = 2, seed: int = 0,
           prefer_faster_within: float = 0.0) -> Dict:
    """`select` replayed on `draws` random draws of `n_images` pool images, each choice scored on the others,
    with what the chosen candidate costs an image (None where a cost is unknown)."""
    n_pool = len(scores.per_image[0]) if scores.per_image[0] is not None else len(scores.by_threshold[0])
    if not 2 <= n_images < n_pool:
        raise ValueError(f"n_images must lie between 2 and the pool's size less one ({n_pool - 1}), got {n_images}")
    rng = np.random.RandomState(seed)
    chosen, best, counts, costs = [], [], {}, []
    for _ in range(draws):
        order = rng.permutation(n_pool)
        seen, unseen = scores.on(order[:n_images], order[n_images:])
        j = select_rule(scores, seen, refine_top, prefer_faster_within)
        chosen.append(unseen[j])
        best.append(unseen.max())
        costs.append(scores.seconds[j] if scores.seconds else None)
        counts[scores.labels[j]] = counts.get(scores.labels[j], 0) + 1
    chosen = np.array(chosen)
    return {"n_images": n_images, "draws": draws, "prefer_faster_within": prefer_faster_within,
            "choice_dice": float(chosen.mean()), "choice_p10": float(np.percentile(chosen, 10)),
            "choice_min": float(chosen.min()), "best_dice": float(np.mean(best)),
            "choice_seconds_per_image": None if None in costs else float(np.mean(costs)),
            "chosen": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def pool_table(scores: PoolScores) -> List[Dict]:
    """Every candidate's mean Dice over the whole pool (a calibrated one at its best grid threshold), best first."""
    rows = []
    seconds = scores.seconds or [None] * len(scores.labels)
    for label, map_set, per_image, table, cost in zip(scores.labels, scores.map_set, scores.per_image,
                                                      scores.by_threshold, seconds):
        mean = float(per_image.mean()) if table is None else float(table.mean(0).max())
        rows.append({"candidate": label, "map_set": map_set, "dice": mean, "seconds_per_image": cost})
    return sorted(rows, key=lambda r: -r["dice"])


def bench_select(run_dir: Path, pool_size: int = 100, n_images: Sequence[int] = (10, 20), draws: int = 1000,
                 out_dir: Optional[Path] = None, data_root=None, pool_seed: int = 0, workers: Optional[int] = None,
                 progress: ProgressFn = no_progress,
                 prefer_faster_within: Optional[Sequence[float]] = None) -> Dict:
    """Score the select grid of a run's recipe on `pool_size` labelled training images (`select.labelled`, drawn
    with `pool_seed`) and replay `select` at each of `n_images`, under each margin of `prefer_faster_within`
    (default: the recipe's `select.prefer_faster_within`). The run's classifier and trained map methods are
    reused from its cache (in a linked copy, `out_dir`, default RUN/select_study); writes select_study.json."""
    from wsseg import distributed as dist
    from wsseg.config import load_recipe
    from wsseg.corrections import link_run
    from wsseg.data import DatasetCatalog
    from wsseg.errors import WssegError
    from wsseg.parallel import cpu_workers
    from wsseg.pipeline.candidates import labelled_sample
    from wsseg.pipeline.executor import StageExecutor
    from wsseg.pipeline.layout import RunLayout
    from wsseg.pipeline.map_methods import ClassifierStage, MapMethodsStage
    from wsseg.stages.common import write_json

    run_dir = Path(run_dir)
    recipe_file = RunLayout(run_dir).config
    if not recipe_file.is_file():
        raise WssegError(f"bench select: {run_dir} holds no config.yaml (a `wsseg recipe run` folder)")
    config = load_recipe(str(recipe_file))
    if config.select is None or config.select.labelled is None:
        raise WssegError(f"bench select: the recipe of {run_dir} has no select.labelled (the labelled training "
                         "images the pool is drawn from)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "select_study"
    out_dir.mkdir(parents=True, exist_ok=True)
    link_run(run_dir, out_dir)
    layout = RunLayout(out_dir)
    context = RunContext(config, layout, StageExecutor(layout, resume=True), DatasetCatalog(data_root, config.on_bad_image),
                         dist.local_device(config.device), progress)
    for stage in (ClassifierStage(), MapMethodsStage()):
        if stage.enabled(config):
            stage.run(context)
    labelled = context.dataset(config.select.labelled, "select.labelled")
    pool = labelled_sample(labelled, pool_size, pool_seed)
    too_big = [n for n in n_images if not 2 <= n < len(pool)]
    if too_big:
        raise WssegError(f"bench select: --n-images {too_big} must lie between 2 and the pool's size less one: the "
                         f"pool holds {len(pool)} images with an object from {labelled.describe()} (--pool {pool_size}), "
                         "and every draw must leave images to score its choice on")
    margins = [config.select.prefer_faster_within] if prefer_faster_within is None else list(prefer_faster_within)
    bad = [m for m in margins if not 0 <= m < 1]
    if bad:
        raise WssegError(f"bench select: --prefer-faster-within {bad} must lie in [0, 1): a Dice margin")
    scores = score_pool(context, pool, progress, cpu_workers(workers))
    result = {"run": str(run_dir), "pool": [r.stem for r in pool.records], "pool_seed": pool_seed,
              "refine_top": config.select.refine_top, "pool_candidates": pool_table(scores),
              "replays": [replay(scores, n, draws, config.select.refine_top, seed=pool_seed, prefer_faster_within=m)
                          for n in n_images for m in margins]}
    write_json(out_dir / "select_study.json", result)
    return result


__all__ = ["PoolScores", "bench_select", "pool_table", "replay", "score_pool", "select_rule"]
