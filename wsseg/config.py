"""Load recipes from YAML into dataclasses, apply `key.path=value` overrides, report every problem."""

from __future__ import annotations

import dataclasses
import logging
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from wsseg.config_schema import CLASSIFIER_WEIGHTS, RecipeConfig, unet_size_problems
from wsseg.errors import ConfigError, UnknownNameError

_MISSING = object()
log = logging.getLogger("wsseg")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class ValueProblem(str):
    """A value outside its field's allowed ones: the recipe is still complete, unlike a wrong type."""


def _one_of(values: Sequence[Any]) -> str:
    names = [str(v) for v in values]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _convert(value: Any, tp: Any, path: str, errors: List[str]) -> Any:
    """Check `value` against type `tp`, building nested dataclasses; append problems to `errors`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        if isinstance(value, bool):
            # YAML reads an unquoted off / on / no / yes as a boolean: give the word back where the field takes it.
            words = [w for w in (("on", "yes", "true") if value else ("off", "no", "false")) if w in args]
            value = words[0] if words else value
        if value not in args:
            errors.append(ValueProblem(f"{path}: must be {_one_of(args)}, got {value!r}"))
        return value  # kept, so that the checks across sections still run and every problem is listed at once
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], path, errors)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return _build(tp, value, path, errors)
    if origin in (list, List):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return None
        return [_convert(v, args[0], f"{path}.{i}", errors) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    return value


def _build(cls: type, data: Dict[str, Any], path: str, errors: List[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            errors.append(f"{prefix}{key}: unknown key (valid keys: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def build_dataclass(cls: type, data: Dict[str, Any], path: str, errors: List[str]) -> Any:
    """`data` as dataclass `cls` (nested dataclasses, lists, Literal values checked), problems appended to
    `errors` under `path`: how sections that live outside the recipe schema (a map method's options) are read."""
    return _build(cls, data, path, errors)


def _move_ccam_section(data: Dict[str, Any], errors: List[str]) -> Dict[str, Any]:
    """The `ccam:` list of older recipes: each variant becomes `maps.method_options.<name>` (with
    `method: ccam` when its name is another), as CCAM is a map method like the others."""
    if "ccam" not in data:
        return data
    data = dict(data)
    section = data.pop("ccam")
    if not section:  # `ccam: []`, as the config.yaml of older run folders spells "no CCAM"
        return data
    if not isinstance(section, list):
        errors.append(f"ccam: CCAM is configured in maps.method_options.<name> (the old `ccam:` list is still "
                      f"read), got a {type(section).__name__}")
        return data
    log.warning("recipe: the `ccam:` section is deprecated; each CCAM is a map method configured in "
                "maps.method_options.<name> (with `method: ccam` for a name other than ccam), as the shipped "
                "recipes do")
    maps = dict(data.get("maps") or {})
    method_options = dict(maps.get("method_options") or {})
    for i, entry in enumerate(section):
        if not isinstance(entry, dict):
            errors.append(f"ccam.{i}: expected a mapping, got {type(entry).__name__} {entry!r}")
            continue
        entry = dict(entry)
        name = entry.pop("name", "ccam")
        if name in method_options:
            errors.append(f"ccam.{i}.name: '{name}' is also configured in maps.method_options.{name}")
            continue
        if name != "ccam":
            entry["method"] = "ccam"
        method_options[name] = entry
    maps["method_options"] = method_options
    data["maps"] = maps
    return data


def parse_recipe(data: Dict[str, Any], source: Optional[str] = None) -> RecipeConfig:
    """Validate a raw mapping into a `RecipeConfig`; raise `ConfigError` listing all problems."""
    if not isinstance(data, dict):
        raise ConfigError(f"top level: expected a mapping, got {type(data).__name__}", source)
    errors: List[str] = []
    data = _move_ccam_section(data, errors)
    config = _build(RecipeConfig, data, "", errors)
    if not any(not isinstance(e, ValueProblem) for e in errors):
        errors.extend(_semantic_problems(config))
    if errors:
        raise ConfigError(errors, source)
    return config


def _semantic_problems(config: RecipeConfig) -> List[str]:
    """Names that must exist in a registry, checked up front so a run fails in seconds, not hours."""
    from wsseg.data import list_datasets
    from wsseg.refine import validate_steps
    from wsseg.stages.references import list_reference_producers

    problems = []
    datasets = [("maps.dataset", config.maps.dataset)]
    if config.maps.fit_dataset is not None:
        datasets.append(("maps.fit_dataset", config.maps.fit_dataset))
    if config.classifier is not None:
        datasets += [(f"classifier.train.{i}", d) for i, d in enumerate(config.classifier.train)]
        if config.classifier.val is not None:
            datasets.append(("classifier.val", config.classifier.val))
    problems += _map_method_problems(config, datasets)
    variant_names = [v.name for v in config.pseudo_masks.variants]
    for i, v in enumerate(config.pseudo_masks.variants):
        key = f"pseudo_masks.variants.{i}"
        if v.source not in config.maps.methods:
            problems.append(f"{key}.source: '{v.source}' is not one of maps.methods ({', '.join(config.maps.methods)})")
        if v.name in config.maps.methods or not v.name:
            problems.append(f"{key}.name: '{v.name}' must be a new, non-empty name")
        if v.threshold_mode == "calibrated" and (config.pseudo_masks.calibrate is None
                                                 or config.pseudo_masks.calibrate.dataset is None):
            problems.append(f"{key}.threshold_mode: calibrated needs pseudo_masks.calibrate.dataset")
        problems += validate_steps(v.refine, f"{key}.refine")
        for j, step in enumerate(v.refine):
            if step.other is not None and step.other not in config.maps.methods:
                problems.append(f"{key}.refine.{j}.other: '{step.other}' is not one of maps.methods")
    if config.pseudo_masks.calibrate is not None and config.pseudo_masks.calibrate.dataset is not None:
        datasets.append(("pseudo_masks.calibrate.dataset", config.pseudo_masks.calibrate.dataset))
    if config.segment is not None:
        datasets += [(f"segment.train.{j}", d) for j, d in enumerate(config.segment.train)]
        producers = config.maps.methods + variant_names + (["selected"] if config.select is not None else [])
        if config.segment.masks != "ground_truth" and config.segment.masks not in producers:
            problems.append(f"segment.masks: '{config.segment.masks}' must be ground_truth or one of "
                            f"maps.methods or pseudo_masks.variants ({', '.join(producers)})")
        band = config.segment.confident_band
        if not (len(band) == 2 and 0 <= band[0] <= band[1] <= 1):
            problems.append(f"segment.confident_band: expected [low, high] with 0 <= low <= high <= 1 "
                            f"([0.5, 0.5] ignores nothing), got {band}")
        problems += validate_steps(config.segment.self_training_refine, "segment.self_training_refine")
        for j, step in enumerate(config.segment.self_training_refine):
            if step.other is not None:
                problems.append(f"segment.self_training_refine.{j}.other: a self-training round has only the "
                                f"U-Net's probabilities, no second map")
        epochs = config.segment.self_training_epochs
        if epochs is not None and epochs < 1:
            problems.append(f"segment.self_training_epochs: at least 1 (or null: segment.epochs), got {epochs}")
        widths = config.segment.decoder_channels
        if widths is not None and (len(widths) != 5 or min(widths) < 1):
            problems.append(f"segment.decoder_channels: five positive widths, one per decoder block from the deepest "
                            f"(or null: 256, 128, 64, 32, 16), got {widths}")
        band = config.segment.ignore_band
        if band is not None and not (len(band) == 2 and 0 <= band[0] <= band[1] <= 1):
            problems.append(f"segment.ignore_band: expected [low, high] with 0 <= low <= high <= 1, got {band}")
        if not config.segment.train:
            problems.append("segment.train: at least one dataset is needed")
        if config.segment.encoder_weights == CLASSIFIER_WEIGHTS:
            if config.classifier is None:
                problems.append("segment.encoder_weights: 'classifier' needs a classifier section (its trained "
                                "backbone initialises the U-Net's encoder)")
            expected = f"tu-{config.backbone.name}"
            if config.segment.encoder not in (None, expected):
                problems.append(f"segment.encoder_weights: 'classifier' needs the classifier's backbone as encoder "
                                f"({expected} or unset), got segment.encoder={config.segment.encoder}")
        label_predict = config.segment.self_training_predict
        for key, way in (("segment.predict", config.segment.predict), ("segment.self_training_predict", label_predict)):
            if way is not None and way.size is not None:
                problems.extend(unet_size_problems(f"{key}.size", way.size, unset="segment.image_size"))
        predict = config.segment.predict
        if predict.threshold is not None and not 0.0 <= predict.threshold <= 1.0:
            problems.append(f"segment.predict.threshold: must lie in [0, 1] (or null: segment.threshold), "
                            f"got {predict.threshold}")
        calibrate = config.pseudo_masks.calibrate
        if predict.threshold_mode == "calibrated" and (calibrate is None or calibrate.dataset is None):
            problems.append("segment.predict.threshold_mode: 'calibrated' needs pseudo_masks.calibrate.dataset "
                            "(the labelled images the threshold is chosen on)")
        if predict.threshold_mode == "calibrated" and predict.threshold is not None:
            problems.append(f"segment.predict.threshold: {predict.threshold} set, but threshold_mode 'calibrated' "
                            f"chooses it (set threshold_mode=fixed, or threshold=null)")
        if label_predict is not None and (label_predict.threshold, label_predict.threshold_mode) != (None, "fixed"):
            problems.append("segment.self_training_predict: the labels' threshold is segment.threshold; set no "
                            "threshold or threshold_mode here")
        problems.extend(unet_size_problems("segment.image_size", config.segment.image_size))
    if config.export is not None and config.export.enabled and config.segment is None and not _trains_a_map_model(config):
        problems.append("export: needs a segment section or a map method that trains (the models that are exported)")
    if config.export is not None and config.export.calibration_images < 1:
        problems.append(f"export.calibration_images: INT8 needs at least 1 calibration image, "
                        f"got {config.export.calibration_images}")
    for i, r in enumerate(config.evaluate.references):
        if r not in list_reference_producers():
            problems.append(
                f"evaluate.references.{i}: unknown producer '{r}' (valid: {', '.join(list_reference_producers())})"
            )
    if config.select is not None:
        problems += _select_problems(config, datasets)
    if not 0.0 <= config.pseudo_masks.threshold <= 1.0:
        problems.append(f"pseudo_masks.threshold: must lie in [0, 1], got {config.pseudo_masks.threshold}")
    for path, d in datasets:  # after every section has added its datasets
        if d.name not in list_datasets():
            problems.append(f"{path}.name: unknown dataset '{d.name}' (valid: {', '.join(list_datasets())})")
    return problems


def _select_problems(config: RecipeConfig, datasets: List[Tuple[str, Any]]) -> List[str]:
    from wsseg.refine import validate_steps

    sel, problems = config.select, []
    if sel.labelled is not None:
        datasets.append(("select.labelled", sel.labelled))
    if sel.n_images < 1:
        problems.append(f"select.n_images: at least 1, got {sel.n_images}")
    if not sel.image_sizes or any(s < 32 for s in sel.image_sizes):
        problems.append(f"select.image_sizes: one or more sizes of at least 32 px, got {sel.image_sizes}")
    if not sel.tta or not sel.threshold_modes:
        problems.append("select.tta and select.threshold_modes: at least one each")
    for i, chain in enumerate(sel.refine):
        problems += validate_steps(chain, f"select.refine.{i}")
    if sel.refine_top < 0:
        problems.append(f"select.refine_top: 0 or more, got {sel.refine_top}")
    if not 0 <= sel.prefer_faster_within < 1:
        problems.append(f"select.prefer_faster_within: a Dice margin from 0 (the best) to below 1, got "
                        f"{sel.prefer_faster_within}")
    return problems


def _trains_a_map_model(config: RecipeConfig) -> bool:
    from wsseg.cams import is_trained, list_map_methods, resolve_method

    methods = [resolve_method(name, config.maps.method_options)[0] for name in config.maps.methods]
    return any(m in list_map_methods() and is_trained(m) for m in methods)


def _map_method_problems(config: RecipeConfig, datasets: List[Tuple[str, Any]]) -> List[str]:
    """Every `maps.methods` entry names a registered method (itself, or a variant's `method:`) with valid
    options; the datasets those options read are added to `datasets`."""
    from wsseg.cams import is_trained, list_map_methods, requires_classifier, resolve_method, typed_options
    from wsseg.config_schema import DatasetConfig

    problems: List[str] = []
    registered, methods, method_options = list_map_methods(), config.maps.methods, config.maps.method_options
    for i, name in enumerate(methods):
        method, _ = resolve_method(name, method_options)
        if method not in registered:
            key = f"maps.methods.{i}" if method == name else f"maps.method_options.{name}.method"
            problems.append(f"{key}: unknown map method '{method}' (valid: {', '.join(registered)}; another "
                            f"variant of one under a new name: maps.method_options.<name>.method)")
            continue
        options = typed_options(name, method_options, f"maps.method_options.{name}", problems)
        calibrate = config.pseudo_masks.calibrate
        if getattr(options, "polarity", None) == "labelled" and (calibrate is None or calibrate.dataset is None):
            problems.append(f"maps.method_options.{name}.polarity: labelled needs pseudo_masks.calibrate.dataset "
                            f"(the labelled training images that decide it)")
        if dataclasses.is_dataclass(options):
            for f in dataclasses.fields(options):
                value = getattr(options, f.name)
                found = value if isinstance(value, list) else [value]
                datasets += [(f"maps.method_options.{name}.{f.name}" + (f".{j}" if isinstance(value, list) else ""),
                              d) for j, d in enumerate(found) if isinstance(d, DatasetConfig)]
        # (a CAM method without one fails when the run starts, naming maps.methods; parse_recipe({}) stays valid)
        if is_trained(method) and options is not None and requires_classifier(method, options) \
                and config.classifier is None:
            problems.append(f"maps.methods.{i}: '{name}' needs a classifier section (its maps start from the "
                            f"trained classifier)")
    for name in method_options:  # a method the recipe does not list: its options are checked, kept for an override
        if name in methods:
            continue
        if resolve_method(name, method_options)[0] in registered:
            typed_options(name, method_options, f"maps.method_options.{name}", problems)
        else:
            problems.append(f"maps.method_options.{name}: '{name}' is neither one of maps.methods "
                            f"({', '.join(methods)}) nor a registered map method")
    return problems


def parse_override(text: str) -> Tuple[List[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Return a copy of `data` with each `key.path=value` set; list items are addressed by index."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                node = _list_item(node, key, where)
                continue
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override '{text}': {where} is a value, not a section")
        last = keys[-1]
        if isinstance(node, list):
            index = _list_index(node, last, text, append=True)
            if index == len(node):
                node.append(value)
            else:
                node[index] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, key: str, where: str, append: bool = False) -> int:
    if not key.isdigit() or int(key) > len(node) - (0 if append else 1):
        raise ConfigError(f"override at '{where}': '{key}' is not a valid index into a list of {len(node)}")
    return int(key)


def _list_item(node: list, key: str, where: str) -> Any:
    return node[_list_index(node, key, where)]


# ---------------------------------------------------------------- recipe files


def _recipe_dir():
    """Installed: the package data `wsseg.recipes`. Source checkout on sys.path: the top-level recipes/."""
    try:
        return resources.files("wsseg.recipes")
    except ModuleNotFoundError:
        source = Path(__file__).resolve().parents[1] / "recipes"
        if source.is_dir():
            return source
        raise


def list_recipes() -> List[str]:
    """Names of the recipes shipped inside the package."""
    return sorted(p.name[: -len(".yaml")] for p in _recipe_dir().iterdir() if p.name.endswith(".yaml"))


def recipe_text(name_or_path: str) -> Tuple[str, str]:
    """Return (source description, YAML text) for a shipped recipe name or a file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return str(path), path.read_text()
    names = list_recipes()
    if name_or_path not in names:
        raise UnknownNameError(f"unknown recipe '{name_or_path}'; valid names: {', '.join(names)} (or a .yaml path)")
    return f"recipe '{name_or_path}'", (_recipe_dir() / f"{name_or_path}.yaml").read_text()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """`line L, column C: what is wrong` from a YAML parser error (its own text names no file)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = " ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p) or str(exc)
    if mark is None:
        return f"YAML syntax error: {what}"
    return f"line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {what}"


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load a shipped recipe or YAML file, apply overrides and validate."""
    source, text = recipe_text(name_or_path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(exc), source) from None
    if not isinstance(data, dict):
        raise ConfigError(f"top level: expected a mapping, got {type(data).__name__}", source)
    data = apply_overrides(data, overrides)
    return parse_recipe(data, source)


def to_dict(config: Any) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
