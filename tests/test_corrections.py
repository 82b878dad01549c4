"""`wsseg bench corrections`: the share of training masks a person corrects, chosen by confidence or at random,
and the recipe's U-Net trained again on them; the finished run is left as it was."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_demo_overrides
from wsseg.cli.main import main
from wsseg.corrections import choose_images


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_choose_images_least_confident_first_or_a_seeded_draw():
    confidence = {"a": 0.9, "b": 0.2, "c": 0.5, "d": 0.2}
    assert choose_images(list(confidence), 3, "confidence", confidence) == ["b", "d", "c"]
    drawn = choose_images(list(confidence), 2, "random", confidence, seed=1)
    assert drawn == choose_images(list(confidence), 2, "random", confidence, seed=1) and len(set(drawn)) == 2
    with pytest.raises(Exception, match="--choose must be one of confidence, random"):
        choose_images(list(confidence), 1, "area", confidence)


def test_bench_corrections_retrains_the_unet_on_the_chosen_real_masks(tmp_path, capsys):
    from wsseg.config_schema import DatasetConfig
    from wsseg.data import create_dataset

    run = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + ["segment.masks=gradcam", "pseudo_masks.variants=[]",
                                                     "export.enabled=false", "segment.self_training_rounds=0"]
    assert main(["recipe", "run", "demo", "--out", str(run), *overrides]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    unet_before = _digest(run / "checkpoints" / "unet.pth")
    bench = tmp_path / "bench"
    capsys.readouterr()
    assert main(["bench", "corrections", str(run), "--fractions", "0", "0.5", "--out", str(bench),
                 "--supervised", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "U-Net Dice against hand-corrected training masks" in printed and "fully supervised" in printed
    points = json.loads((bench / "corrections.json").read_text())["points"]
    assert [(p["choose"], p["n_corrected"]) for p in points] == [("none", 0), ("confidence", 8), ("random", 8)]
    assert points[0]["dice"] == pytest.approx(metrics["unet"]["dice"])  # nothing corrected: the run's own U-Net
    # The least confident training masks were replaced by the real ones.
    confidence = json.loads((bench / "train_confidence.json").read_text())
    chosen = sorted(p.stem for p in (bench / "masks" / "confidence-0.5").glob("*.png"))
    assert chosen == sorted(sorted(confidence, key=lambda s: (confidence[s], s))[:8])
    train = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 64}))
    index = {r.stem: i for i, r in enumerate(train.records)}
    for stem in chosen:
        real = train.load_mask(index[stem]) > 0
        assert np.array_equal(np.array(Image.open(bench / "masks" / "confidence-0.5" / f"{stem}.png")) > 0, real)
    # Each corrected point trained a U-Net of its own; the finished run kept its own.
    corrected = [_digest(bench / name / "checkpoints" / "unet.pth") for name in ("confidence-0.5", "random-0.5")]
    assert unet_before not in corrected and _digest(run / "checkpoints" / "unet.pth") == unet_before
    assert (bench / "corrections.png").stat().st_size > 0
    # A second call finds every point in its cache, its U-Net's masks included.
    written = {p: p.stat().st_mtime_ns for p in (bench / "random-0.5" / "masks" / "unet").glob("*.png")}
    assert written
    assert main(["bench", "corrections", str(run), "--fractions", "0", "0.5", "--out", str(bench)]) == 0
    again = json.loads((bench / "corrections.json").read_text())["points"]
    assert [p["dice"] for p in again] == [p["dice"] for p in points]
    assert {p: p.stat().st_mtime_ns for p in written} == written
    # Repeats: repeat 0 is the points above (from the cache), repeat 1 trains each point again with the next
    # U-Net seed and draws other random images.
    capsys.readouterr()
    assert main(["bench", "corrections", str(run), "--fractions", "0", "0.5", "--choose", "random", "--repeats", "2",
                 "--out", str(bench)]) == 0
    assert "(mean of 2 trainings, range)" in " ".join(capsys.readouterr().out.split())  # rich may wrap the title
    data = json.loads((bench / "corrections.json").read_text())
    repeated = {(p["choose"], p["repeat"]): p for p in data["points"]}
    assert sorted(repeated) == [("none", 0), ("none", 1), ("random", 0), ("random", 1)]
    assert repeated[("random", 0)]["dice"] == points[2]["dice"]
    assert _digest(bench / "none-r1" / "checkpoints" / "unet.pth") != unet_before
    # Only the U-Net's seed changed: every stage before it came from the run's cache.
    skipped = json.loads((bench / "none-r1" / "metrics.json").read_text())["resumed_skipped_stages"]
    assert {"classifier", "maps_gradcam", "maps_train_gradcam"} <= set(skipped) and "unet_round0" not in skipped
    draws = [sorted(f.name for f in (bench / "masks" / name).glob("*.png")) for name in ("random-0.5", "random-0.5-r1")]
    assert len(draws[1]) == 8 and draws[0] != draws[1]
    summary = {r["choose"]: r for r in data["summary"]}
    for choose in ("none", "random"):
        dices = [repeated[(choose, r)]["dice"] for r in (0, 1)]
        assert summary[choose]["repeats"] == 2 and summary[choose]["dice"] == pytest.approx(np.mean(dices))
        assert (summary[choose]["dice_low"], summary[choose]["dice_high"]) == (min(dices), max(dices))
    assert main(["bench", "corrections", str(run), "--repeats", "0", "--out", str(bench)]) != 0
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err


def test_the_supervised_reference_is_a_run_folder_or_a_recorded_dice(tmp_path):
    from wsseg.cli.bench import _supervised_dice
    from wsseg.errors import WssegError

    assert _supervised_dice(None) is None and _supervised_dice("0.863") == pytest.approx(0.863)
    (tmp_path / "metrics.json").write_text(json.dumps({"unet": {"dice": 0.91}}))
    assert _supervised_dice(str(tmp_path)) == pytest.approx(0.91)
    with pytest.raises(WssegError, match="a Dice lies in"):
        _supervised_dice("86.3")
    with pytest.raises(WssegError, match="nowhere/metrics.json does not exist"):
        _supervised_dice(str(tmp_path / "nowhere"))
