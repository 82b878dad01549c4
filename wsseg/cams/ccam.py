"""CCAM as a registered map method that trains its own model in the run (`maps.methods: [ccam]`, options in
`maps.method_options.ccam`, a second variant under another name with `method: ccam`, e.g. the
classifier-initialised `{method: ccam, init: classifier}`).

Maps are forward only, batched, no gradients (TTA comes from `TTAMaps`), through PyTorch (channels-last,
inference mode) or ONNX Runtime on the exported map model, the fast path for pseudo-labelling large image sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from wsseg.cams.base import MapMethod, TrainedMapMethod
from wsseg.config_schema import CCAMConfig


class CCAMMaps(MapMethod):
    """Class-agnostic: `targets` are ignored."""

    requires_classifier = False

    def __init__(self, model: torch.nn.Module):
        # channels-last lets oneDNN (CPU) and cuDNN pick faster convolution kernels for inference
        self.model = model.eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def compute(self, images: torch.Tensor, targets: Sequence[int] = ()) -> np.ndarray:
        return self.model(images.contiguous(memory_format=torch.channels_last))[:, 0].float().cpu().numpy()


class CCAMOnnxMaps(MapMethod):
    """The same maps from an exported CCAM (`wsseg.deploy.onnx_export.export_ccam`) through ONNX Runtime."""

    requires_classifier = False

    def __init__(self, onnx_path: Path, threads: Optional[int] = None, device: str = "auto"):
        import onnxruntime as ort

        from wsseg_infer.runtime import choose_providers, session_options

        self.session = ort.InferenceSession(str(onnx_path), session_options(threads), providers=choose_providers(device))

    def compute(self, images: torch.Tensor, targets: Sequence[int] = ()) -> np.ndarray:
        return self.session.run(None, {"image": images.detach().cpu().numpy().astype(np.float32)})[0][:, 0]


class CCAMMethod(TrainedMapMethod):
    """Class-agnostic activation maps learnt with contrastive losses on the recipe's images (`train`);
    `init: imagenet` is the original method, `init: classifier` starts from the classifier stage's backbone."""

    options_type = CCAMConfig

    def __call__(self, model=None, target_layer: str = "auto", **options) -> MapMethod:
        if model is None:
            raise ValueError("ccam maps need a trained CCAM model (`wsseg.stages.ccam.load_ccam`)")
        return CCAMMaps(model)

    def requires_classifier(self, options: CCAMConfig) -> bool:
        return options.init == "classifier" or options.polarity == "classifier"

    def problems(self, options: CCAMConfig, key: str) -> List[str]:
        return [] if options.train else [f"{key}.train: at least one dataset is needed"]

    def untrained_model(self, backbone: str, weights: str, options: CCAMConfig) -> torch.nn.Module:
        from wsseg.models.ccam import CCAM

        return CCAM(backbone, weights, options.stages, options.output_stride).eval()

    def export(self, checkpoint: Path, out_path: Path, opset: int = 17):
        from wsseg.deploy.onnx_export import export_ccam

        return export_ccam(checkpoint, out_path, opset).as_dict()

    def train(self, context, name: str, options: CCAMConfig):
        """Train this variant (polarity checked against the labelled calibration images with `polarity:
        labelled`, else against the classifier's Grad-CAM when there is one) and
        return its MapProducer; the checkpoint is cached on everything it read."""
        from wsseg.pipeline.context import MapProducer
        from wsseg.pipeline.executor import fingerprint
        from wsseg.stages.ccam import load_ccam

        config = context.config
        uses_classifier = options.init == "classifier" or options.polarity != "border"
        reads = [options, config.backbone, config.seed, config.on_bad_image,
                 context.classifier_fingerprint if uses_classifier else None]
        if options.polarity == "labelled":  # the images that decide it (other digests stay as they were)
            calib = config.pseudo_masks.calibrate
            reads.append((calib.dataset, calib.n_images))
        digest = fingerprint(*reads)
        result = context.cached(f"ccam_{name}", digest, lambda: self._train(context, name, options, digest),
                                lambda r: [Path(r["checkpoint"])])
        context.metrics[f"{name}_training"] = result["metrics"]
        checkpoint = Path(result["checkpoint"])
        context.artifacts[name] = checkpoint
        context.exports[name] = lambda out, opset: self.export(checkpoint, out, opset)
        model, meta = load_ccam(checkpoint)
        model = model.to(context.device)
        build = lambda: CCAMMaps(model)  # noqa: E731
        if options.inference_backend == "onnx":  # exported once, then labelled by ONNX Runtime
            build = self._onnx_maps(context, name, checkpoint, digest[:12])
        return MapProducer(build, tuple(meta["mean"]), tuple(meta["std"]),
                           lambda dataset: np.zeros(len(dataset), dtype=np.int64),
                           fingerprint(digest, options.inference_backend))

    def _onnx_maps(self, context, name: str, checkpoint: Path, tag: str):
        from wsseg import distributed as dist

        onnx_path = context.layout.map_labelling_onnx(name, tag)
        if dist.is_main() and not onnx_path.is_file():
            for stale in onnx_path.parent.glob(f"{name}.*.maps.onnx"):  # exports of earlier trainings
                stale.unlink()
            self.export(checkpoint, onnx_path)
        dist.barrier()
        return lambda: CCAMOnnxMaps(onnx_path, device=context.config.device)

    @staticmethod
    def _train(context, name: str, options: CCAMConfig, digest: str):
        from wsseg.cams import create_map_method
        from wsseg.models.classifier import load_classifier
        from wsseg.stages.ccam import train_ccam
        from wsseg.stages.maps import resolve_target

        config, device = context.config, context.device
        reference, gradcam = None, None
        if context.classifier is not None and options.polarity in ("auto", "classifier"):
            classifier, meta = load_classifier(context.classifier_checkpoint)
            gradcam = create_map_method("gradcam", model=classifier.to(device).eval())

            def reference(images):
                # The class the maps explain: the positive one, or (maps.target label / predicted: pets,
                # where both classes hold an object) the class the classifier sees in each image.
                if resolve_target(config.maps.target, train_set) == "positive":
                    targets = [meta.positive_index] * len(images)
                else:
                    with torch.no_grad():
                        targets = classifier(images).argmax(1).tolist()
                return gradcam.compute(images, targets)

        train_set = context.catalog.concat(options.train, f"maps.method_options.{name}.train")
        labelled = context.calibration_images() if options.polarity == "labelled" else None
        result = train_ccam(options, config.backbone, context.layout.checkpoints, device, train_set, config.seed,
                            context.classifier_checkpoint, reference, context.progress, digest, labelled)
        if gradcam is not None:
            gradcam.close()
        return {"checkpoint": str(result.checkpoint), "metrics": result.metrics}
