"""Bad input at every stage and in deployment: one bad file never costs a job its good results."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL, tiny_demo_overrides
from wsseg.cli.main import main

BAD_FILES = ("truncated.jpg", "zero.jpg", "text.jpg")


def _good_image(rng, size=64):
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


def _add_bad_files(folder: Path) -> None:
    """A truncated JPEG, a zero-byte file and a text file named .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_good_image(np.random.default_rng(9))).save(folder / "truncated.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "truncated.jpg").read_bytes()[:300])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")


def _class_folders(root: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("pos", "neg"):
        for i in range(n):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_good_image(rng)).save(root / cls / f"{cls}{i}.jpg")
    _add_bad_files(root / "pos")
    return root


def _masked_folder(root: Path, n: int = 8) -> Path:
    """Kvasir-SEG layout; the bad images have masks, so only the image is at fault."""
    rng = np.random.default_rng(2)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    for i in range(n):
        Image.fromarray(_good_image(rng)).save(root / "images" / f"k{i}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"k{i}.png")
    _add_bad_files(root / "images")
    for name in BAD_FILES:
        Image.fromarray(mask).save(root / "masks" / f"{Path(name).stem}.png")
    return root


def _bad_data_overrides(tmp_path: Path):
    classes = _class_folders(tmp_path / "cls")
    ccam_set = _masked_folder(tmp_path / "ccam")
    unet_set = _masked_folder(tmp_path / "unet")
    keep = [o for o in tiny_demo_overrides(("ccam", "gradcam"))
            if not o.startswith(("classifier.train.0.options", "classifier.val", "maps.method_options.ccam.train",
                                 "segment.train",
                                 "export"))]
    return keep + [
        "classifier.val=null", "classifier.train.0.name=class_folders", f"classifier.train.0.root={classes}",
        "classifier.train.0.split=null", "classifier.train.0.options={positive: pos}",
        "maps.method_options.ccam.train.0.name=kvasir_seg", f"maps.method_options.ccam.train.0.root={ccam_set}",
        "maps.method_options.ccam.train.0.split=null", "maps.method_options.ccam.train.0.options={}",
        "maps.method_options.ccam.epochs=1",
        "segment.train.0.name=kvasir_seg", f"segment.train.0.root={unet_set}", "segment.train.0.split=null",
        "segment.train.0.options={}", "segment.masks=gradcam", "segment.self_training_rounds=0",
        "pseudo_masks.variants=[]", "export.int8=true", "export.calibration_images=20"]


def test_on_bad_image_reaches_every_dataset_of_a_run(tmp_path, capsys):
    overrides = _bad_data_overrides(tmp_path)
    assert main(["recipe", "run", "demo", "--out", str(tmp_path / "strict"), *overrides]) == 2
    err = capsys.readouterr().err
    assert "cls/pos/" in err and any(name in err for name in BAD_FILES), err  # the first bad file, by name

    out = tmp_path / "lenient"
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides, "on_bad_image=skip"]) == 0
    skipped = json.loads((out / "metrics.json").read_text())["skipped_images"]
    # classifier, CCAM, U-Net and (through the U-Net's training set) INT8 calibration: each key lists its three
    for key in ("classifier.train.0", "maps.method_options.ccam.train.0", "segment.train.0"):
        assert sorted(Path(line.split(":")[0]).name for line in skipped[key]) == sorted(BAD_FILES), (key, skipped)
    log = (out / "run.log").read_text()
    for key in ("classifier.train.0", "maps.method_options.ccam.train.0", "segment.train.0"):
        assert log.count(f"{key}: skipping bad image") == len(BAD_FILES)  # once each, not once per stage
    assert (out / "model.int8.onnx").is_file()


# ----------------------------------------------------------------------------- deployment


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """A tiny exported U-Net (random weights: these tests are about files, not masks)."""
    from wsseg.deploy.onnx_export import export_segmenter
    from wsseg.models.segmenter import SegmenterMeta, build_unet, save_segmenter

    folder = tmp_path_factory.mktemp("model")
    meta = SegmenterMeta(f"tu-{TINY_MODEL}", 64, (0.5,) * 3, (0.5,) * 3, 0.5)
    save_segmenter(folder / "unet.pth", build_unet(f"tu-{TINY_MODEL}", "none"), meta)
    export_segmenter(folder / "unet.pth", folder / "model.onnx")
    return folder


def _job_folder(root: Path, n_good: int = 5) -> Path:
    rng = np.random.default_rng(4)
    root.mkdir(parents=True)
    for i in range(n_good):
        Image.fromarray(_good_image(rng, 48 + 8 * i)).save(root / f"good{i}.jpg")
    _add_bad_files(root)
    (root / "notes.txt").write_text("not an image, and not named like one")
    return root


