"""Masks out to annotation tools and back: every format decoded by its own library equals the PNG masks
bit for bit, at each image's own size; `wsseg masks export|import` on a run folder."""

import json

import numpy as np
import pytest
from PIL import Image

from wsseg.annotations import list_formats, read_masks, run_mask_items, write_masks
from wsseg.annotations.formats import MaskItem
from wsseg.cli.main import main
from wsseg.errors import WssegError


def _items():
    rng = np.random.default_rng(0)
    items = []
    for i, (height, width) in enumerate([(37, 53), (64, 64), (20, 91)]):
        mask = np.zeros((height, width), bool)
        mask[rng.integers(0, height // 2):, rng.integers(0, width // 2):rng.integers(width // 2 + 1, width)] = True
        mask ^= rng.random((height, width)) < 0.05  # ragged edges and holes: runs of every length
        items.append(MaskItem(f"img{i}", f"img{i}.jpg", mask))
    items.append(MaskItem("empty", "empty.png", np.zeros((30, 40), bool)))  # an image with nothing on it
    return items


def _run_folder(tmp_path):
    """A run folder holding only `masks/unet/<stem>.png` (no config.yaml), as after a copy."""
    run = tmp_path / "run"
    folder = run / "masks" / "unet"
    folder.mkdir(parents=True)
    items = _items()
    for item in items:
        Image.fromarray(item.mask.astype(np.uint8) * 255).save(folder / f"{item.stem}.png")
    return run, folder, items


def _decoded_by_the_formats_own_library(fmt, out):
    if fmt in ("coco", "cvat"):
        from pycocotools import mask as coco_mask

        data = json.loads(out.read_text())
        decoded = {image["id"]: np.zeros((image["height"], image["width"]), bool) for image in data["images"]}
        for annotation in data["annotations"]:
            segmentation = annotation["segmentation"]
            rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
            decoded[annotation["image_id"]] |= coco_mask.decode(rle).astype(bool)
        return {image["file_name"].rsplit(".", 1)[0]: decoded[image["id"]] for image in data["images"]}
    if fmt == "labelstudio":
        from label_studio_converter.brush import decode_rle

        decoded = {}
        for task in json.loads(out.read_text()):
            height, width = task["data"]["wsseg_size"]
            mask = np.zeros((height, width), bool)
            for result in task["predictions"][0]["result"]:
                h, w = result["original_height"], result["original_width"]
                mask |= decode_rle(result["value"]["rle"]).reshape(h, w, 4)[..., 3] > 0
            decoded[task["data"]["image"].rsplit(".", 1)[0]] = mask
        return decoded
    return {p.stem: np.array(Image.open(p)) > 0 for p in out.glob("*.png")}


@pytest.mark.parametrize("fmt", list_formats())
def test_every_format_round_trips_bit_for_bit_at_each_images_size(tmp_path, fmt):
    pytest.importorskip("pycocotools")
    if fmt == "labelstudio":
        pytest.importorskip("label_studio_converter", reason="label-studio-converter is in the test extra")
    items = _items()
    out = write_masks(items, fmt, tmp_path / ("masks" if fmt == "png" else "masks.json"), label="polyp")
    by_library = _decoded_by_the_formats_own_library(fmt, out)
    by_wsseg = read_masks(out, fmt)
    for item in items:
        for decoded in (by_library, by_wsseg):
            assert decoded[item.stem].shape == item.mask.shape, (fmt, item.stem)
            assert np.array_equal(decoded[item.stem], item.mask), (fmt, item.stem)
    if fmt in ("coco", "cvat"):
        data = json.loads(out.read_text())
        assert data["categories"] == [{"id": 1, "name": "polyp", "supercategory": ""}]
        assert len(data["annotations"]) == 3 and all(a["iscrowd"] == 1 for a in data["annotations"])


def test_coco_import_reads_polygons_drawn_in_a_tool(tmp_path):
    pytest.importorskip("pycocotools")
    data = {"images": [{"id": 7, "file_name": "dir/frame.jpg", "width": 20, "height": 10}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
                             "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]}],
            "categories": [{"id": 1, "name": "polyp"}]}
    path = tmp_path / "corrected.json"
    path.write_text(json.dumps(data))
    mask = read_masks(path, "coco")["frame"]
    assert mask.shape == (10, 20) and mask[4, 5] and not mask[0, 0] and not mask[4, 15]


def test_a_broken_file_names_itself(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(WssegError, match="broken.json: not valid JSON"):
        read_masks(path, "coco")
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(WssegError, match="broken.json: not a COCO instance file"):
        read_masks(path, "coco")


def test_masks_export_and_import_on_a_run_folder(tmp_path):
    pytest.importorskip("pycocotools")
    run, folder, items = _run_folder(tmp_path)
    assert len(run_mask_items(run)) == len(items)  # no config.yaml: named <stem>.png, with a warning
    exported = tmp_path / "for_cvat.json"
    assert main(["masks", "export", str(run), "--format", "cvat", "--out", str(exported), "--label", "polyp"]) == 0
    corrected = tmp_path / "corrected"
    assert main(["masks", "import", str(exported), "--format", "cvat", "--out", str(corrected)]) == 0
    for item in items:
        assert np.array_equal(np.array(Image.open(corrected / f"{item.stem}.png")) > 0, item.mask)
    assert main(["masks", "export", str(run), "--format", "coco", "--producer", "gradcam",
                 "--out", str(tmp_path / "x.json")]) == 2  # no such producer: an error naming the folder


def test_corrected_masks_replace_the_labels_of_every_round_and_a_change_retrains(tmp_path, monkeypatch, capsys):
    import wsseg.stages.segment
    from conftest import tiny_demo_overrides
    from wsseg.config_schema import DatasetConfig
    from wsseg.data import create_dataset

    train = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 64}))
    positive = next(i for i in range(len(train)) if train.holds_object(i))
    stem = train.records[positive].stem
    corrected = tmp_path / "corrected"
    corrected.mkdir()
    correction = np.zeros((64, 64), bool)
    correction[5:20, 30:60] = True  # nothing like the scene's object: only a correction puts it there
    Image.fromarray(correction.astype(np.uint8) * 255).save(corrected / f"{stem}.png")

    seen = []
    original = wsseg.stages.segment.train_segmenter

    def recording(config, backbone, dataset, mask_source, *args, **kwargs):
        seen.append((kwargs.get("name"), mask_source(positive), mask_source((positive + 1) % len(dataset))))
        return original(config, backbone, dataset, mask_source, *args, **kwargs)

    monkeypatch.setattr(wsseg.stages.segment, "train_segmenter", recording)
    out = tmp_path / "run"
    overrides = tiny_demo_overrides(("gradcam",)) + [
        "segment.masks=gradcam", "export.enabled=false", "pseudo_masks.variants=[]",
        "segment.self_training_rounds=1", f"segment.corrected_masks={corrected}"]
    assert main(["recipe", "run", "demo", "--out", str(out), *overrides]) == 0
    assert [name for name, _, _ in seen] == ["unet_round0", "unet_round1"]
    for name, labels, _ in seen:  # round 0's pseudo-mask and round 1's self-training label both replaced
        assert np.array_equal(labels, correction.astype(np.uint8)), name
    assert not any(np.array_equal(other, correction.astype(np.uint8)) for _, _, other in seen)
    seen.clear()
    correction[40:50, 5:15] = True  # a person corrects the correction: the U-Nets learn again
    Image.fromarray(correction.astype(np.uint8) * 255).save(corrected / f"{stem}.png")
    assert main(["recipe", "run", "--resume", str(out)]) == 0
    assert [name for name, _, _ in seen] == ["unet_round0", "unet_round1"]
    assert np.array_equal(seen[0][1], correction.astype(np.uint8))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(corrected / f"{stem}.png")  # the wrong size: named
    capsys.readouterr()
    assert main(["recipe", "run", "--resume", str(out)]) == 2
    assert f"{stem}.png: corrected mask is 10x10, its image" in capsys.readouterr().err


def test_export_carries_confidence_and_picks_the_least_confident(tmp_path):
    pytest.importorskip("pycocotools")
    run, folder, items = _run_folder(tmp_path)
    confidence = {"img0": 0.9, "img1": 0.2, "img2": 0.5, "empty": 1.0}
    (folder / "confidence-0.json").write_text(json.dumps(confidence))
    out = tmp_path / "worst.json"
    assert main(["masks", "export", str(run), "--format", "coco", "--least-confident", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [image["file_name"] for image in data["images"]] == ["img1.png", "img2.png"]  # least sure first
    assert [a["score"] for a in data["annotations"]] == [0.2, 0.5]
    pytest.importorskip("label_studio_converter")
    tasks = json.loads(write_masks(run_mask_items(run), "labelstudio", tmp_path / "ls.json").read_text())
    assert {t["data"]["image"]: t["predictions"][0]["score"] for t in tasks} == \
        {f"{k}.png": v for k, v in confidence.items()}
    (folder / "confidence-0.json").unlink()
    assert main(["masks", "export", str(run), "--format", "coco", "--least-confident", "2", "--out", str(out)]) == 2
