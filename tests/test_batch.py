"""Batch prediction: resume, never-overwrite rules, clean interrupts, metadata kept,
zarr output, slice linking, and halving the tile batch when the device runs out of memory."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

import cellfit.predict as cpredict
from _faults import deny_writes_under, fill_disk_under
from cellfit.batch import FileEvent, predict_files
from cellfit.cli import main
from cellfit.link import SliceLinker, link_stack, match_objects
from cellfit.model import ModelInfo, build_model, save_model
from cellfit.predict import PlanePredictor, TileRunner
from cellfit.synthetic import synthetic_cells


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a shared CI machine several threads spin against each other
    (a tiny network's tile takes seconds instead of milliseconds)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    path = tmp_path_factory.mktemp("model") / "tiny.cellfit"
    return save_model(path, build_model(info), info)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_inputs(folder: Path, n: int = 3, planes: int = 1, shape=(48, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        imgs = [synthetic_cells(shape, n_cells=4, seed=10 * i + k)[0] for k in range(planes)]
        data = imgs[0] if planes == 1 else np.stack(imgs)
        p = folder / f"f{i}.tif"
        tifffile.imwrite(p, data, photometric="minisblack")
        paths.append(p)
    return paths


def run(model, inputs, out, **kw) -> list[FileEvent]:
    return [ev for ev in predict_files(model, inputs, out, device="cpu", **kw) if ev.status != "plane"]


def statuses(events) -> dict[str, str]:
    return {ev.path.name: ev.status for ev in events}


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    return code, err


# ----------------------------------------------------------------- resume
def test_rerun_skips_complete_outputs_and_overwrite_redoes_them(tmp_path, model_file):
    inputs = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert set(statuses(run(model_file, [tmp_path / "in"], out)).values()) == {"done"}
    first = snapshot(out)
    assert sorted(first) == ["f0_labels.tif", "f1_labels.tif", "f2_labels.tif"]
    # the default skips complete outputs, untouched
    assert set(statuses(run(model_file, [tmp_path / "in"], out)).values()) == {"skipped"}
    assert snapshot(out) == first
    # asking for probabilities now: labels exist but the file is not complete
    ev = run(model_file, [inputs[0]], out, probabilities=True)
    assert statuses(ev) == {"f0.tif": "done"}
    assert (out / "f0_prob.tif").exists()
    # --overwrite redoes everything
    ev = run(model_file, [tmp_path / "in"], out, overwrite=True)
    assert set(statuses(ev).values()) == {"done"}
    assert all(snapshot(out)[k][1] != first[k][1] for k in first)


def test_the_same_model_saved_again_elsewhere_skips_its_results(tmp_path):
    """The dock writes its in-memory model to a new temporary file for each batch: the
    results of the first batch are still the same model's (what the digest says)."""
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5)
    model = build_model(info).eval()
    make_inputs(tmp_path / "in", n=2)
    out = tmp_path / "out"
    first = save_model(tmp_path / "a" / "model.cellfit", model, info)
    assert set(statuses(run(first, [tmp_path / "in"], out)).values()) == {"done"}
    for i in range(6):  # the header's order used to change from save to save
        again = save_model(tmp_path / f"b{i}" / "model.cellfit", model, info)
        assert set(statuses(run(again, [tmp_path / "in"], out)).values()) == {"skipped"}


