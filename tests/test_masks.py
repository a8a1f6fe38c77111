"""Complete masks given as training labels: converted with --masks, noticed without it."""

from __future__ import annotations

import numpy as np
import tifffile

from cellfit.cli import main
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.targets import annotation_from_mask, looks_like_mask


def test_annotation_from_mask():
    mask = np.array([[0, 1, 1], [0, 2, 0]])
    np.testing.assert_array_equal(annotation_from_mask(mask), [[1, 2, 2], [1, 3, 1]])


def test_looks_like_mask_tells_masks_from_annotations():
    _, lab = synthetic_cells((96, 96), n_cells=8, seed=1)
    assert looks_like_mask(lab)
    assert not looks_like_mask(sparse_annotation(lab, 0.5, seed=0))
    assert not looks_like_mask(annotation_from_mask(lab))


def test_cli_masks_flag_and_note(tmp_path, capsys):
    img, lab = synthetic_cells((64, 64), n_cells=6, seed=2)
    tifffile.imwrite(tmp_path / "a.tif", img)
    tifffile.imwrite(tmp_path / "a_labels.tif", lab.astype(np.uint16))
    base = ["train", str(tmp_path / "a.tif"), "--labels", str(tmp_path / "a_labels.tif"),
            "--steps", "1", "--patch-size", "64"]
    assert main([*base, "--out", str(tmp_path / "m1.cellfit")]) == 0
    assert "looks like a complete mask" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "m2.cellfit"), "--masks"]) == 0
    err = capsys.readouterr().err
    assert "looks like a complete mask" not in err
    assert "6 cell(s)" in err