@pytest.mark.parametrize("command", ["wsseg-infer", "predict-onnx", "predict-torch"])
def test_a_folder_job_writes_every_readable_image_and_lists_the_rest(command, exported_model, tmp_path, capsys):
    from wsseg_infer import cli as infer_cli

    images, out = _job_folder(tmp_path / "in"), tmp_path / "out"
    model = exported_model / ("unet.pth" if command == "predict-torch" else "model.onnx")
    run = (lambda *extra: infer_cli.main([str(model), str(images), "--out", str(out), *extra])) \
        if command == "wsseg-infer" else \
        (lambda *extra: main(["predict", str(model), str(images), "--out", str(out),
                              "--backend", command.split("-")[1], *extra]))
    assert run() == infer_cli.EXIT_SKIPPED  # non-zero: a script notices the skipped files
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.glob("*.png")) == [f"good{i}.png" for i in range(5)]
    assert "5 written, 3 skipped" in captured.out
    assert all(f"{name}" in captured.err for name in BAD_FILES) and "notes.txt" not in captured.err
    listed = json.loads((out / "skipped.json").read_text())
    assert sorted(Path(entry["path"]).name for entry in listed) == sorted(BAD_FILES)
    assert all(entry["reason"] for entry in listed)
    with Image.open(out / "good4.png") as mask:
        assert mask.size == (80, 80)  # at the image's own size

    # --strict stops at the first bad file; --skip-existing continues a killed job without redoing masks
    assert run("--strict") == 2
    (out / "good3.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("good*.png")}
    time.sleep(0.01)
    assert run("--skip-existing") == infer_cli.EXIT_SKIPPED
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("good*.png")}
    assert after.keys() == before.keys() | {"good3.png"} and all(after[k] == before[k] for k in before)
    assert "1 written, 3 skipped, 4 already there" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))  # written atomically: no temporary file left behind


def test_a_folder_of_good_images_exits_zero_and_leaves_no_skip_list(exported_model, tmp_path):
    from wsseg_infer import cli as infer_cli

    images, out = _job_folder(tmp_path / "in", 2), tmp_path / "out"
    for name in BAD_FILES:
        (images / name).unlink()
    (out).mkdir()
    (out / "skipped.json").write_text("[]")  # a stale list from an earlier run goes
    assert infer_cli.main([str(exported_model / "model.onnx"), str(images), "--out", str(out)]) == 0
    assert not (out / "skipped.json").exists() and len(list(out.glob("*.png"))) == 2


def test_bad_model_files_are_named_with_what_is_wrong(exported_model, tmp_path, capsys):
    import onnx
    import torch

    from wsseg_infer import cli as infer_cli

    images = _job_folder(tmp_path / "in", 1)
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("hello")
    bare = tmp_path / "bare.onnx"
    model = onnx.load(str(exported_model / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(bare))
    state_only = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, state_only)
    text_pth = tmp_path / "text.pth"
    text_pth.write_text("not a checkpoint")
    cases = [(["wsseg-infer", not_onnx], "not an ONNX model"), (["wsseg-infer", bare], "without wsseg's metadata"),
             (["torch", state_only], "not a wsseg U-Net checkpoint"), (["torch", text_pth], "not a PyTorch checkpoint")]
    for (how, path), expected in cases:
        argv = [str(path), str(images), "--out", str(tmp_path / "out")]
        code = infer_cli.main(argv) if how == "wsseg-infer" else main(["predict", *argv, "--backend", "torch"])
        err = capsys.readouterr().err
        assert code == 2 and str(path) in err and expected in err, (path, err)


# ----------------------------------------------------------------------------- recipes, weights, crashes


def test_a_recipe_with_a_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: broken\nclassifier:\n  epochs: [1, 2\n  lr: 0.1\n")
    assert main(["recipe", "run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "line 4" in err and "YAML syntax error" in err, err


def test_hub_weights_offline_fail_at_once(monkeypatch):
    from wsseg.errors import WeightsUnavailableError
    from wsseg.models.weights import create_timm_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-wsseg-cache")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="cannot be reached"):
        create_timm_model("resnet18", "hub")
    assert time.perf_counter() - start < 5  # the client's five retries took 40 s


def test_an_unexpected_crash_names_stage_image_and_the_resume_command(tmp_path, monkeypatch, capsys):
    import wsseg.refine as refine

    real = refine.MASK_STEPS.get("largest_component")

    def broken(mask, **kwargs):
        raise ValueError("buffer source array is read-only")

    monkeypatch.setitem(refine.MASK_STEPS._entries, "largest_component", broken)
    out = tmp_path / "run"
    overrides = [o for o in tiny_demo_overrides(("gradcam",))] + [
        "segment=null", "export=null", "pseudo_masks.variants=[{name: v, source: gradcam, refine: "
        "[{name: largest_component}]}]", "pseudo_masks.calibrate=null"]
    assert main(["recipe", "run", "demo", "--out", str(out), "--data-root", str(tmp_path), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback on the console
    assert "stage pseudo_masks failed on image" in err[0] and "ValueError: buffer source array is read-only" in err[0]
    assert f"wsseg recipe run --resume {out} --data-root {tmp_path}" in err[0]
    assert "Traceback" in (out / "run.log").read_text()
    monkeypatch.setitem(refine.MASK_STEPS._entries, "largest_component", real)
    assert main(["recipe", "run", "--resume", str(out), "--data-root", str(tmp_path)]) == 0
    assert "v" in json.loads((out / "metrics.json").read_text())


def test_bench_map_quality_leaves_bad_images_out(tmp_path, capsys):
    from wsseg.models.classifier import ClassifierMeta, build_classifier, save_classifier

    checkpoint = tmp_path / "classifier.pth"
    save_classifier(checkpoint, build_classifier(TINY_MODEL, "none", 2), ClassifierMeta(TINY_MODEL, ["bg", "obj"], 1, 64))
    root = _masked_folder(tmp_path / "kv", 3)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("\n".join(p.stem for p in (root / "images").iterdir()) + "\n")
    argv = ["bench", "map-quality", str(checkpoint), "--dataset", "kvasir_seg", "--root", str(root), "--split", "train",
            "--n-images", "6", "--methods", "gradcam", "--sizes", "64"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert all(f"skipped {root / 'images' / name}" in err for name in BAD_FILES), err
    assert main(argv + ["--strict"]) == 2
