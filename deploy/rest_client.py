"""Client for a served segmenter (`mlflow models serve -m models:/wsssrec-segmenter@champion --env-manager
local`): posts images as base64 JPEG/PNG bytes and writes the returned label masks as PNGs.

    python -m deploy.rest_client --url http://127.0.0.1:5001 --images DIR --out DIR
"""
from __future__ import annotations

import argparse
import base64
from pathlib import Path

import numpy as np
import requests


def request_masks(url: str, images: list[bytes], probabilities: bool = False,
                  timeout: float = 300.0) -> list[dict[str, np.ndarray]]:
    """POST encoded images to `<url>/invocations`; per image {"mask": H×W uint8} (and "probabilities")."""
    payload = {"dataframe_split": {"columns": ["image"],
                                   "data": [[base64.b64encode(data).decode("ascii")] for data in images]}}
    if probabilities:
        payload["params"] = {"probabilities": True}
    response = requests.post(url.rstrip("/") + "/invocations", json=payload, timeout=timeout)
    if response.status_code != 200:
        raise RuntimeError(f"model server {url} answered HTTP {response.status_code}: {response.text[:2000]}")
    rows = response.json()["predictions"]
    out = []
    for row in rows:
        item = {"mask": np.asarray(row["mask"], dtype=np.uint8)}
        if "probabilities" in row and row["probabilities"] is not None:
            item["probabilities"] = np.asarray(row["probabilities"], dtype=np.float32)
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> None:
    from trainer.predict import IMAGE_SUFFIXES, label_png

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the model server, e.g. http://127.0.0.1:5001")
    parser.add_argument("--images", required=True, help="folder of JPEG/PNG images")
    parser.add_argument("--out", required=True, help="folder for <stem>.png label masks")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {args.images}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        for path, row in zip(chunk, request_masks(args.url, [p.read_bytes() for p in chunk])):
            label_png(row["mask"]).save(out / f"{path.stem}.png")
    print(f"wrote {len(paths)} label masks to {out}")


if __name__ == "__main__":
    main()
