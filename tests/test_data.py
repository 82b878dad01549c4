import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA, needs_shared
from wsseg.config_schema import DatasetConfig
from wsseg.data import create_dataset, list_datasets, resolve_data_root
from wsseg.data.io import read_binary_mask, read_image
from wsseg.errors import ConfigError, DataError


def _build(name, kvasir_root, class_folders_root, pets_root):
    """One small instance per registered dataset; a new dataset without an entry here fails the test."""
    configs = {
        "kvasir_seg": DatasetConfig("kvasir_seg", str(kvasir_root), "val"),
        "class_folders": DatasetConfig("class_folders", str(class_folders_root), "Train", options={"positive": "Polyp"}),
        "oxford_pets": DatasetConfig("oxford_pets", str(pets_root), "test"),
        "synthetic": DatasetConfig("synthetic", None, "val", options={"n": 6, "size": 48}),
    }
    return create_dataset(configs[name])


@pytest.mark.parametrize("name", list_datasets())
def test_every_registered_dataset_yields_images_labels_and_masks(name, kvasir_root, class_folders_root, pets_root):
    ds = _build(name, kvasir_root, class_folders_root, pets_root)
    assert len(ds) > 0
    for i in range(len(ds)):
        image = ds.load_image(i)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[:2] == tuple(ds.image_size(i))
        assert ds.records[i].label in range(len(ds.classes))
        mask = ds.load_mask(i)
        if ds.has_masks:
            assert mask.dtype == bool and mask.shape == image.shape[:2]
        else:
            assert mask is None


def test_kvasir_split_and_jpeg_mask_binarised(kvasir_root):
    ds = create_dataset(DatasetConfig("kvasir_seg", str(kvasir_root), "val"))
    assert [r.stem for r in ds.records] == ["img1", "img3", "img5"]
    assert set(np.unique(ds.load_mask(0))) <= {False, True}
    assert ds.load_mask(0).sum() == 20 * 21  # the drawn rectangle, despite JPEG ringing


def test_kvasir_errors_name_the_file(kvasir_root):
    (kvasir_root / "splits" / "val.txt").write_text("img1\nghost\n")
    with pytest.raises(DataError, match=r"val.txt: names 1 images missing.*ghost"):
        create_dataset(DatasetConfig("kvasir_seg", str(kvasir_root), "val"))
    with pytest.raises(DataError, match="split file .*test.txt does not exist"):
        create_dataset(DatasetConfig("kvasir_seg", str(kvasir_root), "test"))
    (kvasir_root / "masks" / "img2.jpg").unlink()
    with pytest.raises(DataError, match="no mask for .*img2.jpg"):
        create_dataset(DatasetConfig("kvasir_seg", str(kvasir_root), "train"))


def test_mask_of_wrong_size_names_both_files(kvasir_root):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(kvasir_root / "masks" / "img1.jpg")
    ds = create_dataset(DatasetConfig("kvasir_seg", str(kvasir_root), "val"))
    with pytest.raises(DataError, match=r"img1.jpg: mask is 10x10 but its image .*img1.jpg is 64x48"):
        ds.load_mask(0)


def test_class_folders_split_flat_and_positive(class_folders_root):
    ds = create_dataset(DatasetConfig("class_folders", str(class_folders_root), "Test", options={"positive": "Polyp"}))
    assert ds.classes == ["not Polyp", "Polyp"] and ds.labels.sum() == 3 and len(ds) == 7
    assert "1 (1)" in {r.stem for r in ds.records}
    flat = create_dataset(DatasetConfig("class_folders", str(class_folders_root / "Train")))
    assert flat.classes == ["Non-Polyp", "Polyp"]
    with pytest.raises(DataError, match="positive class 'polyp' is not a folder"):
        create_dataset(DatasetConfig("class_folders", str(class_folders_root), "Test", options={"positive": "polyp"}))


