"""model.init_from: a multi-class segmenter starts from a binary one (matching tensors loaded, the rest
reported), from a local segmenter.pt; bad paths are ConfigErrors that name the key."""
import pytest
import torch

from trainer.config import Config, ConfigError, ModelConfig
from trainer.model_uri import resolve_init_from
from trainer.models import Segmenter
from trainer.train import start_from
from trainer.weights import init_from_checkpoint, save_segmenter


def _unet(num_classes: int, K: int = 0) -> Segmenter:
    return Segmenter(ModelConfig(encoder="unet", width=4, depth=2, K=K, imagelet_head="lowres", imagelet_stride=2),
                     num_classes)


def test_init_from_local_checkpoint_loads_matching_and_reports_the_rest(tmp_path):
    torch.manual_seed(0)
    binary = _unet(1)
    path = tmp_path / "segmenter.pt"
    save_segmenter(binary, Config(), ["bird"], path)
    torch.manual_seed(1)
    multi = _unet(4, K=6)
    fresh_head = multi.mask_decoder.head.weight.detach().clone()
    report = init_from_checkpoint(multi, path)
    assert report["missing"] == [] and report["unused"] == []
    skipped = {line.split()[0] for line in report["skipped"]}
    # the K-way mask head and the 3K-way image-let head depend on K; everything else is shared
    assert skipped == {"mask_decoder.head.weight", "mask_decoder.head.bias", "imagelet_decoder.weight",
                       "imagelet_decoder.bias"}
    assert "mask_decoder.head.weight (2, 4, 1, 1) -> (6, 4, 1, 1)" in report["skipped"]
    assert any(k.startswith("encoder.") for k in report["loaded"])
    for key in report["loaded"]:
        assert torch.equal(multi.state_dict()[key], binary.state_dict()[key]), key
    assert torch.equal(multi.mask_decoder.head.weight, fresh_head)  # untouched: fresh initialisation


def test_start_from_writes_the_record_and_returns_tags(tmp_path, capsys):
    binary = _unet(1)
    path = tmp_path / "segmenter.pt"
    save_segmenter(binary, Config(), ["bird"], path)
    cfg = Config()
    cfg.model.init_from = str(path)
    resolved, lineage = resolve_init_from(cfg)
    assert resolved == cfg  # a local path stays as it is
    assert lineage["init_from"] == str(path) and len(lineage["init_from.weights_sha256"]) == 64
    tags = start_from(_unet(4), resolved, lineage, tmp_path)
    assert tags["init_from.skipped"] == 4 and tags["init_from.loaded"] > 10
    assert "skipped mask_decoder.head.weight" in capsys.readouterr().out
    assert (tmp_path / "init_from.json").is_file()


def test_init_from_missing_file_is_a_config_error(tmp_path):
    cfg = Config()
    cfg.model.init_from = str(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="model.init_from"):
        resolve_init_from(cfg)


@pytest.mark.parametrize("trainable", [False, True])
def test_start_from_keeps_a_frozen_g_trunk_encoder_of_this_run(tmp_path, trainable):
    """The binary model's encoder is its own g's trunk. A run whose encoder is *its* g's trunk, frozen, keeps that
    trunk (loading the other g's would leave the mask network reading features this run's g never made) and
    loads everything else; a trainable encoder is loaded from the checkpoint like any other layer."""
    from trainer.effnet import EfficientNetLite
    from trainer.weights import build_segmenter

    model_cfg = dict(encoder="efficientnet", decoder_widths=[8, 8, 8, 8, 8], bottleneck=8)
    torch.manual_seed(0)
    binary_cfg = Config()
    binary_cfg.model = ModelConfig(**model_cfg)
    binary = build_segmenter(binary_cfg, 1, EfficientNetLite(num_classes=1))
    path = tmp_path / "segmenter.pt"
    save_segmenter(binary, binary_cfg, ["bird"], path)
    torch.manual_seed(1)
    cfg = Config()
    cfg.model = ModelConfig(**model_cfg, encoder_trainable=trainable, init_from=str(path), init_from_head="binary")
    own_g = EfficientNetLite(num_classes=4)
    multi = build_segmenter(cfg, 4, own_g)
    before = {k: v.clone() for k, v in multi.state_dict().items()}
    tags = start_from(multi, cfg, {"init_from": str(path)}, tmp_path)
    after, source = multi.state_dict(), binary.state_dict()
    encoder = [k for k in after if k.startswith("encoder.")]
    decoder = [k for k in after if k.startswith("mask_decoder.stages") or k.startswith("mask_decoder.up")]
    assert len(encoder) > 50 and decoder
    assert not torch.equal(before[encoder[0]], source[encoder[0]])  # the two g's trunks differ to begin with
    for key in encoder:
        assert torch.equal(after[key], before[key] if not trainable else source[key]), key
    for key in decoder:
        assert torch.equal(after[key], source[key]), key
    assert tags["init_from.kept"] == (0 if trainable else len(encoder))
