"""Exported weights, the manifest and the strict part loader fine-tuning uses."""

from __future__ import annotations

import json

import pytest
import torch

from trainers.models.unet import UNet2d
from trainers.weights import (
    MANIFEST_FILE, PartMismatchError, WeightsError, WeightsManifest, load_pretrained, load_weights,
    read_manifest, save_weights, write_manifest,
)

W = 4  # narrow U-Net (channels 4, 8, 16, 32 at 32 px) keeps the test fast


def _part(model: torch.nn.Module, *prefixes: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}


def _manifest(**files: str) -> WeightsManifest:
    return WeightsManifest(method="mim", run_name="pretrain-mim-x", config={"epochs": 2}, dataset_hash="abc",
                           epochs=2, final_loss=0.5, image_size=32, files=files)


def test_encoder_loads_into_a_segmentation_unet_and_reports_keys(tmp_path):
    torch.manual_seed(0)
    pretrained = UNet2d(32, out_channels=1, num_heads=1, width=W)  # MIM-style 1-channel head
    save_weights(_part(pretrained, "encoder."), tmp_path / "encoder.pt")
    target = UNet2d(32, out_channels=4, width=W)
    before_decoder = {k: v.clone() for k, v in _part(target, "decoder.").items()}
    report = load_pretrained(target, tmp_path / "encoder.pt", "encoder")
    assert report.matched == sorted(_part(target, "encoder."))
    assert report.missing == [] and report.unexpected == [] and report.ignored == []
    assert any(k.endswith("num_batches_tracked") for k in report.matched)  # BN statistics transfer too
    for key, value in _part(pretrained, "encoder.").items():
        assert torch.equal(target.state_dict()[key], value), key
    for key, value in before_decoder.items():
        assert torch.equal(target.state_dict()[key], value), key  # decoder untouched


def test_encoder_decoder_from_run_directory_via_manifest(tmp_path):
    torch.manual_seed(1)
    pretrained = UNet2d(32, out_channels=1, num_heads=1, width=W)
    save_weights(_part(pretrained, "encoder.", "decoder."), tmp_path / "encoder_decoder.pt")
    save_weights(_part(pretrained, "encoder."), tmp_path / "encoder.pt")
    write_manifest(tmp_path, _manifest(encoder="encoder.pt", encoder_decoder="encoder_decoder.pt"))
    target = UNet2d(32, out_channels=4, width=W)
    report = load_pretrained(target, tmp_path, "encoder_decoder")
    assert len(report.matched) == len(_part(target, "encoder.", "decoder."))
    assert torch.equal(target.state_dict()["decoder.blocks.0.transp_conv.conv.weight"],
                       pretrained.state_dict()["decoder.blocks.0.transp_conv.conv.weight"])
    # Loading only the encoder from the encoder+decoder file ignores (and reports) the decoder keys.
    report = load_pretrained(UNet2d(32, 4, width=W), tmp_path / "encoder_decoder.pt", "encoder")
    assert report.ignored and all(k.startswith("decoder.") for k in report.ignored)


def test_partial_file_is_refused_and_nothing_is_copied(tmp_path):
    source = _part(UNet2d(32, 1, width=W), "encoder.")
    dropped = sorted(source)[:2]
    save_weights({k: v for k, v in source.items() if k not in dropped}, tmp_path / "encoder.pt")
    target = UNet2d(32, 4, width=W)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(PartMismatchError, match="2 missing") as info:
        load_pretrained(target, tmp_path / "encoder.pt", "encoder")
    assert info.value.report.missing == dropped
    assert len(info.value.report.matched) == len(source) - 2
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    # An encoder-only file cannot provide the encoder+decoder part.
    with pytest.raises(PartMismatchError, match="missing"):
        load_pretrained(target, tmp_path / "encoder.pt", "encoder_decoder")


