"""The `wsssrec` command: data tools, stage 1 (`train-classifier`), stage 2 (`train`), `eval`, and `demo`
(the whole pipeline on the embedded defaults). Every training command takes `-c CONFIG` plus `key.sub=value`
overrides."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_shards.manifest import DataError

from .config import ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML experiment config (configs/toy_birds.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _config(args):
    return load_config(args.config, args.overrides)


def cmd_train_classifier(args) -> None:
    from .classifier import train_classifier

    train_classifier(_config(args))


def cmd_train(args) -> None:
    from .train import train_segmenter

    train_segmenter(_config(args))


def cmd_eval(args) -> None:
    from .evaluate import evaluate, results_table

    results = evaluate(_config(args), segmenter_path=args.segmenter, with_segmenter=not args.cam_only)
    print(results_table(results))
    for split, res in results["splits"].items():
        print(f"grid {split}: {res['grid']}")


def cmd_demo(args) -> None:
    """Build toy-birds if missing → stage 1 → stage 2 → eval → table and grid paths."""
    from .classifier import classifier_path, train_classifier
    from .evaluate import evaluate, results_table
    from .tracking import Tracker
    from .train import train_segmenter

    cfg = _config(args)
    from data_shards.manifest import manifest_url, url_exists

    if not url_exists(manifest_url(cfg.data.url)):  # local path or s3://
        from data_shards.toy_birds import build_toy_birds

        url = cfg.data.url.rstrip("/")
        out_dir = url.rsplit("/", 1)[0] if url.endswith(".json") else url
        print(f"building toy-birds in {out_dir}")
        build_toy_birds(str(out_dir), seed=cfg.toy.seed, size=cfg.toy.size, rho=cfg.toy.rho,
                        counts={"train": cfg.toy.train, "val": cfg.toy.val, "test_aligned": cfg.toy.test,
                                "test_conflict": cfg.toy.test})
    parent = Tracker(cfg, cfg.train.run_name or "demo")
    try:
        if args.retrain_classifier or not classifier_path(cfg).is_file():
            train_classifier(cfg, parent_run_id=parent.run_id)
        train_segmenter(cfg, parent_run_id=parent.run_id)
        results = evaluate(cfg, parent_run_id=parent.run_id)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    print(results_table(results))
    for split, res in results["splits"].items():
        print(f"grid {split}: {res['grid']}")


def cmd_report(args) -> None:
    from .report import main as report_main

    report_main([args.runs_dir, *(["--order", *args.order] if args.order else []),
                 *(["--baselines-from", args.baselines_from] if args.baselines_from else [])])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsssrec", description=__doc__)
    # `deepspeed --module trainer ...` puts --local_rank=N before the subcommand
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    from data_shards.cli import register

    register(sub)
    p = sub.add_parser("train-classifier", help="stage 1: fine-tune g on image-level tags")
    _add_config_args(p)
    p.set_defaults(func=cmd_train_classifier)
    p = sub.add_parser("train", help="stage 2: train the segmenter against the frozen g")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate segmenter, CAM and trivial predictions on the eval splits")
    _add_config_args(p)
    p.add_argument("--segmenter", help="segmenter checkpoint (default: <run dir>/segmenter.pt)")
    p.add_argument("--cam-only", action="store_true", help="evaluate g's CAM and the trivial predictions only")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="toy-birds → g → segmenter → eval, on the embedded defaults")
    _add_config_args(p)
    p.add_argument("--retrain-classifier", action="store_true", help="train g even if its checkpoint exists")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="one table (mean ± std over seeds) over evaluated runs in a folder")
    p.add_argument("runs_dir")
    p.add_argument("--order", nargs="*", help="setting names in table order")
    p.add_argument("--baselines-from", help="setting whose runs give the CAM and trivial rows")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"wsssrec: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
