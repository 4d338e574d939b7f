"""Loader throughput, measured side by side in one run: local disk vs a local S3 server (s3rver), against the
in-memory decode limit and against the training step's consumption rate, at 1 and 2 DataLoader workers.

    python bench/loader.py [--train 2000 --size 96 --batch 16 --rounds 3 --threads 1]

Builds toy-birds (train split) into a temp folder, uploads it to an s3rver it starts on 127.0.0.1 (installed
by the test set-up, tests/s3_server.py), then measures in rounds, each configuration once per round in
turn, so a load change on a shared machine hits every configuration alike; medians are reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

from data_shards.loader import LoaderOptions, as_float, decode_sample, make_loader, raw_samples  # noqa: E402
from data_shards.manifest import read_manifest  # noqa: E402
from data_shards.toy_birds import build_toy_birds  # noqa: E402
from data_shards.writer import copy_dataset  # noqa: E402

BUCKET = "bench"


def loader_rate(url: str, args, workers: int, clock=time.perf_counter, **options) -> float:
    """Images/s over one training epoch, DataLoader start-up included (the first epoch of a run pays it).
    The trainer's settings: uint8 batches, the lean tar reader; `options` override them (the "before" row:
    webdataset's tar reader, float batches made in the loader). The uint8 → float conversion of today's batches
    is the training step's (on its device: `accel.prepare_images`), so it is not timed here but on its own
    (`float_rate`)."""
    settings = {"uint8": True, "draft": args.draft, **options}
    start = clock()
    loader = make_loader(url, "train", LoaderOptions(image_size=args.size, batch_size=args.batch, train=True,
                                                     seed=0, epoch=0, shuffle_buffer=512, num_workers=workers,
                                                     **settings))
    images = sum(len(batch["key"]) for batch in loader)
    return images / (clock() - start)


def float_rate(args, clock=time.perf_counter) -> float:
    """Images/s of the training side's uint8 → float conversion of loader batches (`as_float`), on this CPU."""
    batch = torch.zeros(args.batch, args.size, args.size, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    start, n = clock(), 200
    for _ in range(n):
        as_float(batch)
    return n * args.batch / (clock() - start)


def read_rate(url: str) -> float:
    """MB/s of reading the train shards' bytes, no tar parsing, no decoding."""
    from data_shards.manifest import open_url

    start, total = time.perf_counter(), 0
    for shard in read_manifest(url).split("train").shards:
        with open_url(shard, "rb") as f:
            while chunk := f.read(2**20):
                total += len(chunk)
    return total / 1e6 / (time.perf_counter() - start)


def decode_rate(raws: list[dict], args, classes: int, clock=time.perf_counter) -> float:
    """Images/s of decode + resize + flip of the same JPEG bytes already in memory, in this process."""
    start = clock()
    for i, raw in enumerate(raws):
        decode_sample(raw, image_size=args.size, num_classes=classes, with_mask=False, flip=bool(i & 1),
                      draft=args.draft)
    return len(raws) / (clock() - start)


def train_step_rate(args) -> float:
    """Images/s of stage-2 training steps of the default model (configs/toy_birds.yaml): forward, objective,
    backward, Adam step, batch `--batch` at `--size` px, on synthetic images."""
    from trainer.classifier import build_classifier
    from trainer.config import load_config
    from trainer.objectives import objective
    from trainer.models import FrozenClassifier, Segmenter

    cfg = load_config(os.path.join(ROOT, args.config))
    g_net = build_classifier(cfg.classifier, 1)
    g = FrozenClassifier(g_net)
    model = Segmenter(cfg.model, 1, trunk=g_net)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=generator)
    labels = (torch.rand(args.batch, 1, generator=generator) > 0.5).float()

    def step():
        terms = objective(model(images), images, labels, g, cfg.objective, segment=model)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    model.train()
    for _ in range(2):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    return args.train_steps * args.batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="toy-birds train samples")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (data and model)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--maxcount", type=int, default=250, help="samples per shard")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=8, help="timed training steps per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    parser.add_argument("--config", default="configs/toy_birds.yaml",
                        help="the training step's model and objective (configs/reference_224.yaml: the reference)")
    parser.add_argument("--data-size", type=int, default=None,
                        help="side of the stored images (default --size; larger shows JPEG draft decoding)")
    parser.add_argument("--draft", action="store_true", help="JPEG draft decoding in the loader and the decode")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from s3_server import S3Server

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        local = build_toy_birds(os.path.join(tmp, "toy"), size=args.data_size or args.size, maxcount=args.maxcount,
                                progress=False,
                                counts={"train": args.train, "val": 0, "test_aligned": 0, "test_conflict": 0})
        server = S3Server(os.path.join(tmp, "s3rver"), buckets=(BUCKET,))
        server.start()
        try:
            os.environ.update(server.env)
            remote = copy_dataset(local, f"s3://{BUCKET}/toy")
            manifest = read_manifest(local)
            raws = [{k: v for k, v in raw.items() if k in ("__key__", "jpg", "json")}
                    for shard in manifest.split("train").shards for raw in raw_samples(shard)]
            shard_mb = sum(os.path.getsize(s) for s in manifest.split("train").shards) / 1e6
            print(f"toy-birds train: {len(raws)} images at {args.size} px, "
                  f"{len(manifest.split('train').shards)} shards, {shard_mb:.1f} MB; batch {args.batch}; "
                  f"{os.cpu_count()} CPUs; training step with {args.threads} torch thread(s)", flush=True)

            measures = {
                "read local (MB/s)": lambda: read_rate(local),
                "read s3 (MB/s)": lambda: read_rate(remote),
                "decode in memory, 1 process": lambda: decode_rate(raws, args, len(manifest.classes)),
                "loader local, in-process (0 workers)": lambda: loader_rate(local, args, 0),
                "loader local, in-process, before (webdataset tar reader, float batches)":
                    lambda: loader_rate(local, args, 0, uint8=False, tar_reader="webdataset"),
                "loader local, 1 worker": lambda: loader_rate(local, args, 1),
                "loader s3, 1 worker": lambda: loader_rate(remote, args, 1),
                "loader local, 2 workers": lambda: loader_rate(local, args, 2),
                "loader s3, 2 workers": lambda: loader_rate(remote, args, 2),
                # the same two in CPU time of this process (immune to other jobs on a shared machine)
                "decode in memory, 1 process, per CPU-s": lambda: decode_rate(raws, args, len(manifest.classes),
                                                                          time.process_time),
                "loader local, in-process, per CPU-s": lambda: loader_rate(local, args, 0, time.process_time),
                "loader local, in-process, before, per CPU-s":
                    lambda: loader_rate(local, args, 0, time.process_time, uint8=False, tar_reader="webdataset"),
                "uint8 → float on the training side": lambda: float_rate(args),
                "training step (stage 2)": lambda: train_step_rate(args),
            }
            results: dict[str, list[float]] = {name: [] for name in measures}
            for round_ in range(args.rounds):
                for name, measure in measures.items():
                    results[name].append(measure())
                print(f"round {round_ + 1}/{args.rounds}: " +
                      ", ".join(f"{n} {v[-1]:.0f}" for n, v in results.items()), flush=True)
        finally:
            server.stop()
    report(results)


