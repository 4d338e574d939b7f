"""`wsssrec data ...` subcommands: build toy-birds, toy-multi or toy-multi8, convert user data, upload and list
a data set.

Every OUT / MANIFEST argument takes a local folder or an s3://bucket/prefix (credentials and endpoint from
the standard AWS environment: AWS_ENDPOINT_URL, AWS_PROFILE, ...)."""
from __future__ import annotations

import argparse
import os

from .errors import DataError
from .manifest import read_manifest, url_sizes


def _toy(args: argparse.Namespace) -> None:
    if args.only:
        _toy_only(args)
        return
    from .toys import build_toy

    counts = {"train": args.train, "val": args.val, "test_aligned": args.test, "test_conflict": args.test}
    path = build_toy(args.data_command, args.out, seed=args.seed, size=args.size or 96, rho=args.rho,
                     counts=counts, cache_dir=args.cache_dir, maxcount=args.maxcount,
                     paired=args.paired)
    print(f"wrote {args.data_command} to {path}")
    _print_manifest(path)


def _toy_only(args: argparse.Namespace) -> None:
    """`--only test_paired`: add the paired split to an existing toy-birds build (manifest replaced last)."""
    from .toy_birds import PAIRED_SPLIT, add_paired_split

    if args.data_command != "toy-birds" or args.only != PAIRED_SPLIT:
        raise DataError(f"--only {args.only} is not supported for {args.data_command}: only `wsssrec data "
                        f"toy-birds --only {PAIRED_SPLIT}` adds a split to an existing build (rebuild for others)")
    path = add_paired_split(args.out, seed=args.seed, size=args.size, pairs=args.paired,
                            cache_dir=args.cache_dir, maxcount=args.maxcount)
    print(f"wrote {args.data_command} to {path}")
    _print_manifest(path)


def _convert_folder(args: argparse.Namespace) -> None:
    from .convert import convert_folder

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    path = convert_folder(args.images, args.tags, args.out, args.split, masks_dir=args.masks,
                          classes=classes, maxcount=args.maxcount)
    print(f"wrote split {args.split!r} to {path}")
    _print_manifest(path)


def _convert_voc(args: argparse.Namespace) -> None:
    from .convert import convert_voc

    path = convert_voc(args.root, args.out, maxcount=args.maxcount, train_list=args.train_list)
    print(f"wrote PASCAL VOC to {path}")
    _print_manifest(path)


def _convert_coco(args: argparse.Namespace) -> None:
    from .coco import convert_coco

    with_masks = {"auto": None, "yes": True, "no": False}[args.masks]
    path = convert_coco(args.annotations, args.images, args.out, args.split, with_masks=with_masks,
                        keep_empty=args.keep_empty, maxcount=args.maxcount, limit=args.limit)
    print(f"wrote COCO split {args.split!r} to {path}")
    _print_manifest(path)


