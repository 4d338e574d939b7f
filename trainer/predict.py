"""`wsssrec predict`: segment a folder or S3 prefix of images with a segmenter from the registry
(models:/wsssrec-segmenter@champion), a run (runs:/...), a model folder or a local segmenter.pt. Writes one
label PNG per image (same stem and sub-folder; 0 background, c + 1 class c) and an overlay JPEG in
`overlays/`, at the image's own size."""
from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_shards.errors import DataError
from data_shards.manifest import open_url

from .config import Config
from .files import run_dir
from .images import ModelInputError, decode_image
from .inference import BATCH_SIZE, PredictSettings, SegmenterPredictor
from .model_uri import download, is_model_uri
from .models import FrozenClassifier
from .pyfunc import load_model_dir
from .tracking import tracking_uri
from .viz import PALETTE, colorize
from .weights import CLASSIFIER_FILE, classifier_path, load_classifier, load_segmenter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(source: str) -> list[tuple[str, str]]:
    """(URL, path relative to `source`) of every image under a folder or s3:// prefix, or one image file."""
    if source.startswith("s3://"):
        from data_shards.s3 import list_sizes

        prefix = source if source.endswith("/") else source + "/"
        urls = sorted(u for u in list_sizes(prefix) if u.lower().endswith(IMAGE_SUFFIXES))
        if not urls and source.lower().endswith(IMAGE_SUFFIXES):
            return [(source, source.rsplit("/", 1)[-1])]
        found = [(u, u[len(prefix):]) for u in urls]
    else:
        root = Path(source.removeprefix("file://"))
        if root.is_file():
            return [(str(root), root.name)]
        if not root.is_dir():
            raise FileNotFoundError(f"images {source} is neither a folder, an image file nor an s3:// prefix")
        found = [(str(p), p.relative_to(root).as_posix()) for p in sorted(root.rglob("*"))
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}")
    return found


def label_png(mask: np.ndarray) -> Image.Image:
    """A palette PNG whose pixel values are the labels (so it reads back as labels) and that shows in colour."""
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette(PALETTE.flatten().tolist() + [255] * (768 - PALETTE.size))
    return img


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with each labelled pixel tinted in its label's colour (background left as it is)."""
    tint = colorize(mask).astype(np.float32)
    blend = np.where((mask > 0)[..., None], (1 - alpha) * image + alpha * tint, image)
    return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8))


def _write(url: str, data: bytes) -> None:
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
    with open_url(url, "wb") as f:
        f.write(data)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def predict_images(predictor: SegmenterPredictor, source: str, out: str,
                   batch_size: int = BATCH_SIZE) -> tuple[list[str], list[str]]:
    """Segment every image under `source`. An image that cannot be read is named on stderr and skipped; the
    others are still written. Returns the URLs of the label PNGs written under `out` and the failures
    ("<url>: <why>")."""
    if getattr(predictor, "kind", "") != "segmenter":
        raise ValueError(f"wsssrec predict needs a segmenter; this model is a {predictor.kind}")
    images = list_images(source)
    out = out.rstrip("/") or "/"
    join = (lambda *p: "/".join([out, *p])) if "://" in out else (lambda *p: os.path.join(out, *p))
    written, failed = [], []
    bar = tqdm(total=len(images), desc="predict", unit="img", dynamic_ncols=True)
    for start in range(0, len(images), batch_size):
        chunk, pixels = [], []
        for url, rel in images[start:start + batch_size]:
            try:
                with open_url(url, "rb") as f:
                    pixels.append(decode_image(f.read(), url))
                chunk.append((url, rel))
            except (OSError, DataError) as err:
                message = str(err) if str(err).startswith(url) else f"{url}: {err}"
                failed.append(message)
                tqdm.write(f"wsssrec: skipped {message}", file=sys.stderr)
        rows = predictor.segment(pixels, batch_size=batch_size) if pixels else []
        for (url, rel), image, row in zip(chunk, pixels, rows):
            stem = rel.rsplit(".", 1)[0]
            mask_url = join(f"{stem}.png")
            _write(mask_url, _encode(label_png(row["mask"]), "PNG"))
            _write(join("overlays", f"{stem}.jpg"), _encode(overlay(image, row["mask"]), "JPEG"))
            written.append(mask_url)
        bar.update(min(batch_size, len(images) - start))
    bar.close()
    return written, failed


