"""The `select` stage picks, on a few labelled images, the producer that is truly best there; the run then
uses its choice, and without labelled images says it used the label-free default."""

import json

import numpy as np
import pytest
from PIL import Image

from wsseg.cams import MAP_METHODS
from wsseg.cams.base import MapMethod
from wsseg.cli.main import main
from wsseg.data import DATASETS
from wsseg.data.base import Record, SegmentationDataset, list_images, require_dir
from wsseg.pipeline.candidates import choose, selection_estimate
from wsseg.pipeline.select import leave_one_out_means


class Squares(SegmentationDataset):
    """Bright squares on dark noise, anywhere in the image: the brightness is the mask."""

    name = "squares"

    def __init__(self, root, split="train"):
        folder = require_dir(root / split / "images", "squares images")
        records = [Record(p.stem, p, 1, p.parent.parent / "masks" / p.name) for p in list_images(folder)]
        super().__init__(records, ["background", "square"], positive_index=1, object_free=())


class Brightness(MapMethod):
    requires_classifier = False

    def __init__(self, sign=1.0):
        self.sign = sign

    def compute(self, images, targets=()):
        grey = images.mean(1).numpy()
        grey = grey * self.sign
        low = grey.min(axis=(1, 2), keepdims=True)
        high = grey.max(axis=(1, 2), keepdims=True)
        return ((grey - low) / np.maximum(high - low, 1e-6)).astype(np.float32)


class Centre(MapMethod):
    requires_classifier = False

    def compute(self, images, targets=()):
        b, _, h, w = images.shape
        y, x = np.mgrid[0:h, 0:w]
        blob = np.exp(-(((x - w / 2) / (0.3 * w)) ** 2 + ((y - h / 2) / (0.3 * h)) ** 2))
        return np.repeat(blob[None].astype(np.float32), b, axis=0)


def _builder(cls, **kwargs):
    def build(model=None, target_layer="auto"):
        return cls(**kwargs)

    build.requires_classifier = False
    return build


