"""Dense-CRF refinement of the method's masks (Krähenbühl & Koltun, "Efficient inference in fully connected
CRFs with Gaussian edge potentials", 2011), the standard last step of WSSS pipelines (AffinityNet, IRN,
ReCAM use it for their pseudo-labels). The label probabilities of an image, background and C classes, are the
unary term; a Gaussian kernel (smoothness) and a bilateral kernel (pixels of similar colour nearby take the
same label) are the pairwise terms; mean-field inference for `iterations` steps. pydensecrf2 does the work.

The refined probabilities go back into mask-logit form (`refine_logits`), so everything after it (the
foreground threshold, the preserve gate, resizing to an image's own size) is unchanged."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-6
FLOOR = -1e4  # the logit of the background components that carry no mass after refinement


@dataclass(frozen=True)
class CRFSettings:
    """`eval.crf*`: iterations of mean-field inference (0 = off), the Gaussian kernel's spatial width and
    weight, and the bilateral kernel's spatial width (pixels), colour width (0-255 units) and weight. The
    defaults scale AffinityNet's VOC values (sxy 3 / 80 at ~500 px, srgb 13, compat 3 / 10) to 96 px."""
    iterations: int = 0
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 16.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0

    @classmethod
    def of(cls, ecfg) -> "CRFSettings":
        """The `eval.crf_*` keys of an EvalConfig."""
        return cls(ecfg.crf_iterations, ecfg.crf_gaussian_sxy, ecfg.crf_gaussian_compat, ecfg.crf_bilateral_sxy,
                   ecfg.crf_bilateral_srgb, ecfg.crf_bilateral_compat)

    @property
    def on(self) -> bool:
        return self.iterations > 0


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exn:  # a dependency of wsssrec (pyproject.toml); built from its sdist
        raise ImportError("eval.crf_iterations > 0 needs pydensecrf2 (pip install pydensecrf2==1.1; it builds from "
                          "source, so a C++ compiler)") from exn
    return dcrf


def dense_crf(image: np.ndarray, probs: np.ndarray, settings: CRFSettings) -> np.ndarray:
    """image: H×W×3 uint8; probs: L×H×W label probabilities (summing to 1 over L) → refined L×H×W."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf needs an H×W×3 uint8 image, got {image.dtype} {image.shape}")
    labels, height, width = probs.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"dense_crf: image {image.shape[:2]} and probabilities {probs.shape[1:]} differ in size")
    dcrf = _densecrf()
    crf = dcrf.DenseCRF2D(width, height, labels)
    unary = -np.log(np.clip(probs, EPS, 1.0)).reshape(labels, -1).astype(np.float32)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(sxy=settings.bilateral_sxy, srgb=settings.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=settings.bilateral_compat)
    return np.asarray(crf.inference(settings.iterations), dtype=np.float32).reshape(labels, height, width)


def label_probabilities(mask_logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B×K×H×W mask logits → B×(C+1)×H×W: label 0 the background components' mass, c + 1 class c's."""
    comp = torch.softmax(mask_logits, dim=1)
    return torch.cat([comp[:, num_classes:].sum(1, keepdim=True), comp[:, :num_classes]], dim=1)


def refine_logits(mask_logits: torch.Tensor, images: torch.Tensor, num_classes: int,
                  settings: CRFSettings) -> torch.Tensor:
    """Mask logits refined by the dense CRF on each image (float B×3×H×W in [0, 1]): B×K×H×W again, class
    components the log of their refined probability, the first background component the log of the refined
    background mass and the other background components none, so the softmax, the argmax and the foreground
    mass of the result are the CRF's."""
    if not settings.on:
        return mask_logits
    probs = label_probabilities(mask_logits.float(), num_classes).cpu().numpy()
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    refined = torch.from_numpy(np.stack([dense_crf(img, p, settings) for img, p in zip(pixels, probs)]))
    log_q = refined.clamp_min(EPS).log().to(mask_logits.device, mask_logits.dtype)
    out = torch.full_like(mask_logits, FLOOR)
    out[:, :num_classes] = log_q[:, 1:]
    out[:, num_classes] = log_q[:, 0]
    return out
