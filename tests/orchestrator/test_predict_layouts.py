"""``sspctl predict`` on ingested layouts: the real oblique header, and the input's label convention."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from trainers.inference import InferenceError, Segmenter, output_convention, predict_nifti


class _Threshold(nn.Module):
    """A 'model' that labels RV (store value 3) where the z-scored input is positive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(x)
        return torch.cat([zeros, zeros - 1.0, zeros - 1.0, x * 20.0], dim=1)


@pytest.fixture(scope="module")
def example_header() -> nib.Nifti1Header:
    """nibabel's own example4d.nii.gz header (oblique, LAS), read at test time (not committed)."""
    import nibabel.tests as tests

    path = Path(tests.__file__).parent / "data" / "example4d.nii.gz"
    if not path.is_file():
        pytest.skip("nibabel's test data is not installed")
    return nib.load(path)


def _segmenter() -> Segmenter:
    return Segmenter(model=_Threshold(), meta={"image_size": 32, "spacing_mm": 4.0}, device=torch.device("cpu"))


@pytest.mark.parametrize(("name", "labels", "rv_value"), [
    ("patient001_4d.nii.gz", "input", 1),      # ACDC file: ACDC order (1 RV)
    ("patient001_frame01.nii.gz", "mnms", 3),  # asked for M&Ms order
    ("scan.nii.gz", "input", 3),               # any other file: M&Ms order
    ("scan.nii.gz", "1:2,2:3,3:1", 2),         # a manifest's label_map: site value 2 is the RV
])
def test_output_has_the_input_shape_affine_and_label_convention(
    tmp_path: Path, example_header, name: str, labels: str, rv_value: int
) -> None:
    affine = example_header.affine
    shape = (40, 36, 5, 2) if "frame" not in name else (40, 36, 5)
    data = np.zeros(shape, np.int16)
    data[10:25, 8:20] = 200
    source = tmp_path / name
    image = nib.Nifti1Image(data, affine, example_header.header.copy())
    nib.save(image, source)
    out = predict_nifti(_segmenter(), source, tmp_path / "seg.nii.gz", progress=False, labels=labels)
    seg = nib.load(out)
    assert seg.shape == shape
    np.testing.assert_array_equal(seg.affine, nib.load(source).affine)
    values = np.asarray(seg.dataobj)
    assert set(np.unique(values)) == {0, rv_value}
    assert (values[10:25, 8:20] == rv_value).mean() > 0.95


def test_bad_label_convention_is_one_line() -> None:
    with pytest.raises(InferenceError, match="--labels: label_map entry 'x' is not SOURCE:TARGET"):
        output_convention("scan.nii.gz", "x")