def test_outputs_of_another_model_or_older_input_are_redone(tmp_path, model_file):
    inputs = make_inputs(tmp_path / "in", n=2)
    out = tmp_path / "out"
    run(model_file, [tmp_path / "in"], out)
    # the input changed since: redone, with a notice
    st = inputs[1].stat()
    os.utime(inputs[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ev = list(predict_files(model_file, [tmp_path / "in"], out, device="cpu"))
    assert statuses(ev) == {"f0.tif": "skipped", "f1.tif": "done"}
    assert any("replacing" in (e.notice or "") for e in ev if e.path.name == "f1.tif")
    # another model: everything redone
    torch.manual_seed(1)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5)
    other = save_model(tmp_path / "other.cellfit", build_model(info), info)
    assert set(statuses(run(other, [tmp_path / "in"], out)).values()) == {"done"}
    # an output without a fingerprint (e.g. from an older cellfit) is redone too
    tifffile.imwrite(out / "f0_labels.tif", np.zeros((48, 64), np.uint16))
    assert statuses(run(other, [tmp_path / "in"], out))["f0.tif"] == "done"


def test_a_change_of_post_processing_settings_redoes_the_outputs(tmp_path, model_file,
                                                                 monkeypatch):
    """The labels depend on the post-processing settings (the dock's Segment tab
    passes the user's): a rerun with other settings redoes the outputs, saying so, and
    they equal a fresh run's with those settings; a rerun with the same settings skips
    them. (The image-driven blob network stands in for the untrained model, whose
    labels would be empty whatever the settings.)"""
    import cellfit.batch as cbatch
    from test_stream import blob_engine

    monkeypatch.setattr(cbatch, "LoadedModel", lambda path, settings: blob_engine(settings))
    make_inputs(tmp_path / "in", n=2, planes=2)
    out = tmp_path / "out"

    def labels(folder: Path) -> dict[str, np.ndarray]:
        return {name: tifffile.imread(folder / f"{name}_labels.tif") for name in ("f0", "f1")}

    assert set(statuses(run(model_file, [tmp_path / "in"], out)).values()) == {"done"}
    default = labels(out)
    assert all(lab.max() >= 2 for lab in default.values())
    assert set(statuses(run(model_file, [tmp_path / "in"], out)).values()) == {"skipped"}
    for changed in ({"fg_threshold": 0.9}, {"min_size": 10**4}):
        ev = list(predict_files(model_file, [tmp_path / "in"], out, device="cpu",
                                postprocess=changed))
        assert statuses(e for e in ev if e.status != "plane") == {"f0.tif": "done",
                                                                   "f1.tif": "done"}
        assert sum("with other settings: replacing it" in (e.notice or "") for e in ev) == 2
        fresh = tmp_path / f"fresh_{next(iter(changed))}"
        run(model_file, [tmp_path / "in"], fresh, postprocess=changed)
        now = labels(out)
        for name in ("f0", "f1"):
            np.testing.assert_array_equal(now[name], labels(fresh)[name])
            assert not np.array_equal(now[name], default[name])
        again = run(model_file, [tmp_path / "in"], out, postprocess=changed)
        assert set(statuses(again).values()) == {"skipped"}
    # back to the model's own settings: redone again, as at first
    assert set(statuses(run(model_file, [tmp_path / "in"], out)).values()) == {"done"}
    for name, lab in labels(out).items():
        np.testing.assert_array_equal(lab, default[name])


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (zarr outputs are folders) by relative path, with the
    SHA-256 of its bytes; folders too, with an empty digest."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file() else ""
        for p in sorted(folder.rglob("*"))
    }


def _interrupt_at_plane(monkeypatch, n: int, out: Path) -> dict:
    """Make prediction raise KeyboardInterrupt (Ctrl-C) when the ``n``-th plane of the
    batch is predicted, once the writing of its file has begun to show in ``out``.
    What the output folder holds at that moment, before any clean-up runs, is what a
    killed process (SIGKILL, a power cut) would leave: ``seen["files"]``, as
    :func:`_tree` gives it."""
    original = PlanePredictor.predict
    seen: dict = {"planes": 0, "files": None}

    def interrupting(self, planes, stats):
        before = _tree(out)  # as this file's prediction starts
        for res in original(self, planes, stats):
            if res.probabilities is not None:
                seen["planes"] += 1
                if seen["planes"] == n:
                    deadline = time.monotonic() + 10  # the writer threads are at work
                    while _tree(out) == before and time.monotonic() < deadline:
                        time.sleep(0.01)
                    seen["files"] = _tree(out)
                    raise KeyboardInterrupt
            yield res

    monkeypatch.setattr(cpredict.PlanePredictor, "predict", interrupting)
    return seen


