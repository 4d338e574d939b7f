"""The weight files, in one place: where g's and the segmenter's files live in a run folder, building the
segmenter around g's trunk, loading the frozen g, the `segmenter.pt` layout (written, read and validated here
only), and `model.init_from` (copying the matching tensors of another segmenter). Every file loads with
`torch.load(weights_only=True)`: plain tensors, never a pickle of code."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, config_from_dict
from .effnet import EfficientNetLite, load_state_dict_file, trunk_arch
from .files import atomic_torch_save, run_path
from .models import FrozenClassifier, Segmenter
from .multiclass import binary_head_rows, class_bias_init

SEGMENTER_FILE = "segmenter.pt"
CLASSIFIER_FILE = "classifier.pt"


class WeightsError(ValueError):
    """A weights file that is missing, unreadable or not the kind expected; the message names the file."""


# ---- where the files are ----

def classifier_path(cfg: Config) -> Path:
    """g's weights: `classifier.checkpoint`, else <run dir>/classifier.pt (what stage 1 writes)."""
    return Path(cfg.classifier.checkpoint) if cfg.classifier.checkpoint else run_path(cfg) / CLASSIFIER_FILE


def segmenter_path(cfg: Config) -> Path:
    """<run dir>/segmenter.pt: what stage 2 writes at its end."""
    return run_path(cfg) / SEGMENTER_FILE


# ---- g ----

def load_classifier(path: str | Path, num_classes: int, arch: str | None = None) -> EfficientNetLite:
    """A trained g from its checkpoint (plain tensors, loaded with weights_only=True). The network's arch is
    the one the tensors' names and shapes fit (a classifier.pt stores no config); `arch` given (the config's
    `classifier.arch`) must be that one."""
    state = load_state_dict_file(path)
    found = trunk_arch(state)
    if found is None:
        raise ValueError(f"classifier checkpoint {path} is not an EfficientNet-Lite network of any known arch "
                         "(lite0, lite2): its tensor names or shapes differ")
    if arch is not None and found != arch:
        raise ValueError(f"classifier checkpoint {path} holds an EfficientNet-{found.capitalize()} but "
                         f"classifier.arch is {arch}: set classifier.arch={found} or point to a {arch} g")
    net = EfficientNetLite(num_classes=num_classes, arch=found)
    fc = state.get("_fc.weight")
    if fc is None or fc.shape[0] != num_classes:
        got = "no `_fc` head" if fc is None else f"{fc.shape[0]} classes"
        raise ValueError(f"classifier checkpoint {path} has {got}; the data set has {num_classes} classes")
    net.load_state_dict(state, strict=True)
    return net


def load_frozen_g(cfg: Config, num_classes: int) -> tuple[EfficientNetLite, FrozenClassifier]:
    """g's network (whose trunk the segmenter's encoder shares) and the frozen g the objective asks."""
    path = classifier_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint {path} does not exist: run `wsssrec train-classifier` "
                                "first or set classifier.checkpoint=PATH")
    net = load_classifier(path, num_classes, cfg.classifier.arch)
    return net, FrozenClassifier(net)


# ---- the segmenter ----

def build_segmenter(cfg: Config, num_classes: int, g_net: EfficientNetLite | None) -> Segmenter:
    """f_m and f_x; with `model.encoder: efficientnet` their encoder is g's trunk (`g_net`). With
    `model.class_init_area` > 0 the mask head's bias starts each class component at that area
    (`multiclass.class_bias_init`)."""
    model = Segmenter(cfg.model, num_classes, trunk=g_net if cfg.model.encoder == "efficientnet" else None)
    if cfg.model.class_init_area > 0:
        class_bias_init(model.mask_decoder.head, num_classes, cfg.model.class_init_area)
    return model


@dataclass
class SegmenterFile:
    """The contents of a segmenter.pt: {"state_dict", "config", "classes"}."""
    path: Path
    state_dict: dict[str, torch.Tensor]
    config: Config
    classes: list[str]


def save_segmenter(model: Segmenter | dict[str, torch.Tensor], cfg: Config, classes: list[str], path: Path) -> None:
    """segmenter.pt: {"state_dict", "config", "classes"}, plain tensors (loads with weights_only=True)."""
    state = model if isinstance(model, dict) else model.state_dict()
    atomic_torch_save({"state_dict": state, "config": cfg.to_dict(), "classes": list(classes)}, path)


