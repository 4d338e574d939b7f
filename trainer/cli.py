"""The `wsssrec` command: data tools, stage 1 (`train-classifier`), stage 2 (`train`), `eval`, `demo` (the
whole pipeline on the embedded defaults), `predict` and the model `registry`. Every training command takes
`-c CONFIG` plus `key.sub=value` overrides; after a stage, rank 0 registers its model in MLflow."""
from __future__ import annotations

import argparse
import logging
import sys

from data_shards.errors import DataError

from . import speedups
from .config import ConfigError, load_config
from .tracking import TrackingError
from .weights import WeightsError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML experiment config (configs/toy_birds.yaml, ...)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=100")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _config(args):
    # `classifier=models:/wsssrec-classifier@champion` is short for classifier.checkpoint=...
    overrides = [f"classifier.checkpoint={o.split('=', 1)[1]}" if o.split("=", 1)[0].strip("- ") == "classifier"
                 and "=" in o else o for o in args.overrides]
    cfg = load_config(args.config, overrides)
    speedups.configure(cfg)  # process-wide, like torch.backends' flags (trainer/speedups.py)
    return cfg


def _registers(cfg) -> bool:
    """Only rank 0 talks to the registry, and only when tracking and registering are on."""
    from .tracking import process_rank

    return cfg.mlflow.enabled and cfg.mlflow.register and process_rank() == 0


def _check_tracking(cfg) -> None:
    """Fail before any training when the tracking server that rank 0 will log to does not answer."""
    from .tracking import connect, process_rank, tracking_uri

    if cfg.mlflow.enabled and process_rank() == 0:
        connect(tracking_uri(cfg))


def _check_segmenter_inputs(cfg) -> None:
    """Stage 2's inputs beyond the data, checked before the stage writes into its run folder: g's weights and
    `model.init_from` must exist (registry URIs are resolved to files by then)."""
    from pathlib import Path

    from .weights import classifier_path

    g = classifier_path(cfg)
    if not g.is_file():
        raise FileNotFoundError(f"classifier checkpoint {g} does not exist: run `wsssrec train-classifier` "
                                "first or set classifier.checkpoint=PATH")
    if cfg.model.init_from and not Path(cfg.model.init_from).is_file():
        raise FileNotFoundError(f"model.init_from {cfg.model.init_from} does not exist")


def cmd_train_classifier(args) -> None:
    from .classifier import train_classifier
    from .loop import check_stage_inputs
    from .model_uri import resolve_decouple_from
    from .registry import register_stage

    cfg = _config(args)
    _check_tracking(cfg)
    check_stage_inputs(cfg)  # before URI resolution, which downloads into the run folder
    cfg, lineage = resolve_decouple_from(cfg)
    result = train_classifier(cfg, lineage=lineage)
    if _registers(cfg):
        register_stage(cfg, result)


def _resolve_uris(cfg):
    """Registry URIs in the config → local files, once, in the driver: every rank needs g's weights (and
    `model.init_from`'s) as files. Returns the resolved config and the lineage the registry records."""
    from .model_uri import resolve_classifier, resolve_init_from

    cfg, g_lineage = resolve_classifier(cfg)
    cfg, init_lineage = resolve_init_from(cfg)
    return cfg, {**g_lineage, **init_lineage}


def cmd_train(args) -> None:
    from .loop import check_stage_inputs
    from .registry import register_stage
    from .train import train_segmenter

    cfg = _config(args)
    _check_tracking(cfg)
    check_stage_inputs(cfg)  # before URI resolution, which downloads into the run folder
    cfg, lineage = _resolve_uris(cfg)
    _check_segmenter_inputs(cfg)
    result = train_segmenter(cfg, lineage=lineage)
    if _registers(cfg):
        register_stage(cfg, result)


def cmd_eval(args) -> None:
    from .eval_report import results_table
    from .evaluate import evaluate
    from .model_uri import is_model_uri, resolve_classifier

    cfg, _ = resolve_classifier(_config(args))
    segmenter = args.segmenter
    if segmenter and is_model_uri(segmenter):
        from .files import run_dir
        from .model_uri import download
        from .tracking import tracking_uri

        _, local = download(segmenter, run_dir(cfg) / "registry" / "eval-segmenter", tracking_uri(cfg))
        segmenter = str(local / "data" / "segmenter.pt")
    results = evaluate(cfg, segmenter_file=segmenter, with_segmenter=not args.cam_only)
    print(results_table(results))
    if len(results["classes"]) > 1:
        from .multiclass import per_class_table

        print(per_class_table(results))
    for split, res in results["splits"].items():
        print(f"grid {split}: {res['grid']}")