def test_interrupted_run_leaves_no_partial_output_and_resumes(tmp_path, model_file, capsys,
                                                               monkeypatch):
    """Ctrl-C in the middle of a stack: the finished file is complete, the file in
    progress never had its final name (not even at the moment of the interruption, so
    a killed process leaves nothing under it either) and nothing of it is left (not
    even a temporary); a rerun finishes the batch with the same outputs as an
    uninterrupted run."""
    make_inputs(tmp_path / "in", n=3, planes=4)
    ref = tmp_path / "ref"
    run(model_file, [tmp_path / "in"], ref, probabilities=True)

    out = tmp_path / "out"
    seen = _interrupt_at_plane(monkeypatch, 6, out)  # second file, second slice
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out,
                    "--probabilities", "--device", "cpu")
    assert code == 130
    assert "interrupted after 1 file(s)" in err and "run the same command again" in err
    during = sorted(seen["files"])
    assert [n for n in during if not n.startswith(".")] == ["f0_labels.tif", "f0_prob.tif"]
    assert any(n.endswith(".part") for n in during)  # f1 was being written
    assert sorted(os.listdir(out)) == ["f0_labels.tif", "f0_prob.tif"]  # no temporaries
    monkeypatch.undo()
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out,
                    "--probabilities", "--device", "cpu")
    assert code == 0, err
    assert "2 file(s) segmented" in err and "1 skipped" in err
    for name in os.listdir(ref):
        np.testing.assert_array_equal(tifffile.imread(out / name), tifffile.imread(ref / name))


def test_an_interrupted_overwrite_keeps_the_old_outputs(tmp_path, model_file, capsys,
                                                        monkeypatch):
    """--overwrite replaces an output only once the new one is complete: Ctrl-C in
    the middle of the file leaves the old outputs byte for byte, both at the moment of
    the interruption (what a killed process leaves) and after the clean-up."""
    make_inputs(tmp_path / "in", n=1, planes=4)
    out = tmp_path / "out"
    run(model_file, [tmp_path / "in"], out, probabilities=True)
    old = _tree(out)
    assert sorted(old) == ["f0_labels.tif", "f0_prob.tif"]

    seen = _interrupt_at_plane(monkeypatch, 3, out)  # third slice: two written already
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out,
                    "--probabilities", "--device", "cpu", "--overwrite")
    assert code == 130, err
    assert {n: b for n, b in seen["files"].items() if not n.startswith(".")} == old
    assert _tree(out) == old


def test_closing_the_generator_mid_file_and_stale_temporaries(tmp_path, model_file):
    """The plugin cancels by closing the generator: same guarantee. A temporary left by
    a killed process is removed when its file is predicted again."""
    make_inputs(tmp_path / "in", n=2, planes=3)
    out = tmp_path / "out"
    gen = predict_files(model_file, [tmp_path / "in"], out, device="cpu", probabilities=True)
    for ev in gen:
        if ev.status == "plane" and ev.index == 1:
            break
    gen.close()
    assert sorted(os.listdir(out)) == ["f0_labels.tif", "f0_prob.tif"]
    (out / ".f1_labels.tif.deadbeef.part").write_bytes(b"half a file")
    ev = run(model_file, [tmp_path / "in"], out, probabilities=True)
    assert statuses(ev) == {"f0.tif": "skipped", "f1.tif": "done"}
    assert sorted(os.listdir(out)) == ["f0_labels.tif", "f0_prob.tif", "f1_labels.tif",
                                       "f1_prob.tif"]


# ------------------------------------------------------------ never overwrite
def test_inputs_are_never_modified_or_overwritten(tmp_path, model_file, capsys):
    make_inputs(tmp_path / "in", n=2)
    # an input named like an output of another input must not be touched either
    tifffile.imwrite(tmp_path / "in" / "f0_labels.tif", np.ones((48, 64), np.uint8))

    def inputs_now():
        return {k: v for k, v in snapshot(tmp_path / "in").items() if "results" not in k}

    before = inputs_now()
    for extra in ([], ["--overwrite"], ["--format", "zarr"]):
        code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out",
                        tmp_path / "in" / "results", "--device", "cpu", *extra)
        assert code == 0, err
    assert inputs_now() == before
    # results inside the input folder are not taken for inputs on a rerun
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out",
                    tmp_path / "in" / "results", "--device", "cpu")
    assert code == 0 and "0 file(s) segmented" in err and "3 skipped" in err
    # the output folder equal to an input folder is refused, however spelled
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out",
                    tmp_path / "in" / "results" / "..", "--device", "cpu")
    assert code == 2 and "separate output folder" in err
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", tmp_path / "o",
                    "--overwrite", "--skip-existing")
    assert code == 2 and "contradict" in err
    assert inputs_now() == before


# ------------------------------------------------------------- write errors
@pytest.mark.parametrize(("fault", "fmt"), [("disk full", "tiff"), ("permission denied", "tiff"),
                                           ("disk full", "zarr"), ("permission denied", "zarr")])
