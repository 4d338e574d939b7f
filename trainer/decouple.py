"""Context decoupling for stage 1 (CDA: Su et al., "Context Decoupling Augmentation for Weakly Supervised Semantic
Segmentation", ICCV 2021): a second round of g, trained on images whose objects a first-round segmenter has cut out
and moved. On biased data (toy-birds: birds on water, no bird on land) g learns the background as evidence, and
stage 2 inherits it through L_preserve and L_delete. Here, in a share of the (tagged, untagged) pairs of each batch,
the tagged image's objects are pasted onto the untagged image (the tags go with them) and the untagged image's
content fills the place where the objects were (no tags left): a bird on land, and water without a bird. Only the
image-level tags and the model's own masks are used; g never sees a ground-truth mask."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .losses import erased, foreground, mask_lets, pasted
from .models import mask_logits
from .viz import to_rgb
from .weights import WeightsError, load_segmenter


def decouple_pairs(labels: torch.Tensor, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (tagged, untagged) of the pairs to decouple: the batch's tagged and untagged images each in a
    random order, zipped to the shorter list, each pair kept with probability `p`. Every image is in at most one
    pair, so the batch keeps its size and its share of tagged images."""
    tagged = torch.nonzero(labels.sum(dim=1) > 0).flatten()
    untagged = torch.nonzero(labels.sum(dim=1) == 0).flatten()
    tagged = tagged[torch.randperm(len(tagged), generator=generator)]
    untagged = untagged[torch.randperm(len(untagged), generator=generator)]
    n = min(len(tagged), len(untagged))
    keep = torch.rand(n, generator=generator) < p
    return tagged[:n][keep], untagged[:n][keep]


def decouple_images(images: torch.Tensor, fg_i: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                    dilate: int) -> torch.Tensor:
    """The batch with the pairs (i tagged, j untagged) decoupled, given the tagged images' foreground `fg_i`
    (len(i)×H×W, soft): image i becomes fg·I_i + (1 − fg)·I_j (i's objects on j's context, i's tags), image j
    becomes I_i with its objects, hardened at 0.5 and grown by `dilate` pixels, replaced by I_j there (i's
    context, no tags: j's). The input is not written."""
    out = images.clone()
    if len(i):
        fg_i = fg_i.to(images.dtype)
        out[i] = pasted(fg_i, images[i], images[j])
        out[j] = erased(fg_i, images[i], images[j], dilate)
    return out


def decouple_batch(images: torch.Tensor, labels: torch.Tensor, fg: torch.Tensor, p: float, dilate: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`decouple_pairs` drawn, then `decouple_images` with every image's foreground `fg` (B×H×W) given. Returns
    the images, the labels (unchanged: the tags stay with their slot) and the pairs."""
    i, j = decouple_pairs(labels, p, generator)
    return decouple_images(images, fg[i], i, j, dilate), labels, (i, j)


class Decoupler:
    """The first-round segmenter, frozen, and the decoupling of stage-1 batches with its masks."""

    def __init__(self, path: str | Path, classes: list[str], p: float, dilate: int) -> None:
        model, _, stored_classes = load_segmenter(path)
        if list(stored_classes) != list(classes):
            raise WeightsError(f"classifier.decouple_from {path}: a segmenter of the classes {stored_classes}, but "
                               f"the data set's are {list(classes)} (expected a first-round segmenter of this data)")
        self.model = model.eval().requires_grad_(False)
        self.num_classes, self.p, self.dilate = len(classes), p, dilate

    def to(self, device) -> "Decoupler":
        self.model.to(device)
        return self

    @torch.no_grad()
    def foreground(self, images: torch.Tensor) -> torch.Tensor:
        """The segmenter's soft foreground (the sum of the class mask-lets), flip-averaged as at inference; a batch
        whose sides are not multiples of the encoder's divisor is padded at the bottom and right, as evaluation
        pads, and cut back."""
        height, width = images.shape[-2:]
        divisor = getattr(self.model, "divisor", 1)
        padded = F.pad(images, (0, -width % divisor, 0, -height % divisor))
        logits = mask_logits(self.model, padded, flip=True)[..., :height, :width]
        return foreground(mask_lets(logits), self.num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The batch decoupled (`decouple_batch`); the segmenter runs on the paired tagged images only."""
        i, j = decouple_pairs(labels, self.p, torch.Generator().manual_seed(seed))
        if not len(i):
            return images, labels, (i, j)
        return decouple_images(images, self.foreground(images[i]), i, j, self.dilate), labels, (i, j)


def save_examples(before: torch.Tensor, after: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor], path: Path,
                  rows: int = 8) -> Path | None:
    """A picture of what g is shown: per pair, tagged image | untagged image | objects moved | context left."""
    i, j = pairs
    if not len(i):
        return None
    cells = [[to_rgb(before[a]), to_rgb(before[b]), to_rgb(after[a]), to_rgb(after[b])]
             for a, b in zip(i[:rows].tolist(), j[:rows].tolist())]
    grid = np.concatenate([np.concatenate(row, axis=1) for row in cells], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    return path
