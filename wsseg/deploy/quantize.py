"""Static INT8 quantisation with ONNX Runtime, calibrated on a few training images."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger("wsseg")


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed arrays."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str = "image"):
        self._it = iter([{input_name: b} for b in batches])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # not needed for one pass
        pass


DEFAULT_KEEP_FLOAT = ("/encoder/",)
AUTO = "auto"  # keep_float=["auto"]: measure which encoder stages stay fp32 (choose_keep_float)


def quantize_int8(model_path: Path, out_path: Path, calibration: List[np.ndarray],
                  keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT) -> Path:
    """QDQ, per-channel weights, calibrated by min-max on `calibration` (each 1x3xHxW float32).

    Nodes whose name contains one of `keep_float` stay in fp32. By default that is the encoder:
    measured on Kvasir-SEG (docs/experiments.md), quantising the whole EfficientNet-Lite U-Net cost
    0.03-0.10 Dice, while the decoder alone quantises at no measurable cost and still gives most of
    the speed-up, since the decoder runs at the highest resolutions. `keep_float=["auto"]` measures
    instead (`choose_keep_float`): the encoder is quantised too, except its depthwise convolutions and
    the stages that move the masks; faster, at a small Dice cost that `mask_agreement` reports.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_path, out_path = Path(model_path), Path(out_path)
    extra = {}
    if list(keep_float) == [AUTO]:
        keep_float, agreement = choose_keep_float(model_path, calibration)
        extra["int8_stage_agreement"] = json.dumps({k: round(v, 4) for k, v in agreement.items()})
    prepared = out_path.with_name(f".{out_path.stem}.prep.onnx")
    quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
    excluded = [n.name for n in onnx.load(str(prepared)).graph.node if any(k in n.name for k in keep_float)]
    quantize_static(str(prepared), str(out_path), _Reader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    prepared.unlink(missing_ok=True)
    _copy_metadata(model_path, out_path, {"quantization": "int8-static-qdq",
                                          "int8_kept_float": json.dumps(list(keep_float)), **extra})
    return out_path


def encoder_stages(node_names: Iterable[str]) -> Dict[str, List[str]]:
    """Encoder nodes by top-level module, in graph order: `.../encoder/model/blocks.3/...` (timm `tu-`
    encoders) or `.../encoder/layer3/...` (smp's own) -> that prefix."""
    stages: Dict[str, List[str]] = {}
    for name in node_names:
        head, sep, rest = name.partition("/encoder/")
        parts = rest.split("/")
        depth = 2 if parts[0] == "model" else 1
        if sep and len(parts) > depth:
            stages.setdefault(head + sep + "/".join(parts[:depth]) + "/", []).append(name)
    return stages


def choose_keep_float(model_path: Path, calibration: List[np.ndarray], min_agreement: float = 0.98,
                      threshold: float = 0.5) -> Tuple[List[str], Dict[str, float]]:
    """Which nodes stay fp32, by measurement on the calibration images: depthwise convolutions always
    (quantising them collapsed the Kvasir-SEG U-Net's masks), and each encoder stage whose INT8 masks,
    with the decoder and that stage alone quantised, agree with the fp32 masks below `min_agreement`
    (mask Dice). Returns the keep-float patterns and each stage's agreement. One quantisation per stage."""
    import tempfile

    import onnx

    graph = onnx.load(str(model_path)).graph
    depthwise = [n.name for n in graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    stages = encoder_stages(n.name for n in graph.node)
    agreement: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        for stage in stages:
            others = [s for s in stages if s != stage]
            quantize_int8(model_path, probe, calibration, depthwise + others)
            agreement[stage] = mask_agreement(model_path, probe, calibration, threshold)["mask_dice_vs_fp32"]
            log.info("INT8 probe: %s quantised, masks vs fp32 Dice %.4f", stage, agreement[stage])
    sensitive = [s for s, a in agreement.items() if a < min_agreement]
    return sensitive + depthwise, agreement


def mask_agreement(fp32_path: Path, int8_path: Path, batches: List[np.ndarray], threshold: float = 0.5) -> Dict:
    """How far INT8 moves the predictions, without labels: mean Dice between the fp32 and the INT8 masks
    and mean |probability difference| on `batches` (e.g. the calibration images)."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, int8_path)]
    dices, errors = [], []
    for batch in batches:
        fp32, int8 = (s.run(None, {s.get_inputs()[0].name: batch})[0][:, 0] for s in sessions)
        for a, b in zip(fp32 >= threshold, int8 >= threshold):
            total = int(a.sum() + b.sum())
            dices.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
        errors.append(float(np.abs(fp32 - int8).mean()))
    return {"mask_dice_vs_fp32": float(np.mean(dices)), "mean_abs_prob_diff": float(np.mean(errors))}


def _copy_metadata(source: Path, target: Path, extra: Dict[str, str]) -> None:
    import onnx

    src, dst = onnx.load(str(source)), onnx.load(str(target))
    del dst.metadata_props[:]
    for p in src.metadata_props:
        entry = dst.metadata_props.add()
        entry.key, entry.value = p.key, p.value
    for key, value in extra.items():
        entry = dst.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(dst, str(target))


def calibration_batches(dataset, model_path: Path, n_images: int) -> List[np.ndarray]:
    """`n_images` preprocessed images spread over `dataset` (the U-Net's training images, never the
    evaluation images), prepared as the ONNX model at `model_path` expects them."""
    from wsseg_infer.runtime import ModelInfo, preprocess
    import onnxruntime as ort

    info = ModelInfo.from_session(ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]))
    picks = dataset.spread(n_images)
    return [preprocess(dataset.load_image(i), info)[None] for i in picks]


def run_training_images(config, data_root=None):
    """The U-Net training images of a finished run's recipe (its `config.yaml`, for `wsseg export --int8`
    outside a run); unreadable files are left out, as a calibration image is only a sample."""
    from wsseg.data import DatasetCatalog

    return DatasetCatalog(data_root, "skip").concat(config.segment.train, "segment.train")


def quantize_from_run(run_dir: Path, n_images: Optional[int] = None, data_root=None,
                      keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT, model_path: Optional[Path] = None,
                      calibration_set=None) -> Dict:
    """The INT8 twin of a run's fp32 ONNX model (`model_path`, default `model.onnx`) beside it, with its
    agreement with fp32 on the calibration images: `n_images` of `calibration_set` (a running recipe hands
    its U-Net training set; without it, the run's `config.yaml` names it), default the run's
    `export.calibration_images`."""
    from wsseg.config_schema import ExportConfig
    from wsseg.deploy.onnx_export import read_metadata
    from wsseg.pipeline.layout import RunLayout

    layout = RunLayout(run_dir)
    model_path = Path(model_path) if model_path else layout.model_onnx
    if n_images is None or calibration_set is None:  # outside a run: config.yaml says, read once
        from wsseg.config import load_recipe

        config = load_recipe(str(layout.config))
        if n_images is None:
            n_images = (config.export or ExportConfig()).calibration_images
        if calibration_set is None:
            calibration_set = run_training_images(config, data_root)
    batches = calibration_batches(calibration_set, model_path, n_images)
    out = quantize_int8(model_path, model_path.with_name(model_path.stem + ".int8.onnx"), batches, keep_float)
    agreement = mask_agreement(model_path, out, batches, float(read_metadata(model_path)["threshold"]))
    log.info("INT8 model written to %s (kept in fp32: %s); masks vs fp32 on %d calibration images: Dice %.4f",
             out, describe_kept_float(out), len(batches), agreement["mask_dice_vs_fp32"])
    meta = read_metadata(out)
    report = {"path": str(out), "calibration_images": len(batches),
              "kept_float": json.loads(meta["int8_kept_float"]), **agreement}
    if "int8_stage_agreement" in meta:
        report["stage_agreement"] = json.loads(meta["int8_stage_agreement"])
    return report


def describe_kept_float(int8_path: Path) -> str:
    """What an INT8 model kept in fp32, in a line: the patterns, or for `auto` the stages and a count."""
    from wsseg.deploy.onnx_export import read_metadata

    meta = read_metadata(int8_path)
    kept = json.loads(meta.get("int8_kept_float", "[]"))
    if "int8_stage_agreement" not in meta:
        return ", ".join(kept) or "nothing"
    stages = [k for k in kept if k.endswith("/")]
    return (f"auto: stages {', '.join(stages) or 'none'} and {len(kept) - len(stages)} depthwise convs "
            f"(stage agreement {meta['int8_stage_agreement']})")