def test_a_write_error_is_one_sentence_and_leaves_nothing_half_written(
        tmp_path, model_file, capsys, monkeypatch, fault, fmt):
    """The output folder fills up (the disk runs out of room in the middle of the
    first file) or may not be written to: each file fails with one sentence that says
    why and what to check (no traceback, no "internal error"), the old outputs that
    --overwrite was replacing are kept byte for byte, and nothing else is left, not
    even a temporary."""
    make_inputs(tmp_path / "in", n=2, planes=3)
    out = tmp_path / "out"
    suffix = {"tiff": ".tif", "zarr": ".zarr"}[fmt]
    run(model_file, [tmp_path / "in" / "f0.tif"], out, probabilities=True, format=fmt)
    old = _tree(out)
    assert sorted(n for n in old if "/" not in n) == [f"f0_labels{suffix}", f"f0_prob{suffix}"]
    with monkeypatch.context() as m:
        if fault == "disk full":
            disk = fill_disk_under(m, out, room=2000)
            why = "(No space left on device)"
        else:
            refused = deny_writes_under(m, out)
            why = "(Permission denied)"
        code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out,
                        "--probabilities", "--device", "cpu", "--overwrite", "--format", fmt)
    if fault == "disk full":
        assert disk["failures"] >= 2 and disk["room"] == 0
    else:
        assert refused
    assert code == 1, err
    assert "Traceback" not in err and "internal error" not in err
    reported = [line for line in err.splitlines() if line.startswith("cellfit: ")]
    assert len(reported) == 2, err
    for line, name in zip(reported, ("f0", "f1")):
        assert line.startswith(f"cellfit: {tmp_path / 'in' / name}.tif: could not write "
                               f"{out / name}_")
        assert line.endswith(f"{why}: check the free space and permissions of the output "
                             "folder."), line
    assert err.rstrip().endswith("0 file(s) segmented into " + str(out) +
                                 ", 2 failed: f0.tif; f1.tif.")
    assert _tree(out) == old


