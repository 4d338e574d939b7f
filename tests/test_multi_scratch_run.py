"""A tiny multi-class run from scratch through the real entry points (issue 19): g fine-tuned on a tiny
toy-multi (80 training images, 64 px), then the segmenter trained for 80 steps with no binary model to start
from, with the per-class area bounds (`objective.class_area_weight`, log floor) and the class-bias start
(`model.class_init_area`). At its end every class component must hold clearly more of the images tagged with
its class than of the images without its tag, on the training images and on val: the class components are
alive and follow the tags (from scratch, toy-multi's earlier setting, area 8 and absent 4 without these
terms, ends with every class component empty; docs/results.md "Multi-class from scratch, 2026-12-02"). The area is the soft one, a_c = mean_px M_c: at this budget
no class wins the argmax anywhere yet (the hard areas are printed too, and are 0). "Clearly more": the mean area
0.02 above, and a tagged image's area above an untagged one's at least 3 times in 4 (AUROC ≥ 0.75)."""
import numpy as np
import pytest
import torch

from test_mlflow import REPO, wsssrec

SCRATCH = ["objective.area_weight=2", "objective.class_area_weight=8", "objective.class_area_floor=log",
           "objective.class_area_min=0.08", "objective.absent_weight=0", "model.class_init_area=0.08"]


@pytest.fixture(scope="module")
def scratch_segmenter(toy_multi_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("multi-scratch")
    common = ["-c", str(REPO / "configs/toy_multi.yaml"), f"data.url={toy_multi_dataset}", "data.image_size=64",
              f"train.out_dir={work}/runs", "train.run_name=scratch", "train.threads=1", "mlflow.enabled=false",
              f"train.deepspeed={REPO}/configs/deepspeed/zero0.json"]
    wsssrec("train-classifier", *common, "classifier.epochs=2", cwd=work)
    wsssrec("train", *common, *SCRATCH, "train.steps=80", "data.batch_size=8", "train.checkpoint_every=0",
            cwd=work)
    return work / "runs" / "scratch" / "segmenter.pt"


def class_areas(segmenter_path, manifest: str, split: str, image_size: int = 64) -> dict[str, np.ndarray]:
    """Per image of `split` and class: the soft area a_c = mean_px M_c (what L_class_area bounds), the share of
    pixels predicted as the class (argmax labels), and the tags."""
    from trainer.config import load_config
    from trainer.data import eval_batches
    from trainer.weights import load_segmenter

    model, stored, classes = load_segmenter(segmenter_path)
    model.eval()
    cfg = load_config(None, [f"data.url={manifest}", f"data.image_size={image_size}", "data.eval_batch_size=20"])
    soft, hard, tags = [], [], []
    with torch.no_grad():
        for batch in eval_batches(cfg, split):
            logits = model(batch["image"])["mask_logits"]
            soft.append(torch.softmax(logits, dim=1)[:, :len(classes)].mean(dim=(2, 3)))
            labels = model.predict_labels(logits)
            hard.append(torch.stack([(labels == c + 1).float().mean(dim=(1, 2)) for c in range(len(classes))], 1))
            tags.append(batch["labels"])
    return {"soft": torch.cat(soft).numpy(), "hard": torch.cat(hard).numpy(), "tags": torch.cat(tags).numpy() > 0}


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_every_class_owns_its_tagged_images(scratch_segmenter, toy_multi_dataset, split):
    got = class_areas(scratch_segmenter, toy_multi_dataset, split)
    tags = got["tags"]
    report = {name: {kind: (float(got[kind][tags[:, c], c].mean()), float(got[kind][~tags[:, c], c].mean()))
                     for kind in ("soft", "hard")} for c, name in enumerate(["bird", "mammal", "fish", "fruit"])}
    aurocs = {name: auroc(got["soft"][:, c], tags[:, c]) for c, name in enumerate(report)}
    print(split, report, aurocs)
    for c, name in enumerate(["bird", "mammal", "fish", "fruit"]):
        on, off = report[name]["soft"]
        assert on > 0.05, (split, name, report)  # alive: not the all-background collapse (a_c → 0)
        assert on - off > 0.02, (split, name, report)
        # image by image: a tagged image's class area beats an untagged one's at least 3 times in 4. (A ratio of the
        # means, 1.5x before, hung on a few untagged images: float rounding alone moved val mammal's from 2.31 to
        # 1.50 while this stayed at 0.81-0.83; docs/benchmarks.md, 2026-12-06 afternoon.)
        assert aurocs[name] >= 0.75, (split, name, aurocs)


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (the area under the ROC curve)."""
    pos, neg = score[positive][:, None], score[~positive][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def test_auroc_by_hand():
    score = np.array([0.9, 0.4, 0.4, 0.1])
    assert auroc(score, np.array([True, True, False, False])) == 0.875  # pairs: 1, 1, 0.5, 1 of 4
    assert auroc(score, np.array([False, False, True, True])) == 0.125