def report(results: dict[str, list[float]]) -> None:
    med = {name: statistics.median(values) for name, values in results.items()}
    print("\n| measurement | median (images/s unless noted) | all rounds |\n|---|---:|---|")
    for name, values in results.items():
        print(f"| {name} | {med[name]:.0f} | {', '.join(f'{v:.0f}' for v in values)} |")
    decode, train = med["decode in memory, 1 process"], med["training step (stage 2)"]
    ratios = [
        ("S3 / local, 1 worker", med["loader s3, 1 worker"] / med["loader local, 1 worker"]),
        ("S3 / local, 2 workers", med["loader s3, 2 workers"] / med["loader local, 2 workers"]),
        ("S3 / local, raw read MB/s", med["read s3 (MB/s)"] / med["read local (MB/s)"]),
        ("loader local in-process / in-memory decode (1 process)",
         med["loader local, in-process (0 workers)"] / decode),
        ("loader local in-process before / in-memory decode (1 process)",
         med["loader local, in-process, before (webdataset tar reader, float batches)"] / decode),
        ("loader local in-process / in-memory decode, CPU time",
         med["loader local, in-process, per CPU-s"] / med["decode in memory, 1 process, per CPU-s"]),
        ("loader local in-process before / in-memory decode, CPU time",
         med["loader local, in-process, before, per CPU-s"] / med["decode in memory, 1 process, per CPU-s"]),
        ("loader local in-process, now / before",
         med["loader local, in-process (0 workers)"]
         / med["loader local, in-process, before (webdataset tar reader, float batches)"]),
        ("loader local 1 worker / in-memory decode (1 process)", med["loader local, 1 worker"] / decode),
        ("loader s3 1 worker / in-memory decode (1 process)", med["loader s3, 1 worker"] / decode),
        ("loader local 2 workers / 2 x in-memory decode", med["loader local, 2 workers"] / (2 * decode)),
        ("loader s3 2 workers / 2 x in-memory decode", med["loader s3, 2 workers"] / (2 * decode)),
        ("loader s3 1 worker / training step", med["loader s3, 1 worker"] / train),
        ("loader s3 2 workers / training step", med["loader s3, 2 workers"] / train),
        ("loader local 2 workers / training step", med["loader local, 2 workers"] / train),
    ]
    print("\n| ratio | value |\n|---|---:|")
    for name, value in ratios:
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
