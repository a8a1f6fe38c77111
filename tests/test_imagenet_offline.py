"""ImageNet encoder weights: a one-sentence error when the machine cannot download them."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import tifffile

from cellfit.synthetic import sparse_annotation, synthetic_cells


def test_imagenet_weights_offline_fail_with_one_sentence(tmp_path):
    img, lab = synthetic_cells((64, 64), n_cells=4, seed=0)
    tifffile.imwrite(tmp_path / "a.tif", img)
    tifffile.imwrite(tmp_path / "a_labels.tif", sparse_annotation(lab, 1.0).astype(np.uint16))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cellfit.cli", "train", str(tmp_path / "a.tif"),
         "--labels", str(tmp_path / "a_labels.tif"), "--out", str(tmp_path / "m.cellfit"),
         "--steps", "1", "--encoder-weights", "imagenet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("cellfit: error: could not download the ImageNet weights")
    # the flag is named by the CLI (cellfit.cli.FLAGS), the sentence by the engine
    assert "set --encoder-weights to the file" in err[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "m.cellfit").exists()