def _print_manifest(url: str) -> list[str]:
    manifest = read_manifest(url)
    print(f"manifest {manifest.url}")
    print(f"classes ({len(manifest.classes)}): {', '.join(manifest.classes)}")
    sizes = url_sizes([s for info in manifest.splits.values() for s in info.shards])
    missing = [url for url, size in sizes.items() if size is None]
    total_bytes = 0
    for name, info in manifest.splits.items():
        size = sum(sizes[s] or 0 for s in info.shards)
        total_bytes += size
        print(f"  {name:<16} {info.samples:>8} samples {len(info.shards):>4} shards {size / 1e6:>9.2f} MB"
              f"  masks: {'yes' if info.has_masks else 'no'}")
    if missing:
        print(f"MISSING {len(missing)} shard(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    print(f"total {sum(i.samples for i in manifest.splits.values())} samples, {total_bytes} bytes")
    return missing


def _ls(args: argparse.Namespace) -> None:
    missing = _print_manifest(args.manifest)
    if missing:  # a data set that cannot be read in full is an error, for scripts too
        raise DataError(f"manifest {args.manifest} lists {len(missing)} shard(s) that do not exist: {missing[0]}"
                        f"{' ...' if len(missing) > 1 else ''}")


def _upload(args: argparse.Namespace) -> None:
    from .writer import copy_dataset

    source = args.source if "://" in args.source else os.path.abspath(args.source)  # shards keep their names
    path = copy_dataset(source, args.dest, overwrite=args.overwrite,
                        progress=lambda src, dst: print(f"copied {src} -> {dst}", flush=True))
    print(f"wrote manifest {path} (last)")
    _print_manifest(path)


def register(subparsers) -> argparse.ArgumentParser:
    """Add `data ...` to a top-level argparse subparsers object; each leaf sets `func(args)`."""
    data = subparsers.add_parser("data", help="build, convert and list shard data sets")
    commands = data.add_subparsers(dest="data_command", required=True)

    for name, what, rho_help in (
            ("toy-birds", "the toy-birds data set", "P(water | bird) = P(land | no bird) in train/val"),
            ("toy-multi", "the multi-class toy-multi data set (bird, mammal, fish, fruit)",
             "P(own background group | class) in train/val: bird, fish on water; mammal, fruit on land"),
            ("toy-multi8", "toy-multi8: C = 8 (toy-multi's classes + vegetable, vehicle, instrument, tool), "
                           "co-occurring class pairs",
             "P(own background group | class) in train/val: bird, fish, instrument, tool on water; mammal, "
             "fruit, vegetable, vehicle on land")):
        toy = commands.add_parser(name, help=f"build {what} (fetches Debian packages)")
        toy.add_argument("--out", required=True, help="output folder or s3:// prefix for shards and manifest.json")
        toy.add_argument("--seed", type=int, default=0)
        toy.add_argument("--size", type=int, default=None,
                         help="image side in pixels (default 96; with --only, the data set's own size)")
        toy.add_argument("--rho", type=float, default=0.9, help=rho_help)
        toy.add_argument("--train", type=int, default=2000, help="train samples")
        toy.add_argument("--val", type=int, default=200, help="val samples")
        toy.add_argument("--test", type=int, default=300, help="samples in each of test_aligned, test_conflict")
        if name == "toy-birds":
            toy.add_argument("--paired", type=int, default=200,
                             help="pairs in test_paired (each test layout on a water and on a land background; "
                                  "the same pairs for every --rho); 0: no paired split")
            toy.add_argument("--only", metavar="SPLIT", default=None,
                             help="add only this split to the existing data set at --out (test_paired: its "
                                  "shards, then the manifest in one atomic write; other splits untouched)")
        else:
            toy.set_defaults(paired=None, only=None)
        toy.add_argument("--cache-dir", default=None,
                         help="Debian package cache (default $WSSSREC_CACHE/debian or ~/.cache/wsssrec/debian)")
        toy.add_argument("--maxcount", type=int, default=250,
                         help="samples per shard (several shards per split, so ranks x workers all get some)")
        toy.set_defaults(func=_toy)

    convert = commands.add_parser("convert", help="convert user data to shards")
    kinds = convert.add_subparsers(dest="convert_kind", required=True)
    folder = kinds.add_parser("folder", help="an image folder with a tags CSV (columns image,labels)")
    folder.add_argument("--images", required=True, help="image folder")
    folder.add_argument("--tags", required=True, help="CSV with columns image,labels (class names, ';' or space)")
    folder.add_argument("--out", required=True, help="output folder or s3:// prefix")
    folder.add_argument("--split", required=True, help="split name, e.g. train or val")
    folder.add_argument("--masks", default=None, help="mask folder (same stem, .png) for an evaluation split")
    folder.add_argument("--classes", default=None, help="comma-separated class names (default: sorted union)")
    folder.add_argument("--maxcount", type=int, default=1000)
    folder.set_defaults(func=_convert_folder)
    voc = kinds.add_parser("voc", help="PASCAL VOC 2012 (JPEGImages, ImageSets/Segmentation, SegmentationClass)")
    voc.add_argument("--root", required=True)
    voc.add_argument("--out", required=True, help="output folder or s3:// prefix")
    voc.add_argument("--train-list", default=None,
                     help="train image ids, e.g. train_aug.txt (a path or a name in ImageSets/Segmentation/): "
                          "tags then come from Annotations/*.xml, train masks from SegmentationClassAug/ if present")
    voc.add_argument("--maxcount", type=int, default=1000)
    voc.set_defaults(func=_convert_voc)
    coco = kinds.add_parser("coco", help="MS COCO 2014, one split per call (tags from the instances; masks "
                                         "built from them for evaluation splits)")
    coco.add_argument("--annotations", required=True, help="instances JSON, e.g. annotations/instances_val2014.json")
    coco.add_argument("--images", required=True, help="image folder, e.g. val2014/")
    coco.add_argument("--out", required=True, help="output folder or s3:// prefix")
    coco.add_argument("--split", required=True, help="split name: train or val")
    coco.add_argument("--masks", choices=("auto", "yes", "no"), default="auto",
                      help="store semantic masks (auto: for every split but train)")
    coco.add_argument("--keep-empty", action="store_true", help="keep images without any annotation")
    coco.add_argument("--limit", type=int, default=None, help="convert only the first N images (smoke runs)")
    coco.add_argument("--maxcount", type=int, default=1000)
    coco.set_defaults(func=_convert_coco)

    ls = commands.add_parser("ls", help="show a data set's classes, splits and sizes")
    ls.add_argument("manifest", help="manifest.json or the folder holding it (local or s3://)")
    ls.set_defaults(func=_ls)

    upload = commands.add_parser("upload", help="copy a data set to s3:// (shards first, manifest last)")
    upload.add_argument("source", help="local data set: its folder or manifest.json")
    upload.add_argument("dest", help="destination prefix, e.g. s3://bucket/datasets/toy-birds")
    upload.add_argument("--overwrite", action="store_true", help="replace a data set already at DEST")
    upload.set_defaults(func=_upload)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_shards")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except DataError as exn:
        parser.exit(2, f"error: {exn}\n")
    return 0