@pytest.fixture
def squares(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "squares"
    for split, n in (("train", 12), ("val", 6)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(n):
            image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            mask = np.zeros((64, 64), np.uint8)
            y, x, side = rng.integers(0, 30), rng.integers(0, 30), rng.integers(16, 30)
            mask[y:y + side, x:x + side] = 255
            image[mask > 0] = rng.integers(180, 255, (int((mask > 0).sum()), 3), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"s{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"s{i}.png")
    DATASETS.register("squares")(Squares)
    for name, build in (("bright", _builder(Brightness)), ("dark", _builder(Brightness, sign=-1.0)),
                        ("centre", _builder(Centre))):
        MAP_METHODS.register(name)(build)
    yield root
    DATASETS.unregister("squares")
    for name in ("bright", "dark", "centre"):
        MAP_METHODS.unregister(name)


def _overrides(root, labelled=True):
    dataset = f"{{name: squares, root: {root}, split: %s}}"
    select = (f"select={{labelled: {dataset % 'train'}, n_images: 5, image_sizes: [64], "
              "refine: [[], [{name: largest_component}]]}" if labelled else "select={labelled: null}")
    return ["classifier=null", "maps.method_options={}", "maps.methods=[dark, centre, bright]",
            f"maps.dataset={dataset % 'val'}", "maps.image_size=64", "pseudo_masks.variants=[]",
            "pseudo_masks.calibrate=null", select, "segment.masks=selected", f"segment.train=[{dataset % 'train'}]",
            "segment.image_size=64", "segment.epochs=1", "segment.batch_size=4", "segment.self_training_rounds=2",
            "segment.predict.threshold_mode=fixed", "segment.encoder=tu-test_resnet", "export.enabled=false"]


def test_select_picks_the_truly_best_producer_and_the_run_uses_it(tmp_path, squares):
    out = tmp_path / "run"
    assert main(["recipe", "run", "demo", "--out", str(out), *_overrides(squares)]) == 0
    result = json.loads((out / "select.json").read_text())
    rows = result["candidates"]
    assert result["choice"]["method"] == "bright" and result["choice"]["dice"] > 0.9
    assert result["choice"] == rows[0] and rows[0]["dice"] == max(r["dice"] for r in rows)
    # Every method under every rule was scored, and the refinement only for the best map sets.
    assert {r["method"] for r in rows} == {"bright", "dark", "centre"}
    assert {r["threshold_mode"] for r in rows} == {"fixed", "otsu", "calibrated"}
    assert all(r["method"] == "bright" for r in rows if r["refine"]) or len({r["method"] for r in rows if r["refine"]}) <= 2
    best_dark = max(r["dice"] for r in rows if r["method"] == "dark")
    assert best_dark < 0.3 and all(r["loo_low"] <= r["dice"] <= r["loo_high"] for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected"]["dice"] > 0.9  # the selected producer's masks of the evaluation images
    assert metrics["select"]["choice"]["candidate"] == rows[0]["candidate"]
    # Each candidate keeps its per-image Dice, and the choice is also scored on images it was not chosen on.
    assert all(len(r["per_image"]) == 5 and np.mean(r["per_image"]) == pytest.approx(r["dice"]) for r in rows)
    assert metrics["select"]["choice_unseen_estimate"] > 0.9
    assert (out / "plots" / "select.png").stat().st_size > 0 and (out / "masks" / "selected").is_dir()
    report = (out / "report.md").read_text()
    assert "## Select (5 labelled images, 24 candidates)" in report and rows[0]["candidate"] in report
    assert "not chosen on (nested leave-one-out)" in report
    assert "round 0's labels" in report and "no gain: the last round" in report
    assert "unet" in metrics  # the U-Net learnt from the selected masks
    # The evaluation images were mapped by the chosen method alone: the others were scored on the labelled ones.
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["bright"]
    assert "bright" in metrics and "dark" not in metrics and "centre" not in metrics
    # Rounds are chosen too: the selected masks are perfect here, so round 0's labels cannot gain on them and
    # round 0 is the last, whatever segment.self_training_rounds allows.
    assert metrics["select"]["self_training_rounds"] == 0 and len(metrics["select"]["rounds"]) == 2
    assert metrics["select"]["rounds"][1]["gained"] is False
    assert 0 <= metrics["select"]["rounds"][1]["unet_dice"] <= 1 and "the U-Net's own masks" in report
    # Per-image scores behind each mean, so that other round rules can be judged on finished runs.
    for step in metrics["select"]["rounds"]:
        assert len(step["per_image"]) == 5 and np.mean(step["per_image"]) == pytest.approx(step["dice"])
    assert np.mean(metrics["select"]["rounds"][1]["unet_per_image"]) == pytest.approx(metrics["select"]["rounds"][1]["unet_dice"])
    assert not (out / "stages" / "unet_round1.json").exists() and (out / "masks" / "unet").is_dir()
    # Resumed: the choice comes from the cache.
    assert main(["recipe", "run", "--resume", str(out)]) == 0
    skipped = json.loads((out / "metrics.json").read_text())["resumed_skipped_stages"]
    assert "select" in skipped and "unet_masks" in skipped  # the U-Net's masks are not predicted again
    # Each candidate's cost per image was measured; asked to, the run takes the fastest close to the best, from
    # the same cached scores, and maps with it.
    assert all(r["seconds_per_image"] > 0 for r in rows)
    assert main(["recipe", "run", "--resume", str(out), "select.prefer_faster_within=0.5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    close = [r for r in rows if r["dice"] >= rows[0]["dice"] - 0.5]
    fastest = min(close, key=lambda r: r["seconds_per_image"])
    assert metrics["select"]["choice"]["candidate"] == fastest["candidate"]
    assert "select" in metrics["resumed_skipped_stages"]
    assert (out / "maps" / fastest["method"]).is_dir()
    assert json.loads((out / "select.json").read_text())["choice"]["candidate"] == fastest["candidate"]


@pytest.mark.parametrize("rule", ["unet", "refinement"])
def test_rounds_judged_on_held_out_labelled_images_keep_the_best_rounds_unet(tmp_path, squares, rule):
    import torch

    from wsseg.pipeline.candidates import labelled_sample

    out = tmp_path / "run"
    assert main(["recipe", "run", "demo", "--out", str(out), *_overrides(squares), f"select.rounds_by={rule}",
                 "segment.self_training_refine=[{name: largest_component}]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    steps = metrics["select"]["rounds"][1:]
    assert [s["unet"] for s in steps] == [f"round {k}" for k in range(len(steps))] and 1 <= len(steps) <= 3
    # unet: rounds go on while each U-Net beats the earlier ones; refinement: while a U-Net's refined
    # predictions beat its own masks there. Either way the best U-Net is the run's.
    goes_on = [s["gained"] if rule == "unet" else s["labels_dice"] > s["dice"] for s in steps]
    assert [s["another_round"] for s in steps] == goes_on
    assert all(goes_on[:-1]) and (not goes_on[-1] or len(steps) == 3)
    best = max(range(len(steps)), key=lambda k: (steps[k]["dice"], -k))
    assert metrics["select"]["self_training_rounds"] == best
    assert all(len(s["per_image"]) == 5 and np.mean(s["per_image"]) == pytest.approx(s["dice"]) for s in steps)
    # The refined predictions (the next round's labels) are scored on the held-out images too.
    assert all(len(s["labels_per_image"]) == 5 and np.mean(s["labels_per_image"]) == pytest.approx(s["labels_dice"])
               and 0 <= s["unet_at_labels_threshold"] <= 1 for s in steps)
    assert "its refined predictions (the next round's labels)" in (out / "report.md").read_text()
    run_unet = torch.load(out / "checkpoints" / "unet.pth", map_location="cpu", weights_only=False)["state_dict"]
    best_unet = torch.load(out / "checkpoints" / f"unet_round{best}.pth", map_location="cpu",
                           weights_only=False)["state_dict"]
    assert all(torch.equal(run_unet[k], best_unet[k]) for k in best_unet)
    best_masks = out / "masks" / f"unet_round{best}"
    assert sorted(p.name for p in (out / "masks" / "unet").iterdir()) == sorted(p.name for p in best_masks.iterdir())
    assert all((out / "masks" / "unet" / p.name).read_bytes() == p.read_bytes() for p in best_masks.iterdir())
    assert metrics["unet"]["dice"] == pytest.approx(metrics[f"unet_round{best}"]["dice"])
    # The U-Nets learnt from the twelve training images but the five labelled ones.
    labelled = {r.stem for r in labelled_sample(Squares(squares, "train"), 5, 0).records}
    learnt_from = {p.stem for p in (out / "train_masks").glob("*/*.png")}
    assert len(labelled) == 5 and learnt_from and not learnt_from & labelled
    assert "held-out labelled images" in (out / "report.md").read_text()


def test_every_method_maps_the_evaluation_images_when_asked(tmp_path, squares):
    out = tmp_path / "run"
    overrides = _overrides(squares) + ["select.evaluate_all_methods=true", "segment=null"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["bright", "centre", "dark"]
    assert metrics["dark"]["dice"] < 0.3 < 0.9 < metrics["selected"]["dice"]


def test_what_is_mapped_after_the_choice_does_not_key_the_choice():
    from dataclasses import replace

    from wsseg.config_schema import SelectConfig
    from wsseg.pipeline.executor import fingerprint

    # Runs recorded before the option existed keep their select stage.
    assert fingerprint(SelectConfig()) == fingerprint(replace(SelectConfig(), evaluate_all_methods=True))
    assert fingerprint(SelectConfig()) == fingerprint(replace(SelectConfig(), rounds_by="unet"))
    assert fingerprint(SelectConfig()) != fingerprint(replace(SelectConfig(), n_images=20))


def test_without_labelled_images_the_label_free_default_is_said(tmp_path, squares, caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="wsseg"):
        assert main(["recipe", "run", "demo", "--out", str(out), *_overrides(squares, labelled=False)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["select"]["labelled_images"] == 0 and "label-free default" in metrics["select"]["note"]
    assert metrics["select"]["choice"]["method"] == "dark"  # the first method: nothing measured it
    assert "no labelled images" in caplog.text


def test_leave_one_out_means():
    assert leave_one_out_means([1.0, 0.0, 0.5]) == [0.25, 0.75, 0.5]


def test_leave_one_out_choice_of_a_threshold_is_the_per_image_search_it_replaced():
    """The same thresholds and Dice as choosing, for each left-out image, the grid value whose masks of the others
    score best (`best_grid_threshold`), ties included."""
    from wsseg.metrics import dice
    from wsseg.pipeline.candidates import leave_one_out_choice
    from wsseg.stages.pseudo_masks import best_grid_threshold

    rng = np.random.default_rng(0)
    grid = [0.1, 0.2, 0.3, 0.4, 0.5]
    n = 6
    for trial in range(20):
        truths = [rng.random((4, 4)) < 0.5 for _ in range(n)]
        # Few pixels and few distinct masks: many ties between thresholds.
        masks = {t: [rng.random((4, 4)) < 0.5 if rng.random() < 0.5 else truths[i] for i in range(n)] for t in grid}
        scores = np.array([[dice(masks[t][i], truths[i]) for i in range(n)] for t in grid])
        per_image, best = leave_one_out_choice(scores)
        expected = []
        for i in range(n):
            others = [k for k in range(n) if k != i]
            t, _ = best_grid_threshold(grid, [truths[k] for k in others], lambda t: [masks[t][k] for k in others])
            expected.append(dice(masks[t][i], truths[i]))
        assert per_image == expected
        assert grid[best] == best_grid_threshold(grid, truths, lambda t: masks[t])[0]


def test_the_selection_estimate_scores_each_image_with_the_choice_made_without_it():
    from wsseg.pipeline.candidates import selection_estimate

    # B wins on all three images together (0.4 > 0.333), but without image 1 or image 2 A wins and scores 0 there.
    rows = [{"per_image": [0.4, 0.4, 0.4]}, {"per_image": [1.0, 0.0, 0.0]}]
    assert selection_estimate(rows) == pytest.approx((0.4 + 0.0 + 0.0) / 3)
    assert selection_estimate([{"per_image": [0.5, 0.7]}]) == pytest.approx(0.6)
    assert selection_estimate([{"dice": 0.5}]) is None  # rows from a run before per-image scores were kept


def test_a_calibrated_candidate_makes_each_threshold_and_image_mask_once(tmp_path, squares, monkeypatch):
    """With GrabCut in a chain a mask is a graph cut: the leave-one-out scores reuse one mask per (threshold,
    image) instead of making n - 1 of them again for every left-out image."""
    import wsseg.pipeline.candidates as candidates
    from wsseg.config_schema import RefineStepConfig, TTAConfig

    dataset = Squares(squares, "train")
    truths = [dataset.load_mask(i) for i in range(len(dataset))]
    map_dir = tmp_path / "maps"
    map_dir.mkdir()
    for i, truth in enumerate(truths):
        np.save(map_dir / f"{dataset.records[i].stem}.npy", np.where(truth, 0.8, 0.2).astype(np.float32))
    calls = []
    real_mask = candidates.MaskRule.mask
    monkeypatch.setattr(candidates.MaskRule, "mask", lambda rule, *args: calls.append(1) or real_mask(rule, *args))
    grid = [0.3, 0.5, 0.7]
    base = candidates.Candidate("bright", 64, TTAConfig(), [RefineStepConfig("largest_component")])
    (row,) = candidates.score_rules(base, dataset, truths, map_dir, ["calibrated"], 0.58, grid)
    # One mask per (threshold, image), and one per image at the rule's level: what the candidate's cost times.
    assert len(calls) == (len(grid) + 1) * len(dataset)
    assert row.threshold == 0.3 and row.dice == pytest.approx(1.0)


DATA_KEYS = {"name", "description", "classifier.train", "maps.dataset", "maps.fit_dataset",
             "maps.method_options.ccam.train", "select.labelled", "pseudo_masks.calibrate.dataset", "segment.train"}


def _flat(data, prefix=""):
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in DATA_KEYS:
            out.update(_flat(value, f"{path}."))
        else:
            out[path] = value
    return out


@pytest.mark.parametrize("name", ["polyp_auto", "pets_auto"])
def test_the_dataset_auto_recipes_are_auto_with_other_data(name):
    from wsseg.config import load_recipe, to_dict

    auto, other = _flat(to_dict(load_recipe("auto"))), _flat(to_dict(load_recipe(name)))
    assert auto.keys() == other.keys()
    differ = {key for key in auto if auto[key] != other[key]}
    assert differ and differ <= DATA_KEYS, differ - DATA_KEYS


def test_the_auto_recipe_runs_end_to_end_and_chooses(tmp_path):
    from conftest import TINY_MODEL

    small = "{n: 16, size: 64, negative_fraction: 0.0}"
    overrides = [f"backbone.name={TINY_MODEL}", "backbone.weights=none",
                 "classifier.train.0.options={n: 24, size: 64}", "classifier.image_size=64", "classifier.epochs=1",
                 "classifier.batch_size=8", f"maps.dataset.options={{n: 6, size: 64, negative_fraction: 0.0}}",
                 f"maps.fit_dataset.options={small}", "maps.image_size=64", "maps.batch_size=4",
                 "maps.method_options.ccam.epochs=1", "maps.method_options.ccam.image_size=64",
                 "maps.method_options.ccam.batch_size=8", f"select.labelled.options={small}", "select.n_images=4",
                 "select.image_sizes=[64]", "select.tta=[{}]", "segment.image_size=64", "segment.epochs=1",
                 "segment.batch_size=4", "segment.self_training_rounds=0", "export.int8=false",
                 "pseudo_masks.calibrate.n_images=3"]
    out = tmp_path / "run"
    assert main(["recipe", "run", "auto", "--out", str(out), *overrides]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    choice = metrics["select"]["choice"]
    assert choice["method"] in ("gradcam", "eigencam", "dff", "ccam") and choice["image_size"] == 64
    assert {r["method"] for r in metrics["select"]["candidates"]} == {"gradcam", "eigencam", "dff", "ccam"}
    assert "selected" in metrics and "unet" in metrics and (out / "model.onnx").is_file() and (out / "ccam.onnx").is_file()


def test_bench_select_replays_the_choice_on_draws_from_a_labelled_pool(tmp_path, squares, monkeypatch, capsys):
    from wsseg.config import load_recipe, to_yaml
    from wsseg import select_study

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(load_recipe("demo", _overrides(squares))))
    assert main(["bench", "select", str(run), "--pool", "10", "--n-images", "3", "5", "--draws", "40",
                 "--prefer-faster-within", "0", "0.5"]) == 0
    assert "select replayed on draws from 10 labelled training images" in capsys.readouterr().out
    result = json.loads((run / "select_study" / "select_study.json").read_text())
    assert len(result["pool"]) == 10
    # 3 methods x 1 size x 2 TTA map sets, each unrefined and through largest_component, under three rules.
    rows = result["pool_candidates"]
    assert len(rows) == 36 and rows[0]["candidate"].startswith("bright") and rows[0]["dice"] > 0.9
    assert max(r["dice"] for r in rows if r["candidate"].startswith("dark")) < 0.3
    cost = {r["candidate"]: r["seconds_per_image"] for r in rows}
    assert all(c is not None and c > 0 for c in cost.values())
    best_only = [r for r in result["replays"] if r["prefer_faster_within"] == 0]
    assert [r["n_images"] for r in best_only] == [3, 5]
    for replay in best_only:
        assert replay["draws"] == 40 and sum(replay["chosen"].values()) == 40
        assert replay["choice_min"] <= replay["choice_p10"] <= replay["choice_dice"] <= replay["best_dice"] + 1e-12
        assert replay["choice_dice"] > 0.9 and all(label.startswith("bright") for label in replay["chosen"])
    # A margin replays the same draws and takes, in each, a candidate no dearer than the best: cheaper on average.
    for n in (3, 5):
        strict, loose = (next(r for r in result["replays"] if r["n_images"] == n and r["prefer_faster_within"] == m)
                         for m in (0, 0.5))
        assert loose["choice_seconds_per_image"] <= strict["choice_seconds_per_image"]
    # Stopped and run again: every map set's scores come from the cache.
    monkeypatch.setattr(select_study, "_score_map_set", lambda *a, **k: pytest.fail("scored again"))
    assert main(["bench", "select", str(run), "--pool", "10", "--n-images", "3", "--draws", "5"]) == 0
    assert main(["bench", "select", str(run), "--pool", "10", "--n-images", "10"]) == 2  # no image left to score on


def test_the_replayed_select_rule_refines_only_the_best_map_sets_and_calibrates_leave_one_out():
    from wsseg.pipeline.candidates import leave_one_out_choice
    from wsseg.select_study import PoolScores, replay, select_rule

    scores = PoolScores(labels=["a map", "a refined", "b map", "b refined", "c map", "c calibrated"],
                        map_set=["a", "a", "b", "b", "c", "c"], refined=[False, True, False, True, False, False])
    seen = np.array([0.5, 0.6, 0.4, 0.95, 0.45, 0.3])
    # b's refinement scores best, but b's map is the weakest: with refine_top 1 only a's chain is tried.
    assert scores.labels[select_rule(scores, seen, refine_top=1)] == "a refined"
    assert scores.labels[select_rule(scores, seen, refine_top=3)] == "b refined"
    rng = np.random.default_rng(0)
    table = rng.random((12, 7))  # images x thresholds
    scores.per_image = [rng.random(12) for _ in range(5)] + [None]
    scores.by_threshold = [None] * 5 + [table]
    draw, rest = np.arange(6), np.arange(6, 12)
    seen, unseen = scores.on(draw, rest)
    per_image, best = leave_one_out_choice(table[draw].T)
    assert seen[5] == pytest.approx(np.mean(per_image)) and unseen[5] == pytest.approx(table[rest, best].mean())
    assert seen[0] == pytest.approx(scores.per_image[0][draw].mean())
    out = replay(scores, 4, draws=30)
    assert sum(out["chosen"].values()) == 30 and out["choice_dice"] <= out["best_dice"]
    assert out["choice_seconds_per_image"] is None  # pool records without costs: the best by Dice, cost unknown
    # With costs, a margin takes the fastest candidate close to the best among those select may keep.
    scores.seconds = [1.0, 5.0, 0.5, 0.2, 0.1, 0.3]
    seen = np.array([0.5, 0.6, 0.4, 0.95, 0.45, 0.3])
    assert scores.labels[select_rule(scores, seen, refine_top=1, prefer_faster_within=0.12)] == "a map"
    assert scores.labels[select_rule(scores, seen, refine_top=1, prefer_faster_within=0.16)] == "c map"
    assert scores.labels[select_rule(scores, seen, refine_top=1)] == "a refined"


def test_choose_takes_the_best_or_the_fastest_within_the_margin():
    means, seconds = [0.80, 0.79, 0.70, 0.795], [3.0, 1.0, 0.1, None]
    assert choose(means, seconds) == 0
    assert choose(means, seconds, 0.02) == 1  # 0.1 s is faster but 0.10 below the best; None is not preferred
    assert choose(means, seconds, 0.2) == 2
    assert choose(means, [None, 1.0, 0.1, 0.2], 0.2) == 0  # the best's cost unknown (old cached rows): the best


def test_the_unseen_estimate_replays_the_same_rule():
    # Two candidates on three images: the slow one is best on every pair of images but by 0.01 only.
    rows = [{"per_image": [0.90, 0.90, 0.90], "seconds_per_image": 2.0},
            {"per_image": [0.89, 0.89, 0.50], "seconds_per_image": 0.5}]
    assert selection_estimate(rows) == pytest.approx(0.90)
    # Within 0.3 the fast one wins on every fold: each image is scored under it.
    assert selection_estimate(rows, 0.3) == pytest.approx(np.mean([0.89, 0.89, 0.50]))
    # Within 0.05: left out image 2, the fast one is 0.01 below, chosen; otherwise (0.21 below) the slow one.
    assert selection_estimate(rows, 0.05) == pytest.approx(np.mean([0.90, 0.90, 0.50]))