def ensure_toy_data(cfg) -> None:
    """`wsssrec demo` on a data URL without a manifest builds the config's toy set (`toy.name`: toy-birds,
    toy-multi or toy-multi8) there (local path or s3://)."""
    from data_shards.manifest import manifest_url, url_exists
    from data_shards.toys import build_toy

    if url_exists(manifest_url(cfg.data.url)):
        return
    url = cfg.data.url.rstrip("/")
    out_dir = url.rsplit("/", 1)[0] if url.endswith(".json") else url
    print(f"building {cfg.toy.name} in {out_dir}")
    build_toy(cfg.toy.name, str(out_dir), seed=cfg.toy.seed, size=cfg.toy.size, rho=cfg.toy.rho,
              counts={"train": cfg.toy.train, "val": cfg.toy.val, "test_aligned": cfg.toy.test,
                      "test_conflict": cfg.toy.test},
              paired=cfg.toy.paired)


def demo_stages(cfg, parent, registers: bool, retrain_classifier: bool):
    """Stage 1 (unless g is given or trained already), stage 2, eval; g and the segmenter registered with
    the alias `champion`. With `train.rounds` > 1 the earlier rounds first (trainer/rounds.py), and this run's g
    decouples with the last of them. Returns the eval results and the registered segmenter version (or None)."""
    from .classifier import train_classifier
    from .evaluate import evaluate
    from .loop import StageResult
    from .registry import ensure_classifier_registered, register_stage
    from .train import train_segmenter
    from .weights import classifier_path

    cfg, lineage = _resolve_uris(cfg)  # classifier=models:/... skips stage 1
    g_given = any(k.startswith("classifier.") for k in lineage)
    g_lineage = {}
    if cfg.train.rounds > 1:
        from .config import ConfigError
        from .model_uri import resolve_decouple_from
        from .rounds import run_earlier_rounds

        if g_given or cfg.classifier.checkpoint:
            raise ConfigError(f"train.rounds={cfg.train.rounds} trains g in every round; it cannot start from the g "
                              f"given by classifier.checkpoint={cfg.classifier.checkpoint!r} (set train.rounds=1)")
        cfg, _ = resolve_decouple_from(cfg)  # a segmenter the config names for round 1 (a registry URI: a file)
        cfg = run_earlier_rounds(cfg, parent_run_id=parent.run_id, retrain_classifier=retrain_classifier)
        cfg, g_lineage = resolve_decouple_from(cfg)  # the round before's segmenter: its path and hash as g's tags
    if not g_given and (retrain_classifier or not classifier_path(cfg).is_file()):
        g_result = train_classifier(cfg, parent_run_id=parent.run_id, lineage=g_lineage)
        if registers:
            register_stage(cfg, g_result, alias="champion")
    if registers and not g_given:
        lineage.update(ensure_classifier_registered(cfg, classifier_path(cfg), alias="champion"))
    result: StageResult = train_segmenter(cfg, parent_run_id=parent.run_id, lineage=lineage)
    results = evaluate(cfg, parent_run_id=parent.run_id)
    if not registers:
        return cfg, results, None
    segmenter = register_stage(cfg, result, eval_run_id=results["run_id"], alias="champion")
    g_tags = {k: v for k, v in result.lineage.items() if k.startswith("classifier.")}
    parent.set_tags({**g_tags, "registered.segmenter": f"models:/{segmenter.name}/{segmenter.version}"})
    return cfg, results, segmenter


def cmd_demo(args) -> None:
    """Build toy-birds if missing → stage 1 → stage 2 → eval → table and grid paths; both models registered
    in MLflow with the alias `champion`, and the `wsssrec predict` command that uses the segmenter."""
    from .eval_report import results_table
    from .tracker import Tracker

    cfg = _config(args)
    ensure_toy_data(cfg)
    parent = Tracker(cfg, cfg.train.run_name or "demo")
    try:
        cfg, results, segmenter = demo_stages(cfg, parent, _registers(cfg), args.retrain_classifier)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    print(results_table(results))
    for split, res in results["splits"].items():
        print(f"grid {split}: {res['grid']}")
    if segmenter is not None:
        from .predict import predict_hint

        print(predict_hint(cfg, segmenter))