def read_segmenter_file(path: str | Path) -> SegmenterFile:
    """Read and check a segmenter.pt (the one parser of its layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text would suggest weights_only=False: never for a file handed over
        raise WeightsError(f"{path} is not a readable segmenter.pt: not a torch file of plain tensors (damaged, or "
                           "holding objects wsssrec does not unpickle, as that could run code)") from None
    except Exception as err:  # a truncated or garbage file: RuntimeError, EOFError, ... from deep inside torch
        reason = str(err).strip().split(". ")[0] or type(err).__name__
        raise WeightsError(f"{path} is not a readable segmenter.pt (truncated, damaged or not a torch file: "
                           f"{reason})") from None
    if not isinstance(blob, dict) or not {"state_dict", "config", "classes"} <= set(blob):
        raise WeightsError(f"{path} is not a wsssrec segmenter.pt (expected a state_dict with its stored config "
                           "and classes)")
    return SegmenterFile(path, blob["state_dict"], config_from_dict(blob["config"], strict=False),
                         list(blob["classes"]))


def load_segmenter(path: str | Path, g_net: EfficientNetLite | None = None) -> tuple[Segmenter, Config, list[str]]:
    """Rebuild the segmenter class from our package and load its tensors; `g_net` is the trunk to share (a
    fresh EfficientNet-Lite of the stored `classifier.arch`, overwritten by the stored trunk weights, when None;
    files from before that key hold Lite0, its default)."""
    stored = read_segmenter_file(path)
    arch = stored.config.classifier.arch
    if g_net is not None and g_net.arch != arch and stored.config.model.encoder == "efficientnet":
        raise WeightsError(f"segmenter {path} was trained on an EfficientNet-{arch.capitalize()} g (classifier.arch="
                           f"{arch}); the g given is an EfficientNet-{g_net.arch.capitalize()}")
    trunk = g_net if g_net is not None else EfficientNetLite(num_classes=len(stored.classes), arch=arch)
    model = build_segmenter(stored.config, len(stored.classes), trunk)
    model.load_state_dict(stored.state_dict, strict=True)
    return model, stored.config, stored.classes


MASK_HEAD_KEYS = ("mask_decoder.head.weight", "mask_decoder.head.bias")


def init_from_checkpoint(model: Segmenter, path: str | Path, head: str = "skip",
                         keep: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Copy every tensor of a segmenter checkpoint (a segmenter.pt, or a bare state_dict) whose name and shape
    match into `model` (the shared encoder, decoder stages). A mask head for another K or C does not match:
    with `head` "skip" it keeps its fresh initialisation; with "binary" (`model.init_from_head`; the checkpoint
    must be a binary segmenter.pt) its rows come from the binary head, the foreground row into every class row
    and the background rows into the background rows (`multiclass.binary_head_rows`), so every class starts
    with the binary model's foreground logits. Tensors whose names start with one of `keep` stay as they are
    (`train.start_from` keeps a frozen g-trunk encoder: it is this run's g's by construction). Returns the key
    names: loaded, skipped (shape mismatch), missing (not in the checkpoint), unused (only there), kept, and with
    "binary" `copied` (the head, row by row)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    source = blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
    if head == "binary":
        classes = blob.get("classes") if isinstance(blob, dict) else None
        if classes is None or len(classes) != 1:
            got = "no class list (a bare state_dict)" if classes is None else f"{len(classes)} classes {classes}"
            raise WeightsError(f"model.init_from_head=binary needs a binary segmenter.pt (1 class); {path} has {got}")
        rows = binary_head_rows(model.num_classes, model.K, source[MASK_HEAD_KEYS[0]].shape[0])
        source = {**source, **{key: source[key][rows] for key in MASK_HEAD_KEYS}}
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "skipped": [], "missing": [], "unused": sorted(set(source) - set(own)),
                                    "kept": []}
    matched = {}
    for key, tensor in own.items():
        if keep and key.startswith(keep):
            report["kept"].append(key)
        elif key not in source:
            report["missing"].append(key)
        elif source[key].shape != tensor.shape:
            report["skipped"].append(f"{key} {tuple(source[key].shape)} -> {tuple(tensor.shape)}")
        else:
            matched[key] = source[key]
            report["loaded"].append(key)
    if head == "binary":
        report["copied"] = [f"{key} rows {rows}" for key in MASK_HEAD_KEYS]
    model.load_state_dict(matched, strict=False)
    return report
