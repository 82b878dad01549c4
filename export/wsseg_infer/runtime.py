"""ONNX Runtime inference: metadata-driven preprocessing, batching, CUDA when present, CPU otherwise.

Only numpy, pillow and onnxruntime are imported, so a deployment needs no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort
from PIL import Image


class InputError(ValueError):
    """An input the model cannot take: wrong shape, dtype, or an unreadable image."""


@dataclass
class ModelInfo:
    """What the exporter stored in the ONNX metadata."""

    kind: str
    input_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    threshold: float
    class_names: List[str]
    version: str

    @classmethod
    def from_session(cls, session: ort.InferenceSession) -> "ModelInfo":
        meta = session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("input_size", "mean", "std", "threshold") if k not in meta]
        if missing:
            raise InputError(f"an ONNX model without wsseg's metadata ({', '.join(missing)} missing): export a "
                             "trained run with `wsseg export RUN_DIR`")
        return cls(meta.get("wsseg_kind", "segmenter"), int(meta["input_size"]), tuple(json.loads(meta["mean"])),
                   tuple(json.loads(meta["std"])), float(meta["threshold"]),
                   json.loads(meta.get("class_names", "[]")), meta.get("wsseg_version", "?"))


def choose_providers(device: str = "auto") -> List[str]:
    """CUDA when asked or available (auto), CPU always as the fallback."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError("device=cuda but onnxruntime has no CUDA provider: pip install onnxruntime-gpu")
    if "CUDAExecutionProvider" in available and device in ("auto", "cuda"):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: Optional[int] = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def load_image(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB from any image file; errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image).astype(np.float64)
                array = (array / (65535.0 if array.max() > 255 else 255.0) * 255).astype(np.uint8)
                return np.repeat(array[..., None], 3, axis=2)
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


def reduction_factor(width: int, height: int, max_side: int) -> int:
    """The 1/2, 1/4 or 1/8 scale a JPEG decoder (PIL's draft) picks so that both sides still cover
    `max_side`: 1 when the image is smaller than twice that."""
    scale = min(width // max_side, height // max_side)
    return next((factor for factor in (8, 4, 2) if scale >= factor), 1)


def _bilinear_positions(n_out: int, n_in: int):
    x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    low = np.floor(x).astype(np.int64)
    return low, np.minimum(low + 1, n_in - 1), (x - low).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Plain bilinear resize to size x size on pixel centres, no antialiasing (OpenCV's INTER_LINEAR,
    which the training pipeline uses); uint8 in, uint8 out."""
    y0, y1, fy = _bilinear_positions(size, image.shape[0])
    x0, x1, fx = _bilinear_positions(size, image.shape[1])
    pixels = image.astype(np.float32)
    fx = fx[None, :, None]
    top = pixels[y0][:, x0] * (1 - fx) + pixels[y0][:, x1] * fx
    bottom = pixels[y1][:, x0] * (1 - fx) + pixels[y1][:, x1] * fx
    out = top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Resize to the model's input size and normalise: 3xSxS float32.

    The resize repeats what the model saw in training: a large image is first box-reduced by 2, 4 or 8
    (as wsseg decodes large JPEGs), then resized bilinearly without antialiasing. PIL's antialiased
    bilinear resize alone costs about 0.01 Dice on Kvasir-SEG val (docs/BENCHMARKS.md).
    """
    factor = reduction_factor(image.shape[1], image.shape[0], 2 * info.input_size)
    if factor > 1:
        image = np.asarray(Image.fromarray(image).reduce(factor))
    resized = resize_bilinear(image, info.input_size)
    x = (resized.astype(np.float32) / 255.0 - np.array(info.mean, np.float32)) / np.array(info.std, np.float32)
    return x.transpose(2, 0, 1)


def to_fp16_model(path: Path) -> bytes:
    """An fp16 copy of the model for CUDA (inputs and outputs stay float32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(str(path)), keep_io_types=True).SerializeToString()


class Segmenter:
    """Run an exported wsseg model on images of any size; masks come back at each image's size."""

    def __init__(self, model_path: Path, device: str = "auto", threads: Optional[int] = None, fp16: bool = False):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: model file not found")
        self.providers = choose_providers(device)
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        try:
            source = to_fp16_model(self.path) if fp16 and self.on_cuda else str(self.path)
            self.session = ort.InferenceSession(source, session_options(threads), providers=self.providers)
        except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, Fail, ...) are not public
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{self.path}: not an ONNX model onnxruntime can load ({reason})") from None
        try:
            self.info = ModelInfo.from_session(self.session)
        except InputError as exc:
            raise InputError(f"{self.path}: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name

    def check_input(self, batch: np.ndarray) -> None:
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
            raise InputError(f"input must be a float32 numpy array, got {getattr(batch, 'dtype', type(batch).__name__)}")
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise InputError(f"input must have shape (batch, 3, height, width), got {batch.shape}")
        if batch.shape[2] % 32 or batch.shape[3] % 32:
            raise InputError(f"height and width must be multiples of 32, got {batch.shape[2]}x{batch.shape[3]}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (B, H, W) for a preprocessed float32 batch (B, 3, H, W)."""
        self.check_input(batch)
        if self.on_cuda:  # IO binding: copy in once, keep the output on the device until fetched
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.input_name, batch)
            binding.bind_output(self.session.get_outputs()[0].name, "cuda")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0][:, 0]
        return self.session.run(None, {self.input_name: batch})[0][:, 0]

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 8) -> List[np.ndarray]:
        """Probability maps at each image's own size."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            probs = self.run(np.stack([preprocess(im, self.info) for im in chunk]))
            for image, prob in zip(chunk, probs):
                height, width = image.shape[:2]
                out.append(np.asarray(Image.fromarray(prob.astype(np.float32), mode="F").resize((width, height),
                                                                                               Image.BILINEAR)))
        return out

    def masks(self, images: Sequence[np.ndarray], batch_size: int = 8) -> List[np.ndarray]:
        return [p >= self.info.threshold for p in self.predict(images, batch_size)]
