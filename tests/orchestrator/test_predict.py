"""``sspctl predict`` / ``sspctl evaluate`` and the inference path: shapes, affines, orientation, errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from orchestrator.cli import app
from trainers.finetune import save_model_dir
from trainers.inference import InferenceError, Segmenter, predict_array, read_scan
from trainers.models.unet import UNet2d

SIZE = 16
runner = CliRunner()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuned model directory as finetune writes it (random weights, 16 px grid at 5 mm)."""
    torch.manual_seed(0)
    return save_model_dir(tmp_path_factory.mktemp("model") / "cell", UNet2d(SIZE, 4).state_dict(),
                          {"image_size": SIZE, "spacing_mm": 5.0, "checkpoint": "last"})


def _affine(flip: bool) -> np.ndarray:
    """Oblique-ish affine (1.4 x 1.6 mm in plane, 8 mm slices); ``flip`` puts the base at the last slice."""
    affine = np.diag([1.4, 1.6, 8.0 if flip else -8.0, 1.0])
    affine[0, 1] = 0.2
    affine[:3, 3] = (-30.0, 12.0, 40.0)
    return affine


def _scan(path: Path, shape: tuple[int, ...], flip: bool = True) -> Path:
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 300).astype(np.int16)
    nib.save(nib.Nifti1Image(data, _affine(flip)), path)
    return path


@pytest.mark.parametrize("shape", [(40, 36, 5, 3), (40, 36, 5)])
def test_predict_cli_keeps_shape_and_affine(model_path: Path, tmp_path: Path, shape: tuple[int, ...]) -> None:
    scan = _scan(tmp_path / "scan.nii.gz", shape)
    out = tmp_path / "seg.nii.gz"
    result = runner.invoke(app, ["predict", "--model", str(model_path), "--input", str(scan), "--out", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    seg = nib.load(out)
    assert seg.shape == shape
    np.testing.assert_allclose(seg.affine, nib.load(scan).affine)
    labels = np.asarray(seg.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}


class _Threshold(nn.Module):
    """A 'model' that labels RV (3) where the z-scored input is positive, background elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(x)
        return torch.cat([zeros, zeros - 1.0, zeros - 1.0, x * 20.0], dim=1)


@pytest.mark.parametrize("flip", [True, False])
def test_orientation_round_trip_puts_labels_on_the_input_voxels(flip: bool) -> None:
    """The threshold 'model' must reproduce the input's bright region voxel by voxel in NIfTI order."""
    data = np.zeros((30, 34, 4, 2), np.float32)
    data[5:18, 8:25, 0] = 100.0  # a bright box only on slice k = 0 -> catches z flips and x/y swaps
    data[12:26, 3:12, 3, 1] = 100.0
    segmenter = Segmenter(model=_Threshold(), meta={"image_size": 32, "spacing_mm": 1.0}, device=torch.device("cpu"))
    labels = predict_array(segmenter, data, _affine(flip))
    truth = np.where(data > 50, 3, 0)
    assert labels.shape == data.shape
    assert (labels == truth).mean() > 0.98
    assert labels[..., 1:3, :].max() == 0 and labels[..., 0, 0].max() == 3 and labels[..., 3, 1].max() == 3


def test_bad_inputs_fail_with_one_line(model_path: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20), np.float32), np.eye(4)), flat)
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    nan = tmp_path / "nan.nii.gz"
    bad = np.ones((20, 20, 3), np.float32)
    bad[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), nan)
    zero = tmp_path / "zero.nii.gz"
    zero_image = nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 3)).astype(np.float32), None)
    zero_image.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # a zero-length voxel axis
    nib.save(zero_image, zero)
    png = tmp_path / "scan.png"
    png.write_bytes(b"\x89PNG")
    cases = {flat: "2D", text: "not", nan: "non-finite", zero: "spacing", png: "not a NIfTI",
             tmp_path / "missing.nii.gz": "not found"}
    for path, words in cases.items():
        result = runner.invoke(app, ["predict", "--model", str(model_path), "--input", str(path),
                                     "--out", str(tmp_path / "o.nii.gz"), "--device", "cpu"])
        assert result.exit_code != 0, path
        message = result.output.strip()
        assert message.startswith("error:") and str(path.name) in message and words in message, message
        assert len(message.splitlines()) == 1
    with pytest.raises(InferenceError, match="2D"):
        read_scan(flat)
    result = runner.invoke(app, ["predict", "--model", str(tmp_path / "nowhere"), "--input", str(flat),
                                 "--out", str(tmp_path / "o.nii.gz"), "--output", str(tmp_path / "ws")])
    assert result.exit_code != 0 and "nowhere" in result.output


def test_evaluate_cli_on_a_store(model_path: Path, tmp_path: Path) -> None:
    from datastore.config import IngestConfig
    from datastore.ingest import execute_ingest, plan_ingest
    from datastore.splits import make_splits
    from datastore.store import SliceStore
    from datastore.synth import write_dataset

    write_dataset(tmp_path / "raw", "mnms", 4, 1, size=40, frames=(3, 3), slices=(4, 4), trivial=True)
    store = tmp_path / "store.zarr"
    execute_ingest(plan_ingest({"mnms": tmp_path / "raw"}, str(store), IngestConfig(size=SIZE, spacing=5.0)),
                   executor="serial", progress=False)
    split = make_splits(SliceStore.open(store).subjects, test_per_vendor=1, seed=0, valid_fraction=0.3,
                        budgets=(1,), seeds=(0,))
    split.save(tmp_path / "split.yaml")
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--model", str(model_path / "model.pt"), "--store", str(store),
                                 "--split", str(tmp_path / "split.yaml"), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "test_dice3d.csv", dtype={"subject_id": str})
    assert set(table["subject_id"]) == set(split.subjects("test")) and len(table) == 6 * len(split.subjects("test"))
    assert table["dice"].between(0, 1).all() and "mean 3D Dice" in result.output
    bad = runner.invoke(app, ["evaluate", "--model", str(model_path), "--store", str(tmp_path / "nostore"),
                              "--split", str(tmp_path / "split.yaml")])
    assert bad.exit_code != 0 and "nostore" in bad.output

    # predict on the raw cine preprocesses exactly as ingest + native evaluation do (ED frame); the
    # threshold 'model' makes the labels depend on the z-scored intensities and on the orientation
    from trainers.evaluation import model_scores_fn, segment_volume

    opened = SliceStore.open(store)
    sid = split.subjects("test")[0]
    segmenter = Segmenter(model=_Threshold(), meta={"image_size": 32, "spacing_mm": 2.5}, device=torch.device("cpu"))
    native = opened.native(sid, "ED")
    expected = segment_volume(model_scores_fn(segmenter.model), native.image, native.geometry, 32, 2.5).label
    data, affine, _ = read_scan(tmp_path / "raw" / sid / f"{sid}_sa.nii.gz")
    predicted = native.geometry.to_canonical(predict_array(segmenter, data, affine)[..., opened.subject_row(sid)["ed"]])
    assert 0.1 < (expected == 3).mean() < 0.9  # the check below is not trivial
    assert (predicted == expected).mean() > 0.999
    assert (predicted[::-1] == expected).mean() < 0.95


def test_help_explains_options() -> None:
    for command in ("predict", "evaluate"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--model" in result.output and "model.json" in result.output