def test_class_folders_keeps_only_the_named_folders(class_folders_root):
    negatives = create_dataset(DatasetConfig("class_folders", str(class_folders_root), "Train",
                                             options={"positive": "Polyp", "folders": ["Non-Polyp"]}))
    assert len(negatives) == 4 and negatives.labels.sum() == 0
    assert negatives.classes == ["not Polyp", "Polyp"]  # labels keep their meaning
    with pytest.raises(DataError, match=r"folders \['Polip'\] are not class folders"):
        create_dataset(DatasetConfig("class_folders", str(class_folders_root), "Train", options={"folders": ["Polip"]}))


def test_oxford_pets_species_and_border_option(pets_root):
    ds = create_dataset(DatasetConfig("oxford_pets", str(pets_root), "test"))
    assert ds.classes == ["cat", "dog"] and list(ds.labels) == [0, 1]
    assert ds.load_mask(0).sum() == 20 * 20  # border counted as foreground by default
    strict = create_dataset(DatasetConfig("oxford_pets", str(pets_root), "test", options={"border": "background"}))
    assert strict.load_mask(0).sum() == 16 * 16


def test_synthetic_is_deterministic_and_has_negatives():
    cfg = DatasetConfig("synthetic", None, "train", options={"n": 20, "size": 48, "negative_fraction": 0.5})
    a, b = create_dataset(cfg), create_dataset(cfg)
    assert np.array_equal(a.load_image(3), b.load_image(3))
    labels = a.labels
    assert 0 < labels.sum() < len(labels)
    for i in range(len(a)):
        assert a.load_mask(i).any() == bool(labels[i])
    other = create_dataset(DatasetConfig("synthetic", None, "val", options={"n": 20, "size": 48}))
    assert not np.array_equal(a.load_image(0), other.load_image(0))


def test_synthetic_scenes_kept_in_memory_are_the_rendered_ones_and_survive_callers_and_subset(monkeypatch):
    import wsseg.data.synthetic as synthetic

    cfg = DatasetConfig("synthetic", None, "train", options={"n": 12, "size": 32})
    fresh = create_dataset(cfg)
    expected = {r.stem: fresh._render(r.stem, r.label) for r in fresh.records}
    kept = create_dataset(cfg)
    first = kept.load_image(5)
    first[:] = 0  # a caller drawing on its copy must not change what the next caller gets
    kept.load_mask(5)[:] = True
    stem = kept.records[5].stem
    assert np.array_equal(kept.load_image(5), expected[stem][0])
    assert np.array_equal(kept.load_mask(5), expected[stem][1])
    kept.subset(4)  # renumbers the records: the kept scenes must follow the stems, not the old indices
    for i in range(len(kept)):
        assert np.array_equal(kept.load_image(i), expected[kept.records[i].stem][0])
    renders, render = [], synthetic.render_scene
    monkeypatch.setattr(synthetic, "render_scene", lambda *a: renders.append(a) or render(*a))
    small = create_dataset(cfg)
    small._cache_capacity = 2  # beyond the byte budget scenes are rendered each time, not kept
    for _ in range(2):
        for i in range(4):
            small.load_image(i)
    assert len(renders) == 2 + 2 * 2


def test_concat_refuses_repeated_stems_and_names_both_datasets():
    from wsseg.data.base import concat_datasets

    a = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 4, "size": 32}))
    b = create_dataset(DatasetConfig("synthetic", None, "val", options={"n": 4, "size": 32}))
    assert len(concat_datasets([a, b])) == 8
    again = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 2, "size": 32, "seed": 3}))
    with pytest.raises(DataError, match=r"synth_train_00000"):
        concat_datasets([a, again])


def test_unknown_option_and_missing_root_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"maps.dataset.options.colour: unknown option for dataset 'synthetic'"):
        create_dataset(DatasetConfig("synthetic", options={"colour": 1}), key="maps.dataset")
    with pytest.raises(ConfigError, match="needs a root folder"):
        create_dataset(DatasetConfig("kvasir_seg"))
    with pytest.raises(DataError, match="does not exist .*--data-root"):
        create_dataset(DatasetConfig("kvasir_seg", "nowhere"), tmp_path)


