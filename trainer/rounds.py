"""Rounds of the two stages (`train.rounds`): round 1 is stage 1 and stage 2 as always; each later round trains g
again, from its ImageNet start, with context decoupling (trainer/decouple.py) by the previous round's segmenter,
then the segmenter again on that g. On biased data the first g reads the background as evidence, and every term
of stage 2 that asks g inherits it; the second g has seen the objects away from their usual context
(docs/results.md, "context decoupling"). The last round is the run itself (its folder, its registered models);
the rounds before it live in <run dir>/round<r>/ and are kept, so a rerun reuses what they finished."""
from __future__ import annotations

from dataclasses import replace

from .config import Config
from .files import run_name
from .weights import classifier_path, segmenter_path


def round_config(cfg: Config, r: int) -> Config:
    """The config of round `r` (1-based) of `cfg.train.rounds`: earlier rounds in <run dir>/round<r>/; round 1
    decouples nothing (unless the config names a segmenter itself), round r > 1 decouples with round r − 1's."""
    rounds = cfg.train.rounds
    if not 1 <= r <= rounds:
        raise ValueError(f"round {r} of train.rounds={rounds}")
    name = run_name(cfg) if r == rounds else f"{run_name(cfg)}/round{r}"
    decouple = cfg.classifier.decouple_from if r == 1 else str(segmenter_path(round_config(cfg, r - 1)))
    return replace(cfg, train=replace(cfg.train, run_name=name),
                   classifier=replace(cfg.classifier, decouple_from=decouple))


def run_earlier_rounds(cfg: Config, parent_run_id: str | None = None, retrain_classifier: bool = False) -> Config:
    """Stage 1 and stage 2 of every round before the last (each skipped where its weights exist, g retrained
    with `retrain_classifier`); returns the last round's config, whose g decouples with the round before's
    segmenter. With `train.rounds` 1 the config comes back as it is."""
    from .classifier import train_classifier
    from .train import train_segmenter

    for r in range(1, cfg.train.rounds):
        rcfg = round_config(cfg, r)
        if retrain_classifier or not classifier_path(rcfg).is_file():
            train_classifier(rcfg, parent_run_id=parent_run_id)
        if not segmenter_path(rcfg).is_file():
            train_segmenter(rcfg, parent_run_id=parent_run_id)
        print(f"round {r} of {cfg.train.rounds} done: g {classifier_path(rcfg)}, segmenter {segmenter_path(rcfg)}")
    return round_config(cfg, cfg.train.rounds)
