"""wsseg-infer: torch-free ONNX Runtime inference for models exported by wsseg."""

from wsseg_infer.runtime import ModelInfo, Segmenter, choose_providers, load_image, preprocess

__version__ = "0.1.0"
__all__ = ["ModelInfo", "Segmenter", "choose_providers", "load_image", "preprocess", "__version__"]
