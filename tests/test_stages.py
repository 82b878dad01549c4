"""Stage functions called from Python, as a library user would."""

import torch

from conftest import TINY_MODEL
from wsseg.config_schema import BackboneConfig, CCAMConfig, ClassifierConfig, DatasetConfig
from wsseg.stages.ccam import load_ccam, train_ccam
from wsseg.stages.classifier import train_classifier


def test_classifier_alternates_datasets_and_reports_auc(tmp_path):
    a = DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 32})
    b = DatasetConfig("synthetic", None, "other", options={"n": 24, "size": 32})
    config = ClassifierConfig(train=[a, b], val=DatasetConfig("synthetic", None, "val", options={"n": 8, "size": 32}),
                              image_size=32, epochs=3, batch_size=8, amp=False)
    result = train_classifier(config, BackboneConfig(TINY_MODEL, "none"), tmp_path, "cpu")
    history = torch.load(result.checkpoint, weights_only=False)["loss_history"]
    assert len(history) == 3
    assert 0 <= result.metrics["accuracy"] <= 1 and 0 <= result.metrics["roc_auc"] <= 1
    assert (tmp_path / "classifier_metrics.json").is_file()


def _epoch_lengths(config, tmp_path):
    """Batches per classifier epoch, read from the progress callback."""
    lengths = []

    def progress(iterable, total=None, description=""):
        if description.startswith("classifier epoch"):
            lengths.append(total)
        return iterable

    train_classifier(config, BackboneConfig(TINY_MODEL, "none"), tmp_path, "cpu", progress=progress)
    return lengths


def test_classifier_schedule_alternates_or_concatenates(tmp_path):
    # Same split name, so the two sets share file stems (as CP-CHILD-A and -B do): fine for a classifier.
    a = DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 32, "seed": 1})
    b = DatasetConfig("synthetic", None, "train", options={"n": 24, "size": 32, "seed": 2})
    common = dict(train=[a, b], image_size=32, epochs=2, batch_size=8, amp=False)
    # 16 and 24 images in batches of 8, one set per epoch; or all 40 every epoch.
    assert _epoch_lengths(ClassifierConfig(**common), tmp_path / "alt") == [2, 3]
    assert _epoch_lengths(ClassifierConfig(schedule="concat", **common), tmp_path / "cat") == [5, 5]


def test_ccam_frozen_backbone_phase_leaves_backbone_untouched(tmp_path):
    train = DatasetConfig("synthetic", None, "train", options={"n": 16, "size": 32})
    torch.manual_seed(0)
    frozen = CCAMConfig(train=[train], image_size=32, epochs=1, batch_size=8, freeze_backbone_epochs=1,
                        polarity="none", amp=False)
    result = train_ccam(frozen, BackboneConfig(TINY_MODEL, "none"), tmp_path / "a", "cpu", seed=0)
    torch.manual_seed(0)
    from wsseg.models.ccam import CCAM

    initial = CCAM(TINY_MODEL, "none").backbone.state_dict()
    model, _ = load_ccam(result.checkpoint)
    trained = model.backbone.state_dict()
    assert all(torch.equal(initial[k], trained[k]) for k in initial if "num_batches" not in k)
    head_moved = CCAMConfig(train=[train], image_size=32, epochs=1, batch_size=8, polarity="none", amp=False)
    torch.manual_seed(0)
    result = train_ccam(head_moved, BackboneConfig(TINY_MODEL, "none"), tmp_path / "b", "cpu", seed=0)
    model, _ = load_ccam(result.checkpoint)
    assert not all(torch.equal(initial[k], v) for k, v in model.backbone.state_dict().items())


class _RecordingMethod:
    """Stands in for a map method: records the image batches `fit` sees."""

    def __init__(self, needs_fit):
        self.needs_fit, self.fitted = needs_fit, []

    def fit(self, batches):
        self.fitted = [(b.shape[0], round(float(b.sum()), 3)) for b in batches]
        return self


def test_fit_map_method_fits_only_methods_that_learn_on_a_fixed_sample():
    from wsseg.data import create_dataset
    from wsseg.stages.maps import fit_map_method

    dataset = create_dataset(DatasetConfig("synthetic", None, "train", options={"n": 12, "size": 32}))
    plain = fit_map_method(_RecordingMethod(False), dataset, range(12), 32, (0.5,) * 3, (0.5,) * 3, "cpu")
    assert plain.fitted == []
    seen = []
    for _ in range(2):
        method = fit_map_method(_RecordingMethod(True), dataset, range(12), 32, (0.5,) * 3, (0.5,) * 3, "cpu",
                                batch_size=4, max_images=7)
        seen.append(method.fitted)
    assert [n for n, _ in seen[0]] == [4, 3]  # at most max_images
    assert seen[0] == seen[1]  # the same images every time (every rank fits the same model)