def test_data_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WSSEG_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert resolve_data_root("/x") == resolve_data_root("/x") and str(resolve_data_root("/x")) == "/x"


@pytest.mark.parametrize("mode,array", [
    ("L", np.full((5, 6), 100, np.uint8)),
    ("RGBA", np.full((5, 6, 4), 200, np.uint8)),
    ("I;16", np.full((5, 6), 65535, np.uint16)),
])
def test_read_image_converts_modes(tmp_path, mode, array):
    path = tmp_path / "x.png"
    Image.fromarray(array, mode=mode if mode != "I;16" else None).save(path)
    image = read_image(path)
    assert image.shape == (5, 6, 3) and image.dtype == np.uint8
    if mode == "I;16":
        assert image.max() == 255


def test_read_image_palette(tmp_path):
    path = tmp_path / "p.png"
    Image.fromarray(np.arange(30, dtype=np.uint8).reshape(5, 6)).convert("P").save(path)
    assert read_image(path).shape == (5, 6, 3)


def test_unreadable_images_name_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.jpg: empty file"):
        read_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match="notes.png: not a readable image"):
        read_image(text)
    good = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match="cut.jpg"):
        read_image(good)
    with pytest.raises(DataError, match="missing.png: file not found"):
        read_binary_mask(tmp_path / "missing.png")


@needs_shared("kvasir-seg")
def test_real_kvasir_val():
    ds = create_dataset(DatasetConfig("kvasir_seg", "kvasir-seg", "val"), SHARED_DATA)
    assert len(ds) == 120 and ds.labels.sum() == 120
    mask = ds.load_mask(0)
    assert mask.shape == ds.load_image(0).shape[:2] and 0 < mask.mean() < 1


@needs_shared("cp-child")
def test_real_cp_child_counts():
    ds = create_dataset(DatasetConfig("class_folders", "cp-child/CP-CHILD-B", "Train", options={"positive": "Polyp"}),
                        SHARED_DATA)
    assert len(ds) == 1100 and ds.labels.sum() == 300
    assert ds.load_image(0).shape == (256, 256, 3)


def test_a_class_and_holding_an_object_are_two_facts(pets_root, class_folders_root):
    """Cats are not object-free: only datasets that say so (non-polyp frames) give empty masks by label."""
    pets = create_dataset(DatasetConfig("oxford_pets", str(pets_root), "trainval"))
    assert pets.object_free == frozenset() and all(pets.holds_object(i) for i in range(len(pets)))
    assert {pets.classes[r.label] for r in pets.records} == {"cat", "dog"}
    polyps = create_dataset(DatasetConfig("class_folders", str(class_folders_root), "Train",
                                          options={"positive": "Polyp"}))
    assert [polyps.holds_object(i) for i in range(len(polyps))] == [r.label == 1 for r in polyps.records]
    synthetic = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 10, "size": 32}))
    assert synthetic.object_free == {0}


@needs_shared("oxford-iiit-pet")
def test_real_pets_subset_counts_and_trimaps():
    root = SHARED_DATA / "oxford-iiit-pet"
    trainval = create_dataset(DatasetConfig("oxford_pets", str(root), "trainval"))
    test = create_dataset(DatasetConfig("oxford_pets", str(root), "test"))
    assert (len(trainval), len(test)) == (575, 560)
    assert int((test.labels == 0).sum()) == 242 and int((test.labels == 1).sum()) == 318
    alpha = next(i for i, r in enumerate(trainval.records + test.records) if r.stem == "Abyssinian_5")
    dataset = trainval if alpha < len(trainval) else test
    index = alpha if alpha < len(trainval) else alpha - len(trainval)
    image, mask = dataset.load_image(index), dataset.load_mask(index)
    assert image.shape[2] == 3 and mask.shape == image.shape[:2] and 0.05 < mask.mean() < 0.95


