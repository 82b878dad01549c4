"""Static INT8 quantisation with ONNX Runtime, calibrated on a few training images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

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


def quantize_int8(model_path: Path, out_path: Path, calibration: List[np.ndarray],
                  keep_float: Sequence[str] = ("/encoder/",)) -> Path:
    """QDQ, per-channel weights, calibrated by min-max on `calibration` (each 1x3xHxW float32).

    Nodes whose name contains one of `keep_float` stay in fp32. By default that is the encoder:
    measured on Kvasir-SEG (docs/BENCHMARKS.md), quantising the EfficientNet-Lite encoder cost 0.10
    Dice whatever the calibration method, while the decoder alone quantises at no measurable cost
    and still gives the INT8 speed-up, since the decoder runs at the highest resolutions.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_path, out_path = Path(model_path), Path(out_path)
    prepared = out_path.with_name(f".{out_path.stem}.prep.onnx")
    quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
    excluded = [n.name for n in onnx.load(str(prepared)).graph.node if any(k in n.name for k in keep_float)]
    quantize_static(str(prepared), str(out_path), _Reader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded)
    prepared.unlink(missing_ok=True)
    _copy_metadata(model_path, out_path)
    return out_path


def _copy_metadata(source: Path, target: Path) -> None:
    import onnx

    src, dst = onnx.load(str(source)), onnx.load(str(target))
    del dst.metadata_props[:]
    for p in src.metadata_props:
        entry = dst.metadata_props.add()
        entry.key, entry.value = p.key, p.value
    entry = dst.metadata_props.add()
    entry.key, entry.value = "quantization", "int8-static-qdq"
    onnx.save(dst, str(target))


def calibration_batches(config_path: Path, model_path: Path, n_images: int, data_root=None) -> List[np.ndarray]:
    """Preprocessed images from the run's segmenter training set (never the evaluation images)."""
    from wsseg.config import load_recipe
    from wsseg.data import create_dataset
    from wsseg.data.base import concat_datasets
    from wsseg_infer.runtime import ModelInfo, preprocess
    import onnxruntime as ort

    config = load_recipe(str(config_path))
    info = ModelInfo.from_session(ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]))
    train = concat_datasets([create_dataset(d, data_root) for d in config.segment.train])
    picks = np.linspace(0, len(train) - 1, min(n_images, len(train))).astype(int)
    return [preprocess(train.load_image(int(i)), info)[None] for i in picks]


def quantize_from_run(run_dir: Path, n_images: int = 16, data_root=None) -> Dict:
    run_dir = Path(run_dir)
    out = quantize_int8(run_dir / "model.onnx", run_dir / "model.int8.onnx",
                        calibration_batches(run_dir / "config.yaml", run_dir / "model.onnx", n_images, data_root))
    log.info("INT8 model written to %s", out)
    return {"path": str(out), "calibration_images": n_images}