def predict(model: str, source: str, out: str, batch_size: int = BATCH_SIZE, cache_dir: str | None = None,
            classifier: str | None = None) -> list[str]:
    """`wsssrec predict`: load the segmenter named by `model` (URI, folder or checkpoint), then segment. Images
    that cannot be read are skipped and named; after the others are written, a ModelInputError lists them."""
    predictor = load_predictor(model, cache_dir, classifier=classifier)
    written, failed = predict_images(predictor, source, out, batch_size)
    print(f"wrote {len(written)} label masks (0 background, c + 1 class c; classes: "
          f"{', '.join(predictor.classes)}) and overlays to {out}")
    if failed:
        raise ModelInputError(f"{len(failed)} of {len(written) + len(failed)} images could not be read and have "
                              f"no mask: {'; '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}")
    return written


def gate_classifier_path(segmenter: Path, cfg: Config, classifier: str | None = None) -> Path:
    """g's weights for a segmenter.pt whose config turns the gate on: `classifier` when given; else the path
    its training config names (relative to the working directory of that run) or, when that does not exist
    here, the same file name beside the segmenter.pt (the run folder holds both)."""
    if classifier:
        path = Path(classifier)
        if not path.is_file():
            raise FileNotFoundError(f"--classifier {classifier} does not exist")
        return path
    stored = classifier_path(cfg)
    candidates = [stored, segmenter.parent / stored.name, segmenter.parent / CLASSIFIER_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"the segmenter {segmenter} gates its masks with g (eval.gate_threshold = "
                            f"{cfg.eval.gate_threshold}, eval.tag_threshold = {cfg.eval.tag_threshold}) but g's "
                            "weights are in none of "
                            f"{', '.join(dict.fromkeys(map(str, candidates)))}: pass --classifier PATH")


def load_predictor(uri: str, cache_dir: str | Path | None = None, classifier: str | None = None):
    """A segmenter or classifier predictor from a registry/run URI, a downloaded model folder, or a local
    checkpoint file (segmenter.pt; `classifier` overrides where its gate's g is); weights always load with
    weights_only=True."""
    path = Path(uri)
    if not is_model_uri(uri):
        if path.is_dir():
            return load_model_dir(path)
        if path.is_file():
            model, cfg, classes = load_segmenter(path)
            if not PredictSettings.of(cfg.eval).needs_g:
                return SegmenterPredictor(model, cfg, classes)
            g = FrozenClassifier(load_classifier(gate_classifier_path(path, cfg, classifier), len(classes)))
            return SegmenterPredictor(model, cfg, classes, g=g, gate_threshold=cfg.eval.gate_threshold)
        raise FileNotFoundError(f"model {uri} is neither a models:/ or runs:/ URI nor an existing checkpoint "
                                "or model folder")
    if cache_dir:
        _, local = download(uri, Path(cache_dir) / "model")
        return load_model_dir(local)
    with tempfile.TemporaryDirectory(prefix="wsssrec-model-") as tmp:  # weights are read into memory
        _, local = download(uri, Path(tmp) / "model")
        return load_model_dir(local)


def export_sample_images(cfg: Config, out: Path, count: int = 8) -> Path:
    """A few images of the last evaluation split as plain JPEGs, so the printed predict command runs as is."""
    from data_shards.loader import raw_samples
    from data_shards.manifest import read_manifest

    out.mkdir(parents=True, exist_ok=True)
    split = read_manifest(cfg.data.url).split(cfg.eval.splits[-1])
    written = 0
    for shard in split.shards:
        for sample in raw_samples(shard):
            if written >= count:
                return out
            (out / f"{sample['__key__'].replace('/', '_')}.jpg").write_bytes(sample["jpg"])
            written += 1
    return out


def predict_hint(cfg: Config, version) -> str:
    """The command that segments images with the segmenter the demo just registered."""
    samples = export_sample_images(cfg, run_dir(cfg) / "sample_images")
    uri = tracking_uri(cfg)
    env = "" if uri == "sqlite:///mlflow.db" else f"MLFLOW_TRACKING_URI={uri} "
    script = Path(sys.executable).parent / "wsssrec"  # `make demo` runs from .venv, which may not be on PATH
    command = "wsssrec" if shutil.which("wsssrec") == str(script) or not script.exists() else os.path.relpath(script)
    return (f"segmenter registered as models:/{version.name}/{version.version} with alias champion; segment "
            f"images with it:\n  {env}{command} predict --model models:/{version.name}@champion --images {samples} "
            f"--out {run_dir(cfg) / 'predicted'}")