def test_one_bad_file_is_reported_and_the_batch_goes_on(tmp_path, model_file, capsys):
    make_inputs(tmp_path / "in", n=2, planes=3)
    raw = (tmp_path / "in" / "f1.tif").read_bytes()
    (tmp_path / "in" / "f0.tif").write_bytes(raw[: len(raw) // 2])  # cut: planes missing
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", tmp_path / "out",
                    "--device", "cpu")
    assert code == 1
    assert "f0.tif" in err and "truncated or corrupt" in err
    assert "1 file(s) segmented" in err and "1 failed: f0.tif" in err
    assert sorted(os.listdir(tmp_path / "out")) == ["f1_labels.tif"]


# ---------------------------------------------------------------- metadata
def test_time_series_and_3d_stacks_keep_axes_and_calibration(tmp_path, model_file):
    img = np.stack([synthetic_cells((40, 56), n_cells=3, seed=s)[0] for s in range(6)])
    (tmp_path / "in").mkdir()
    tifffile.imwrite(
        tmp_path / "in" / "ij.tif", img.reshape(2, 3, 40, 56), imagej=True,
        resolution=(1 / 0.25, 1 / 0.25),
        metadata={"axes": "TZYX", "spacing": 1.5, "unit": "um", "finterval": 30.0},
    )
    tifffile.imwrite(tmp_path / "in" / "plain.tif", img, resolution=(2.0, 2.0),
                     resolutionunit="CENTIMETER", metadata={"axes": "TYX"})
    out = tmp_path / "out"
    assert set(statuses(run(model_file, [tmp_path / "in"], out, probabilities=True)).values()) == {"done"}
    with tifffile.TiffFile(out / "ij_labels.tif") as tif:
        assert tif.series[0].axes == "TZYX" and tif.series[0].shape == (2, 3, 40, 56)
        ij = tif.imagej_metadata
        assert (ij["spacing"], ij["unit"], ij["finterval"]) == (1.5, "um", 30.0)
        assert tif.pages[0].tags["XResolution"].value == (4, 1)
    with tifffile.TiffFile(out / "ij_prob.tif") as tif:
        assert tif.series[0].axes == "TZCYX" and tif.series[0].shape == (2, 3, 3, 40, 56)
    with tifffile.TiffFile(out / "plain_labels.tif") as tif:
        assert tif.series[0].axes == "TYX"
        assert tif.pages[0].tags["XResolution"].value == (2, 1)
        assert tif.pages[0].tags["ResolutionUnit"].value == 3  # centimeter
    with tifffile.TiffFile(out / "plain_prob.tif") as tif:
        assert tif.series[0].axes == "TCYX"


def test_zarr_output_equals_tiff_output(tmp_path, model_file):
    import zarr

    make_inputs(tmp_path / "in", n=1, planes=3)
    run(model_file, [tmp_path / "in"], tmp_path / "tif", probabilities=True)
    ev = run(model_file, [tmp_path / "in"], tmp_path / "zarr", probabilities=True, format="zarr")
    assert [p.name for p in ev[0].outputs] == ["f0_labels.zarr", "f0_prob.zarr"]
    lab = zarr.open_array(str(tmp_path / "zarr" / "f0_labels.zarr"), mode="r")
    prob = zarr.open_array(str(tmp_path / "zarr" / "f0_prob.zarr"), mode="r")
    assert lab.attrs["axes"] == "QYX" and prob.attrs["axes"] == "QCYX"
    np.testing.assert_array_equal(lab[:], tifffile.imread(tmp_path / "tif" / "f0_labels.tif"))
    np.testing.assert_array_equal(prob[:], tifffile.imread(tmp_path / "tif" / "f0_prob.tif"))
    assert statuses(run(model_file, [tmp_path / "in"], tmp_path / "zarr", probabilities=True,
                        format="zarr")) == {"f0.tif": "skipped"}


# ------------------------------------------------------------------ linking
def test_match_objects_is_one_to_one_by_overlap():
    prev = np.zeros((20, 20), int)
    prev[2:8, 2:8] = 5  # a nucleus
    prev[10:18, 10:18] = 7
    cur = np.zeros((20, 20), int)
    cur[3:8, 3:8] = 1  # the same nucleus, a little smaller
    cur[10:14, 10:18] = 2  # half of 7 ...
    cur[14:18, 10:18] = 3  # ... and the other half: only one of them can continue 7
    cur[0:2, 15:20] = 4  # a new object
    m = match_objects(prev, cur)
    assert m[1] == 5 and 4 not in m
    assert [m.get(2), m.get(3)].count(7) == 1 and len(m) == 2


def test_slice_linker_keeps_one_id_through_the_stack():
    stack = np.zeros((6, 30, 30), int)
    for z in range(6):  # a nucleus drifting through all slices, ids shuffled per slice
        stack[z, 5 + z : 12 + z, 5:12] = 3 + z % 2
    for z in range(2, 5):  # a second one in slices 2..4
        stack[z, 20:26, 20:26] = 1
    stack[5, 0:3, 25:28] = 9  # a speck in the last slice
    linked = link_stack(stack)
    first = {int(v) for v in np.unique(linked[:, 5:18, 5:12]) if v}
    second = {int(v) for v in np.unique(linked[2:5, 20:26, 20:26]) if v}
    assert len(first) == 1 and len(second) == 1 and first != second
    assert linked[5, 1, 26] not in first | second
    # a time series of volumes (T, Z): each volume links on its own, ids stay unique
    tz = link_stack(np.concatenate([stack, stack]), lead_shape=(2, 6))
    assert len({int(v) for v in np.unique(tz[6:, 5:18, 5:12]) if v} - first) == 1
    assert SliceLinker((6,))(0, stack[0]).dtype == np.uint32


def test_link_slices_end_to_end(tmp_path):
    """A stack where one cell vanishes after slice 1 (so per-slice ids shift): with
    linking every other cell keeps its id through all slices."""
    from cellfit.batch import Settings, run_file
    from test_stream import blob_engine, drain

    image, lab = synthetic_cells((96, 128), n_cells=10, seed=5)
    gone = image.copy()
    gone[lab == 1] = image[lab == 0].mean()  # cell 1 (first in raster order) vanishes
    stack = np.stack([image, image, gone, gone, gone])
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "z.tif"
    tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZYX"})
    out = {}
    for link in (False, True):
        settings = Settings(link_slices=link, tile=128)
        outputs, _ = drain(run_file(blob_engine(settings), path,
                                    tmp_path / f"o{link}" / "z_labels.tif", None, settings))
        out[link] = tifffile.imread(outputs[0])
    per, linked = out[False], out[True]
    assert per[0].max() >= 8
    assert not np.array_equal(per[0][lab > 1], per[4][lab > 1])  # per-slice ids shifted
    keep = (lab > 1) & (per[0] > 0) & (per[4] > 0)
    np.testing.assert_array_equal(linked[0][keep], linked[4][keep])  # linked ids did not
    np.testing.assert_array_equal(linked > 0, per > 0)
    assert len(np.unique(linked)) == len(np.unique(per[0]))  # no new ids appeared


def test_link_slices_in_the_cli_is_part_of_complete(tmp_path, model_file, capsys):
    make_inputs(tmp_path / "in", n=1, planes=3)
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", tmp_path / "o",
                    "--device", "cpu", "--link-slices")
    assert code == 0, err
    # linking is part of what makes an output complete: switching it redoes the file
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", tmp_path / "o",
                    "--device", "cpu")
    assert code == 0 and "1 file(s) segmented" in err and "replacing" in err


