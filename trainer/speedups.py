"""Exact speed-ups of the training step and of inference (the same arithmetic up to floating-point rounding),
each a switch so bench/step.py can measure it on its own and a user can turn one off to rule it out
(`train.speedups`, default: all on). Like torch.backends' flags they are process-wide: `configure` sets them
from a config (the trainers call it), `enabled` reads them where the work is done.

- `blur_matmul`: the separable Gaussian blur (local-mean image-lets, the fill) as two matrix products with the
  reflect-padded kernel as a banded matrix, instead of two depthwise 1-D convolutions (a slow conv path on CPUs);
- `aux_masks_only`: the extra passes of L_paste and L_erase run the mask network only (their image-lets were
  computed and thrown away);
- `aux_batched`: those two passes as one forward on the concatenated images (exact: a frozen encoder has its
  BatchNorm in eval mode and the decoder has none; with a trainable encoder the passes stay apart);
- `frozen_no_grad`: a frozen encoder runs under no_grad when its input needs no gradient (no autograd records);
- `bn_folded`: an EfficientNet in eval mode (g in stage 2 and in evaluation, the frozen encoder) folds each
  BatchNorm into the convolution before it, on the fly from the current weights and running statistics (one
  convolution instead of a convolution and an affine pass, forward and backward);
- `native_pad`: EfficientNet's TensorFlow "SAME" padding, where it is symmetric (every stride-1 convolution),
  is the convolution's own zero padding instead of a padded copy of the input (stage 1 too);
- `mirror_pad`: the rest of that padding, stride 2's asymmetric one (one more row and column at the bottom
  right), vanishes in the mirrored image: g's classification and CAM forwards (stage 1, stage 2, evaluation) run
  on the input flipped in both axes with flipped kernels, where every stride-2 layer pads symmetrically too
  (`effnet.mirrored`); the pooled logits need no flip back, the CAM maps one;
- `dense_grads`: the decoder's upsampled maps get their gradient as a dense tensor (after torch.cat it is a
  strided channel slice, on which the bilinear upsampling's backward takes a slow path);
- `inplace_act`: the activations after a convolution (EfficientNet's ReLU6, the decoder's LeakyReLU) in place
  (ReLU6 under autograd through a function whose backward reads the result: torch's relu6_ clones its input).
"""
from __future__ import annotations

SPEEDUPS = ("blur_matmul", "aux_masks_only", "aux_batched", "frozen_no_grad", "bn_folded", "native_pad",
            "mirror_pad", "dense_grads", "inplace_act")

_enabled: set[str] = set(SPEEDUPS)


def check(names) -> list[str]:
    """`names` as a list, each one of SPEEDUPS (a ValueError names the unknown ones and the known)."""
    names = list(names)
    unknown = [n for n in names if n not in SPEEDUPS]
    if unknown:
        raise ValueError(f"unknown speed-up(s) {unknown} in train.speedups; expected any of {list(SPEEDUPS)}")
    return names


def set_enabled(names) -> None:
    """Turn on exactly `names` (the rest off)."""
    global _enabled
    _enabled = set(check(names))


def configure(cfg) -> None:
    """From a Config: `train.speedups`."""
    set_enabled(cfg.train.speedups)


def enabled(name: str) -> bool:
    return name in _enabled