def test_pets_border_can_be_left_out_of_the_score(pets_root):
    from wsseg.metrics import confusion, scores

    ignoring = create_dataset(DatasetConfig("oxford_pets", str(pets_root), "test", options={"border": "ignore"}))
    counting = create_dataset(DatasetConfig("oxford_pets", str(pets_root), "test"))
    pet, band = ignoring.load_mask(0), ignoring.load_ignore(0)
    assert counting.load_ignore(0) is None and band.sum() == (counting.load_mask(0) & ~pet).sum() > 0
    prediction = counting.load_mask(0)  # a mask that takes the whole border band as pet
    assert scores(confusion(prediction, pet, band))["dice"] == 1.0
    assert scores(confusion(prediction, pet))["dice"] < 1.0


# ----------------------------------------------------------------------------- image cache

def test_image_cache_gives_the_decoded_pixels_and_a_changed_image_or_size_misses(tmp_path, kvasir_root):
    from wsseg.data.image_cache import ImageCache
    from wsseg.data.io import read_image

    dataset = create_dataset(DatasetConfig("kvasir_seg", str(kvasir_root), "val"))
    dataset.image_cache = cache = ImageCache(tmp_path / "cache")
    path = dataset.records[0].image_path
    first = dataset.load_image(0, 32)
    assert (cache.hits, cache.misses) == (0, 1)
    assert np.array_equal(first, read_image(path, 32))
    assert np.array_equal(dataset.load_image(0, 32), first) and (cache.hits, cache.misses) == (1, 1)
    dataset.load_image(0, 64)  # another decode size: its own entry
    assert cache.misses == 2
    dataset.load_image(0)  # full size is read from the file, never kept
    assert (cache.hits, cache.misses) == (1, 2) and not (tmp_path / "cache" / "None").exists()

    changed = np.full((48, 64, 3), 200, np.uint8)
    Image.fromarray(changed).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))
    again = dataset.load_image(0, 32)
    assert cache.misses == 3 and np.array_equal(again, read_image(path, 32)) and not np.array_equal(again, first)

    entry = cache.entry(path, 32)
    entry.write_bytes(b"broken")  # a damaged entry is decoded again, not returned
    assert np.array_equal(dataset.load_image(0, 32), again) and cache.misses == 4


def test_a_run_with_the_image_cache_matches_one_without_and_its_resume_reads_only_the_cache(tmp_path, kvasir_root):
    from conftest import tiny_demo_overrides
    from wsseg.cli.main import main

    kvasir = f"{{name: kvasir_seg, root: {kvasir_root}, split: val}}"
    overrides = tiny_demo_overrides(("gradcam",)) + [
        f"maps.dataset={kvasir}", f"segment.train=[{kvasir}]", "segment.masks=gradcam", "segment.self_training_rounds=0",
        "pseudo_masks.variants=[]", "export.enabled=false"]
    numbers = {}
    for cached in (True, False):
        out = tmp_path / f"cache_{cached}"
        assert main(["recipe", "run", "demo", "--out", str(out), f"image_cache={str(cached).lower()}", *overrides]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        numbers[cached] = {k: v["dice"] for k, v in metrics.items() if isinstance(v, dict) and "dice" in v}
        assert (out / "image_cache").is_dir() == cached
    assert numbers[True] == numbers[False] and "unet" in numbers[True]
    assert metrics_of(tmp_path / "cache_True")["image_cache"]["misses"] > 0

    # More U-Net epochs on resume: the U-Net trains again, every image it reads comes from the cache.
    assert main(["recipe", "run", "--resume", str(tmp_path / "cache_True"), "segment.epochs=2"]) == 0
    resumed = metrics_of(tmp_path / "cache_True")
    assert "unet_round0" not in resumed["resumed_skipped_stages"] and "maps_gradcam" in resumed["resumed_skipped_stages"]
    assert resumed["image_cache"]["misses"] == 0 and resumed["image_cache"]["hits"] > 0


def metrics_of(run):
    return json.loads((run / "metrics.json").read_text())