# ------------------------------------------------------------ out of memory
class OOMAbove(nn.Module):
    """Wraps a model; raises CUDA's out-of-memory error for batches above ``limit``."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = model
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_and_says_so():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1))
    x = torch.randn(11, 1, 32, 32)
    ref = TileRunner(net, "cpu", batch_size=11)(x)
    wrapped = OOMAbove(net, limit=3)
    runner = TileRunner(wrapped, "cpu", batch_size=16)
    got = runner(x)
    torch.testing.assert_close(got, ref)
    assert runner.batch_size == 2
    notice = runner.pop_notice()
    assert "batches of 16 tiles: retrying with 8" in notice and "retrying with 2" in notice
    assert runner.pop_notice() is None
    # the halved batch is kept: no more failures afterwards
    wrapped.sizes.clear()
    runner(x)
    assert max(wrapped.sizes) == 2
    # not even one tile fits: a clear error
    from cellfit.cli import FLAGS
    from cellfit.errors import CellfitError

    with pytest.raises(CellfitError) as err:
        TileRunner(OOMAbove(net, limit=0), "cpu", batch_size=4)(x)
    assert "make --tile smaller" in err.value.worded(FLAGS)


def test_out_of_memory_during_a_batch_run_is_reported_in_the_cli(tmp_path, model_file, capsys,
                                                                  monkeypatch):
    import cellfit.model as cmodel

    load = cmodel.load_model

    def load_with_small_memory(path, device="cpu"):
        model, info = load(path, device)
        return OOMAbove(model, limit=1), info

    monkeypatch.setattr(cmodel, "load_model", load_with_small_memory)
    make_inputs(tmp_path / "in", n=1, planes=1, shape=(100, 130))
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", tmp_path / "out",
                    "--device", "cpu", "--tile", "64", "--batch-size", "4")
    assert code == 0, err
    assert "note: f0.tif: out of CPU memory with batches of 4 tiles: retrying with 2" in err
    assert (tmp_path / "out" / "f0_labels.tif").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batch_equals_cpu(tmp_path, model_file):
    """On a GPU (AMP, automatic batch size) the labels match the CPU run closely."""
    make_inputs(tmp_path / "in", n=1, planes=3, shape=(300, 400))
    for dev in ("cpu", "cuda"):
        evs = list(predict_files(model_file, [tmp_path / "in"], tmp_path / dev, device=dev,
                                 probabilities=True))
        assert evs[-1].status == "done"
    a = tifffile.imread(tmp_path / "cpu" / "f0_prob.tif")
    b = tifffile.imread(tmp_path / "cuda" / "f0_prob.tif")
    assert np.abs(a - b).max() < 0.05


# ------------------------------------------------------------------ events
def test_file_events_are_progress_events():
    from cellfit.events import Progress
    from cellfit.file_prediction import FileProgress

    ev = FileEvent(1, 4, Path("in/a.tif"), "plane", 2, 8, tiles_done=3, tiles_total=6)
    assert isinstance(ev, Progress) and ev.notice is None
    assert ev.file_fraction == pytest.approx(2.5 / 8)
    assert ev.fraction == pytest.approx((1 + 2.5 / 8) / 4)  # the share of the batch
    assert ev.text == "File 2 of 4: a.tif, slice 2 of 8"
    done = FileEvent(3, 4, Path("b.tif"), "done", 8, 8, notice="note")
    assert done.fraction == 1.0 and done.file_fraction == 1.0 and done.notice == "note"
    assert done.text == "File 4 of 4: b.tif, done"
    assert FileEvent(0, 2, Path("c.tif"), "skipped").text == "File 1 of 2: c.tif, skipped (results exist)"
    p = FileProgress(plane=1, n_planes=4, tiles_done=1, tiles_total=2)
    assert isinstance(p, Progress) and p.fraction == pytest.approx(1.5 / 4)
    assert FileProgress(plane=4, n_planes=4).fraction == 1.0


def test_run_file_yields_file_progress_and_returns_the_outputs(tmp_path, model_file):
    from cellfit.batch import LoadedModel, Settings, run_file
    from cellfit.file_prediction import FileProgress

    (path,) = make_inputs(tmp_path / "in", n=1, planes=3)
    settings = Settings(device="cpu")
    gen = run_file(LoadedModel(model_file, settings), path, tmp_path / "o" / "f0_labels.tif",
                   None, settings)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            outputs = stop.value
            break
    assert events and all(isinstance(ev, FileProgress) for ev in events)
    finished = [ev.plane for ev in events if not ev.tiles_total]
    assert finished == [1, 2, 3] and events[-1].n_planes == 3 and events[-1].fraction == 1.0
    assert outputs == (tmp_path / "o" / "f0_labels.tif",)
    assert tifffile.imread(outputs[0]).shape == (3, 48, 64)


def test_more_objects_than_16_bit_labels_hold_are_written_as_32_bit(tmp_path, model_file):
    """A stack is written with 16-bit labels; a plane with more objects makes the file
    be written again with 32-bit labels, and a notice says so."""
    from cellfit.batch import LoadedModel, Settings, run_file

    (path,) = make_inputs(tmp_path / "in", n=1, planes=2, shape=(260, 260))
    settings = Settings(device="cpu", tile=256)
    model = LoadedModel(model_file, settings)
    many = (np.arange(260 * 260, dtype=np.int64).reshape(260, 260) + 1)  # 67600 objects
    model.labels = lambda probs, image=None: many
    out = tmp_path / "o" / "f0_labels.tif"
    gen = run_file(model, path, out, None, settings)
    notices = []
    while True:
        try:
            ev = next(gen)
        except StopIteration as stop:
            outputs = stop.value
            break
        if ev.notice:
            notices.append(ev.notice)
    assert notices == ["f0.tif: more than 65535 objects, writing 32-bit labels"]
    labels = tifffile.imread(outputs[0])
    assert labels.dtype == np.uint32 and labels.max() == 260 * 260
    assert sorted(os.listdir(out.parent)) == ["f0_labels.tif"]  # no temporaries left


def test_a_failed_file_keeps_its_error_and_the_cli_names_the_flag(tmp_path, model_file, capsys,
                                                                  monkeypatch):
    import cellfit.batch as cbatch
    from cellfit.errors import CellfitError

    def out_of_memory(*args, **kwargs):
        raise MemoryError
        yield

    monkeypatch.setattr(cbatch, "run_file", out_of_memory)
    make_inputs(tmp_path / "in", n=1)
    (ev,) = run(model_file, [tmp_path / "in"], tmp_path / "o")
    assert ev.status == "failed" and isinstance(ev.error, CellfitError)
    assert ev.error.setting == "tile"
    assert ev.error.worded({"tile": "TILE"}).endswith("make TILE smaller or split the stack.")
    assert str(ev.error).startswith("f0.tif is too large for this machine's memory")
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", tmp_path / "o",
                    "--device", "cpu")
    assert code == 1
    assert "f0.tif is too large for this machine's memory: make --tile smaller or split " \
           "the stack." in err


def test_the_labels_dtype_and_temporary_names_are_public(tmp_path):
    from cellfit.outputs import label_dtype, remove_stale_temporaries, tmp_name

    assert [label_dtype(n) for n in (0, 255, 256, 65535, 65536)] == [
        np.uint8, np.uint8, np.uint16, np.uint16, np.uint32]
    out = tmp_path / "a_labels.tif"
    t = tmp_name(out)
    assert t.parent == tmp_path and t.name.startswith(".a_labels.tif.") and t.suffix == ".part"
    t.write_bytes(b"half")
    remove_stale_temporaries(out)  # recognises its own temporary names
    assert not t.exists()