def cmd_predict(args) -> None:
    import os

    from .predict import predict

    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    predict(args.model, args.images, args.out, batch_size=args.batch_size, classifier=args.classifier)


def cmd_registry(args) -> None:
    from .registry import format_versions, list_versions, promote

    if args.registry_command == "ls":
        print(format_versions(list_versions(args.names or None, args.tracking_uri)))
    elif args.registry_command == "add":
        from .registry import register_file

        mv = register_file(args.weights, args.alias, args.tracking_uri, args.classifier)
        print(f"models:/{mv.name}/{mv.version}")
    else:
        uri = promote(args.name, args.version, args.alias, args.tracking_uri)
        print(f"{uri} → version {args.version}")


def cmd_sync_metrics(args) -> None:
    from .tracker import sync_pending

    for path in args.files:
        sent = sync_pending(path)
        print(f"{path}: sent {sent['metrics']} metrics, {sent['tags']} tags, {sent['artifacts']} artifacts")


def cmd_report(args) -> None:
    from .report import main as report_main

    report_main([*args.runs_dir, *(["--order", *args.order] if args.order else []),
                 *(["--baselines-from", args.baselines_from] if args.baselines_from else []),
                 *(["--control", args.control] if args.control else []), "--paired-split", args.paired_split])


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
    p = sub.add_parser("predict", help="segment images with a registered (or local) segmenter")
    p.add_argument("--model", required=True, help="models:/wsssrec-segmenter@champion, models:/NAME/VERSION, "
                   "runs:/RUN_ID/segmenter, a downloaded model folder or a segmenter.pt")
    p.add_argument("--images", required=True, help="folder, image file or s3://bucket/prefix of images")
    p.add_argument("--out", required=True, help="folder (or s3:// prefix) for <stem>.png masks and overlays/")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--classifier", help="g's classifier.pt for a segmenter.pt that gates its masks (default: the "
                   "one its training config names, else the classifier.pt beside the segmenter.pt)")
    p.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("registry", help="MLflow model registry: list versions, promote a version to an alias")
    rsub = p.add_subparsers(dest="registry_command", required=True)
    r = rsub.add_parser("ls", help="registered models and versions with aliases, lineage and key metrics")
    r.add_argument("names", nargs="*", help="model names (default: all)")
    r.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    r = rsub.add_parser("add", help="register a segmenter.pt from an earlier run (its stored config and classes)")
    r.add_argument("weights", help="segmenter.pt")
    r.add_argument("--alias", default=None, help="also point this alias (e.g. champion) at the new version")
    r.add_argument("--classifier", help="g's classifier.pt (default: the one in the stored config)")
    r.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    r = rsub.add_parser("promote", help="point an alias (default champion) at a version")
    r.add_argument("name")
    r.add_argument("version")
    r.add_argument("--alias", default="champion")
    r.add_argument("--tracking-uri", help="MLflow server (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.set_defaults(func=cmd_registry)
    p = sub.add_parser("sync-metrics", help="send metrics a run kept locally while MLflow was unreachable")
    p.add_argument("files", nargs="+", help="<run dir>/mlflow/<run>.pending.json")
    p.set_defaults(func=cmd_sync_metrics)
    p = sub.add_parser("report", help="one table (mean ± std over seeds) over evaluated runs in a folder")
    p.add_argument("runs_dir", nargs="+", help="folder(s) holding <name>-seed<S>/eval/results.json")
    p.add_argument("--order", nargs="*", help="setting names in table order")
    p.add_argument("--baselines-from", help="setting whose runs give the CAM and trivial rows")
    p.add_argument("--control", help="setting trained without bias (ρ = 0.5): the bias tax of every other setting "
                                     "on the paired split")
    p.add_argument("--paired-split", default="test_paired", help="the paired evaluation split")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError, TrackingError, WeightsError) as err:
        print(f"wsssrec: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