def test_other_architecture_is_refused(tmp_path):
    save_weights(_part(UNet2d(32, 1, width=8), "encoder."), tmp_path / "wide.pt")
    with pytest.raises(PartMismatchError, match="shape mismatches"):
        load_pretrained(UNet2d(32, 4, width=W), tmp_path / "wide.pt", "encoder")
    save_weights(_part(UNet2d(64, 1, width=W), "encoder."), tmp_path / "deep.pt")
    with pytest.raises(PartMismatchError, match="unexpected") as info:
        load_pretrained(UNet2d(32, 4, width=W), tmp_path / "deep.pt", "encoder")
    assert all(k.startswith("encoder.blocks.4.") for k in info.value.report.unexpected)


def test_weights_file_is_plain_and_bad_files_are_named(tmp_path):
    save_weights({"encoder.w": torch.ones(2)}, tmp_path / "w.pt")
    assert torch.load(tmp_path / "w.pt", weights_only=True)["encoder.w"].sum() == 2
    with pytest.raises(WeightsError, match="weights file not found"):
        load_weights(tmp_path / "none.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"list\.pt: expected a dict"):
        load_weights(tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="must be str -> Tensor"):
        save_weights({"a": 1.0}, tmp_path / "x.pt")  # type: ignore[dict-item]
    with pytest.raises(WeightsError, match="manifest not found"):
        load_pretrained(UNet2d(32, 4, width=W), tmp_path, "encoder")
    write_manifest(tmp_path, _manifest(encoder="w.pt"))
    with pytest.raises(WeightsError, match="not part 'encoder_decoder'"):
        load_pretrained(UNet2d(32, 4, width=W), tmp_path, "encoder_decoder")
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data["surprise"] = 1
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="surprise: unknown key"):
        read_manifest(tmp_path)


def test_best_checkpoint_is_read_from_the_manifest_and_its_absence_is_one_line(tmp_path):
    from trainers.weights import BestCheckpoint

    torch.manual_seed(2)
    last, best = UNet2d(32, 1, width=W), UNet2d(32, 1, width=W)
    digests = {"encoder.pt": save_weights(_part(last, "encoder."), tmp_path / "encoder.pt"),
               "encoder_best.pt": save_weights(_part(best, "encoder."), tmp_path / "encoder_best.pt")}
    entry = BestCheckpoint(epoch=3, loss=0.25, metric="valid_loss", files={"encoder": "encoder_best.pt"})
    write_manifest(tmp_path, _manifest(encoder="encoder.pt").model_copy(update={"sha256": digests, "best": entry}))
    key = "encoder.blocks.0.conv1.conv.weight"
    for checkpoint, source, name in (("last", last, "encoder.pt"), ("best", best, "encoder_best.pt")):
        target = UNet2d(32, 4, width=W)
        report = load_pretrained(target, tmp_path, "encoder", checkpoint)
        assert torch.equal(target.state_dict()[key], source.state_dict()[key]), checkpoint
        assert report.file == str(tmp_path / name) and report.sha256 == digests[name]
    assert read_manifest(tmp_path).best == entry
    with pytest.raises(WeightsError, match="not part 'encoder_decoder'"):
        load_pretrained(UNet2d(32, 4, width=W), tmp_path, "encoder_decoder", "best")
    with pytest.raises(WeightsError, match="needs a pretraining run directory"):
        load_pretrained(UNet2d(32, 4, width=W), tmp_path / "encoder.pt", "encoder", "best")

    # A manifest without a best section (an older run, or one without validation subjects) still reads,
    # loads its last weights, and refuses "best" with a one-line reason.
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    del data["best"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    assert read_manifest(tmp_path).best is None
    load_pretrained(UNet2d(32, 4, width=W), tmp_path, "encoder")
    with pytest.raises(WeightsError, match="no best checkpoint") as caught:
        load_pretrained(UNet2d(32, 4, width=W), tmp_path, "encoder", "best")
    assert MANIFEST_FILE in str(caught.value) and "\n" not in str(caught.value)
