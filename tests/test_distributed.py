"""`cellfit predict --scheduler`: files and runs of slices as tasks on a
dask.distributed LocalCluster with two worker processes; outputs equal the local run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
import torch

from cellfit.batch import predict_files
from cellfit.cli import main
from cellfit.model import ModelInfo, build_model, save_model
from cellfit.synthetic import synthetic_cells

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow  # two worker processes import torch: ~10-20 s


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cl:
        yield cl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5)
    model = save_model(root / "tiny.cellfit", build_model(info), info)
    (root / "in").mkdir()
    imgs = [synthetic_cells((48, 64), n_cells=4, seed=s)[0] for s in range(5)]
    tifffile.imwrite(root / "in" / "a.tif", imgs[0])
    tifffile.imwrite(root / "in" / "b.tif", imgs[1], resolution=(2.0, 2.0))
    tifffile.imwrite(root / "in" / "stack.tif", np.stack(imgs), imagej=True,
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"})
    (root / "in" / "bad.tif").write_text("not a TIFF")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    local = {ev.path.name: ev for ev in predict_files(
        model, [root / "in"], root / "local", probabilities=True, link_slices=True,
        device="cpu") if ev.status != "plane"}
    torch.set_num_threads(old)
    return root, model, local


def test_distributed_run_equals_the_local_run(cluster, setup):
    root, model, local = setup
    events = list(predict_files(
        model, [root / "in"], root / "dist", probabilities=True, link_slices=True,
        device="cpu", scheduler=cluster.scheduler_address, slices_per_task=2,
    ))
    final = {ev.path.name: ev for ev in events if ev.status != "plane"}
    assert {k: e.status for k, e in final.items()} == {k: e.status for k, e in local.items()} == {
        "a.tif": "done", "b.tif": "done", "stack.tif": "done", "bad.tif": "failed"}
    assert "could not be read as a TIFF" in str(final["bad.tif"].error)
    # the 5-slice stack ran as runs of 2 slices: progress came per run
    assert [e.plane for e in events if e.status == "plane" and e.path.name == "stack.tif"][-1] == 5
    names = sorted(os.listdir(root / "local"))
    assert names == sorted(os.listdir(root / "dist"))  # no scratch folder or temporary left
    assert len(names) == 6
    for name in names:
        a, b = tifffile.imread(root / "local" / name), tifffile.imread(root / "dist" / name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name.endswith("_labels.tif"):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    with tifffile.TiffFile(root / "dist" / "stack_labels.tif") as tif:
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["spacing"] == 2.0

    # each worker loaded the model once; a rerun skips everything and loads nothing
    with distributed.Client(cluster, set_as_default=False) as client:
        loads = client.run(lambda: __import__("cellfit.distributed").distributed.MODEL_LOADS)
        assert sorted(loads.values()) == [1, 1]
        again = [ev.status for ev in predict_files(
            model, [root / "in" / "a.tif", root / "in" / "stack.tif"], root / "dist",
            probabilities=True, link_slices=True, device="cpu", scheduler=client)]
        assert again == ["skipped", "skipped"]


def test_cli_scheduler_option(cluster, setup, capsys):
    root, model, _ = setup
    out = root / "cli"
    code = main(["predict", str(model), str(root / "in" / "stack.tif"), str(root / "in" / "a.tif"),
                 "--out", str(out), "--device", "cpu", "--link-slices",
                 "--scheduler", cluster.scheduler_address, "--slices-per-task", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "2 file(s) segmented" in err
    np.testing.assert_array_equal(tifffile.imread(out / "stack_labels.tif"),
                                  tifffile.imread(root / "local" / "stack_labels.tif"))
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = main(["predict", str(model), str(root / "in"), "--out", str(root / "x"),
                     "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and "could not reach the dask scheduler" in err


def test_workers_that_cannot_see_the_files_are_refused(cluster, setup, tmp_path):
    """Workers must see the model, inputs and output folder at the same paths."""
    from cellfit.distributed import _preflight
    from cellfit.errors import CellfitError

    root, _, _ = setup
    with distributed.Client(cluster, set_as_default=False) as client:
        with pytest.raises(CellfitError, match=r"cannot see the model .*shared file system"):
            _preflight(client, tmp_path / "elsewhere.cellfit", tmp_path, [root / "in" / "a.tif"])
        with pytest.raises(CellfitError, match="cannot write into the output folder"):
            _preflight(client, root / "tiny.cellfit", tmp_path / "nowhere",
                       [root / "in" / "a.tif"])
