"""Per-cell measurements and the quality report (cellfit.measure, ``cellfit predict
--measure``): exact numbers on constructed label images, calibration from TIFF
metadata, atomic CSV tables, plane-by-plane streaming, the flags, the command line end
to end (reruns included), and two bugs of the diameter note of ``cellfit predict``."""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage.morphology import convex_hull_image

import cellfit.batch as cbatch
import cellfit.file_prediction as fpred
from _faults import fill_disk_under
from cellfit import measure as M
from cellfit.cli import main
from cellfit.errors import CellfitError
from cellfit.io import ImageMeta
from cellfit.model import ModelInfo, build_model, read_model_info, save_model
from cellfit.synthetic import synthetic_cells


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------- constructed scenes
def scene_two_cells():
    """A 10 x 12 label image: cell 2 a 3 x 4 rectangle inside, cell 7 an L touching
    the right edge; a 2-channel image with known values."""
    labels = np.zeros((10, 12), np.uint16)
    labels[1:4, 2:6] = 2  # 12 pixels, rows 1-3, columns 2-5
    labels[5:9, 9:12] = 7  # 4 x 3 block at the right edge ...
    labels[8, 6:9] = 7  # ... and a foot: an L of 15 pixels
    image = np.zeros((2, 10, 12), np.uint16)
    image[0] = np.arange(120, dtype=np.uint16).reshape(10, 12)  # value = 12 * row + column
    image[1] = 1000
    image[1, 2, 3] = 4000  # one bright pixel in cell 2
    return labels, image


def test_measure_plane_gives_exact_numbers():
    labels, image = scene_two_cells()
    t = M.measure_plane(labels, image, plane=3)
    assert list(t) == list(M.table_columns(2))
    assert t["id"].tolist() == [2, 7] and t["plane"].tolist() == [3, 3]
    assert t["area_px"].tolist() == [12, 15]
    assert t["centroid_y"][0] == pytest.approx(2.0) and t["centroid_x"][0] == pytest.approx(3.5)
    ys, xs = np.nonzero(labels == 7)
    assert t["centroid_y"][1] == pytest.approx(ys.mean())
    assert t["centroid_x"][1] == pytest.approx(xs.mean())
    assert t["equivalent_diameter_px"].tolist() == pytest.approx(
        [2 * math.sqrt(12 / math.pi), 2 * math.sqrt(15 / math.pi)])
    assert t["solidity"][0] == pytest.approx(1.0)
    assert t["solidity"][1] == pytest.approx(15 / convex_hull_image(labels == 7).sum())
    assert t["solidity"][1] < 1
    assert 0 < t["eccentricity"][0] < 1  # a 3 x 4 rectangle is a little elongated
    assert t["touches_edge"].tolist() == [False, True]
    # channel 0: 12 * row + column summed over each cell
    for k, cell in enumerate((2, 7)):
        vals = image[0][labels == cell].astype(float)
        assert t["mean_intensity_c0"][k] == pytest.approx(vals.mean())
        assert t["max_intensity_c0"][k] == vals.max()
        assert t["integrated_intensity_c0"][k] == vals.sum()
    assert t["integrated_intensity_c0"][0] == sum(12 * r + c for r in (1, 2, 3) for c in (2, 3, 4, 5))
    assert t["max_intensity_c1"].tolist() == [4000, 1000]
    assert t["integrated_intensity_c1"].tolist() == [11 * 1000 + 4000, 15 * 1000]
    assert t["mean_intensity_c1"][0] == pytest.approx(15000 / 12)


def test_calibrated_columns_channel_names_and_no_image():
    labels, image = scene_two_cells()
    t = M.measure_plane(labels, image[:1], pixel_size=(0.5, 0.25), unit="µm",
                        channel_names=["DAPI"])
    assert "area_um2" in t and "equivalent_diameter_um" in t
    assert t["area_um2"].tolist() == pytest.approx([12 * 0.125, 15 * 0.125])
    assert t["equivalent_diameter_um"][0] == pytest.approx(2 * math.sqrt(1.5 / math.pi))
    assert "mean_intensity_DAPI" in t and "mean_intensity_c0" not in t
    plain = M.measure_plane(labels)
    assert list(plain) == list(M.COLUMNS)
    assert M.measure_plane(labels, image[0])["mean_intensity_c0"].tolist() == pytest.approx(
        M.measure_plane(labels, image)["mean_intensity_c0"].tolist())


def test_no_cells_gives_every_column_and_no_row():
    t = M.measure_plane(np.zeros((8, 8), np.uint8), np.ones((3, 8, 8)), pixel_size=(1, 1),
                        unit="um")
    assert list(t) == list(M.table_columns(3, unit="um"))
    assert all(len(v) == 0 for v in t.values())
    assert t["id"].dtype == np.int64 and t["touches_edge"].dtype == bool


@pytest.mark.parametrize(("call", "words"), [
    (lambda: M.measure_plane(np.zeros((2, 8, 8), int)), "one 2-D plane"),
    (lambda: M.measure_plane(np.zeros((8, 8), int), np.zeros((8, 9))), "the labels' size"),
    (lambda: M.measure_plane(-np.ones((8, 8), int)), "negative"),
    (lambda: M.measure_plane(np.ones((8, 8), int), pixel_size=(0.5, 0.5)), "without its unit"),
    (lambda: M.measure_plane(np.ones((8, 8), int), pixel_size=(0, 1), unit="um"), "positive"),
    (lambda: M.measure_plane(np.ones((8, 8), int), np.ones((2, 8, 8)), channel_names=["a"]),
     "one name per channel"),
])
def test_bad_inputs_are_one_sentence(call, words):
    with pytest.raises(CellfitError) as err:
        call()
    msg = str(err.value)
    assert words in msg and msg.endswith(".") and "\n" not in msg


# ----------------------------------------------------------------------- streaming
def test_a_stack_is_measured_one_plane_at_a_time(monkeypatch):
    """measure_stack pulls the next plane only once the one before is measured, so it
    never holds two planes; the rows carry their plane."""
    measured = []
    real = M.measure_plane

    def spy(labels, image=None, **kw):
        measured.append(kw["plane"])
        return real(labels, image, **kw)

    monkeypatch.setattr(M, "measure_plane", spy)
    labels, image = scene_two_cells()

    def planes():
        for p in range(5):
            assert len(measured) == p  # plane p - 1 was measured before plane p exists
            yield np.where(labels == 7, 0, labels) if p == 2 else labels

    def images():
        for p in range(5):
            assert len(measured) == p
            yield image + p

    t = M.measure_stack(planes(), images())
    assert measured == [0, 1, 2, 3, 4]
    assert t["plane"].tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4]
    assert t["mean_intensity_c1"][t["plane"] == 4][1] == pytest.approx(1004)


def test_the_measurer_refuses_planes_of_other_channels():
    labels, image = scene_two_cells()
    m = M.Measurer()
    m.add(labels, image)
    with pytest.raises(CellfitError, match="channel"):
        m.add(labels, image[:1])


# ------------------------------------------------------------------------ CSV files
def test_a_table_round_trips_through_csv(tmp_path):
    labels, image = scene_two_cells()
    m = M.Measurer(pixel_size=M.PixelSize(0.5, 0.5, "micron"))
    m.add(labels, image)
    m.add(np.zeros_like(labels), image)
    m.add(labels[:, ::-1].copy(), image)
    table = m.table()
    path = M.write_table(tmp_path / "a_cells.csv", table)
    back = M.read_table(path)
    assert list(back) == list(table)
    for k in table:
        assert back[k].dtype == table[k].dtype, k
        np.testing.assert_allclose(back[k], table[k], rtol=1e-9)
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:3] == ["id", "plane", "centroid_y"] and len(rows) == 1 + 4
    assert rows[1][rows[0].index("touches_edge")] in ("true", "false")


@pytest.mark.parametrize(("text", "why"), [
    ("name,score\na,1\n", "no column"),
    ("", "empty"),
    (",".join(M.COLUMNS) + "\n1,0,1,1,five,1,0,1,true\n", "not a number"),
    (",".join(M.COLUMNS) + "\n1,0,1,1,5,1,0,1,maybe\n", "not true or false"),
    (",".join(M.COLUMNS) + "\n1,0,1,1,5.5,1,0,1,true\n", "not a whole number"),
    (",".join(M.COLUMNS) + "\n1,0,1\n", "fields for"),
])
def test_a_foreign_csv_is_refused_in_one_sentence(tmp_path, text, why):
    path = tmp_path / "x.csv"
    path.write_text(text)
    with pytest.raises(CellfitError) as err:
        M.read_table(path)
    msg = str(err.value)
    assert "is not a cellfit measurements table" in msg and why in msg and "\n" not in msg
    with pytest.raises(CellfitError, match="does not exist"):
        M.read_table(tmp_path / "missing.csv")


def test_a_table_is_written_atomically(tmp_path, monkeypatch):
    """The disk fills up halfway through a table that replaces an older one: one
    sentence, the older table kept byte for byte, no temporary left."""
    out = tmp_path / "out"
    out.mkdir()
    labels, image = scene_two_cells()
    big = M.measure_stack(np.stack([labels] * 400), np.stack([image] * 400))
    old = M.write_table(out / "f_cells.csv", M.measure_plane(labels, image)).read_bytes()
    with monkeypatch.context() as m:
        disk = fill_disk_under(m, out, room=3000)
        with pytest.raises(CellfitError) as err:
            M.write_table(out / "f_cells.csv", big)
    assert disk["failures"] >= 1
    assert str(err.value) == (f"could not write {out / 'f_cells.csv'} (No space left on device): "
                              "check the free space and permissions of the output folder.")
    assert sorted(p.name for p in out.iterdir()) == ["f_cells.csv"]
    assert (out / "f_cells.csv").read_bytes() == old
    # an interrupted write (Ctrl-C) leaves no temporary either
    with monkeypatch.context() as m:
        m.setattr(M, "_text", lambda v: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            M.write_table(out / "f_cells.csv", big)
    assert sorted(p.name for p in out.iterdir()) == ["f_cells.csv"]
    assert (out / "f_cells.csv").read_bytes() == old


# ---------------------------------------------------------------------- calibration
def test_the_pixel_size_a_tiff_carries(tmp_path):
    img = np.zeros((16, 16), np.uint8)
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, img, imagej=True, resolution=(1 / 0.65, 1 / 0.5),
                     metadata={"unit": "micron"})
    assert M.pixel_size_of(ij) == pytest.approx(M.PixelSize(0.5, 0.65, "um"))
    assert M.pixel_size_of(ij).unit == "um"
    cm = tmp_path / "cm.tif"  # 20000 pixels per centimetre: 0.5 um
    tifffile.imwrite(cm, img, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    assert M.pixel_size_of(cm)[:2] == pytest.approx((0.5, 0.5)) and M.pixel_size_of(cm).unit == "um"
    ome = tmp_path / "o.ome.tif"
    tifffile.imwrite(ome, img, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.3,
                                                   "PhysicalSizeY": 0.4})
    assert M.pixel_size_of(ome) == pytest.approx(M.PixelSize(0.4, 0.3, "um"))
    # a screen's 72 dpi, a resolution without a unit, or none: no calibration
    dpi = tmp_path / "dpi.tif"
    tifffile.imwrite(dpi, img, resolution=(72, 72), resolutionunit="INCH")
    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, img)
    nounit = tmp_path / "nounit.tif"
    tifffile.imwrite(nounit, img, resolution=(3, 3), resolutionunit="NONE")
    assert M.pixel_size_of(dpi) is None and M.pixel_size_of(bare) is None
    assert M.pixel_size_of(nounit) is None
    assert M.pixel_size_of(ImageMeta(resolution=((2, 1), (4, 1)), is_imagej=True,
                                     imagej={"unit": "nm"})) == (0.25, 0.5, "nm")
    with pytest.raises(CellfitError, match="does not exist"):
        M.pixel_size_of(tmp_path / "missing.tif")


# ------------------------------------------------------------------------- the flags
def summary(**kw) -> M.FileSummary:
    base = {"file": "a.tif", "planes": 1, "pixels": 512 * 512, "cells": 100,
            "median_area_px": 314.0, "median_diameter_px": 20.0, "median_intensity": 50.0,
            "cell_fraction": 0.2, "intensity": np.array([[10.0, 210.0]])}
    return M.FileSummary(**{**base, **kw})


EXPECTED = M.Expected(diameter=20.0, low=[(8.0, 12.0)], high=[(180.0, 250.0)],
                      contrast=[(170.0, 240.0)])


def kinds(flags) -> list[str]:
    return [f.kind for f in flags]


def test_an_ordinary_result_has_no_flag():
    assert M.quality_flags(summary(), EXPECTED, typical_density=100 / 512**2) == []
    # a little off in every way is still ordinary
    s = summary(median_diameter_px=24.0, cells=150, cell_fraction=0.4,
                intensity=np.array([[5.0, 400.0]]))
    assert M.quality_flags(s, EXPECTED, typical_density=100 / 512**2) == []


@pytest.mark.parametrize(("change", "kind", "words"), [
    ({"median_diameter_px": 60.0}, "size", "3.0 times larger than the model expects"),
    ({"median_diameter_px": 5.0}, "size", "4.0 times smaller"),
    ({"intensity": np.array([[100.0, 12100.0]])}, "intensity",
     "its intensities span 50 times more than the training images' (100-12100 against 8-250)"),
    ({"intensity": np.array([[10.0, 20.0]])}, "intensity",
     "its intensities span 17 times less than the training images' (10-20 against 8-250)"),
    ({"cells": 10}, "few_cells", "only 10 cells"),
    ({"cells": 1000}, "many_cells", "1000 cells, far more"),
    ({"cells": 0, "median_diameter_px": math.nan, "cell_fraction": 0.0}, "no_cells",
     "no cells were found"),
    ({"cell_fraction": 0.95}, "coverage", "cells cover 95% of the image"),
])
def test_an_unusual_result_is_flagged_in_plain_words(change, kind, words):
    flags = M.quality_flags(summary(**change), EXPECTED, typical_density=100 / 512**2)
    assert kinds(flags) == [kind], flags
    assert words in flags[0].text
    assert "\n" not in flags[0].text and flags[0].severity >= 1


def test_checks_that_cannot_be_made_are_left_out():
    s = summary(median_diameter_px=60.0, intensity=np.array([[10.0, 20.0]]), cells=1000)
    # a model that records nothing (an older model), and no other files to compare with
    assert M.quality_flags(s, M.Expected(), typical_density=None) == []
    # images of other channels than the training images: no intensity comparison
    s3 = summary(intensity=np.array([[10.0, 20.0]] * 3))
    assert M.quality_flags(s3, EXPECTED) == []
    assert M.quality_flags(summary(error="not segmented: corrupt"), EXPECTED) == []


def test_the_most_suspicious_files_come_first():
    files = [summary(file=f"{i}.tif") for i in range(5)]
    files[1] = summary(file="1.tif", median_diameter_px=45.0)  # 2.25 times the model's
    files[3] = summary(file="3.tif", median_diameter_px=90.0, cell_fraction=0.9)
    flagged = M.rank_flagged(files, EXPECTED)
    assert [s.file for s in flagged] == ["3.tif", "1.tif"]
    assert kinds(flagged[0].flags) == ["size", "coverage"]
    assert M.flagged_first(files) == flagged
    table = M.summary_table(files)
    assert list(table) == list(M.SUMMARY_COLUMNS)
    assert table["flags"][0] == "" and table["flags"][3].startswith("cells are 4.5 times larger")


def test_what_a_model_expects():
    rec = M.intensity_record([np.array([[10.0, 200.0]]), np.array([[5.0, 300.0]])])
    assert rec["low"] == [[5.0, 10.0]] and rec["high"] == [[200.0, 300.0]]
    assert rec["contrast"] == [[190.0, 295.0]]
    info = ModelInfo(diameter=18.0, training=[{"intensity": rec}])
    exp = M.expected_from_model(info)
    assert exp.diameter == 18.0 and exp.contrast == [(190.0, 295.0)]
    assert M.expected_from_model(info, diameter=30.0).diameter == 30.0
    # an older model: the annotated cells' size, no intensities
    old = ModelInfo(training=[{"annotation": {"median_cell_diameter": 22.5}}])
    assert M.expected_from_model(old) == M.Expected(diameter=22.5)
    # the starting model, not told the size: nothing to compare with
    start = ModelInfo(cell_diameter=30.0, training=[{"annotation": {"median_cell_diameter": 40}}])
    assert M.expected_from_model(start).diameter is None
    assert M.intensity_record([np.zeros((1, 2)), np.zeros((3, 2))]) is None


def test_training_records_the_intensities_of_its_images(tmp_path):
    from _nets import FakeNetTrainer
    from cellfit.synthetic import sparse_annotation
    from cellfit.train import TrainConfig

    img, lab = synthetic_cells((64, 64), n_cells=6, seed=4)
    img2 = (img.astype(np.float64) * 3).astype(np.uint16)
    anns = [sparse_annotation(lab, 0.8, seed=1)] * 2
    t = FakeNetTrainer([img, img2], anns, TrainConfig(
        steps=2, patch_size=32, batch_size=2, device="cpu", val_every=2, warmup_steps=1))
    list(t.run())
    rec = t.info.training[-1]["intensity"]
    lo, hi = np.percentile(img, M.INTENSITY_PERCENTILES)
    lo2, hi2 = np.percentile(img2, M.INTENSITY_PERCENTILES)
    assert rec["contrast"][0] == pytest.approx([hi - lo, hi2 - lo2], rel=1e-5)
    path = save_model(tmp_path / "m.cellfit", build_model(t.info), t.info)
    assert M.expected_from_model(read_model_info(path)).contrast == [
        tuple(rec["contrast"][0])]


# ------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    return save_model(tmp_path_factory.mktemp("model") / "tiny.cellfit", build_model(info), info)


def grid_labels(shape) -> np.ndarray:
    """Square 8 x 8 cells on a 16-pixel grid: 12 cells in 48 x 64."""
    lab = np.zeros(shape, np.int32)
    k = 1
    for y in range(4, shape[0] - 8, 16):
        for x in range(4, shape[1] - 8, 16):
            lab[y : y + 8, x : x + 8] = k
            k += 1
    return lab


@pytest.fixture
def planned_labels(monkeypatch):
    """The labels the model gives: grid cells, but every plane of a file named in
    ``whole`` is one cell covering it (the background taken for a cell)."""
    whole: set[str] = set()
    current: dict[str, str] = {}
    real_run = fpred.run_file

    def run_file(model, path, *a, **kw):
        current["name"] = Path(path).name
        return (yield from real_run(model, path, *a, **kw))

    def labels(self, probs, image=None):
        shape = probs.shape[1:]
        if current.get("name") in whole:
            return np.ones(shape, np.int32)
        return grid_labels(shape)

    monkeypatch.setattr(fpred.LoadedModel, "labels", labels)
    monkeypatch.setattr(cbatch, "run_file", run_file)
    return whole


def make_inputs(folder: Path, names=("f0", "f1", "f2", "f3"), planes: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, n in enumerate(names):
        imgs = [synthetic_cells((48, 64), n_cells=4, seed=10 * i + k)[0] for k in range(planes)]
        p = folder / f"{n}.tif"
        tifffile.imwrite(p, imgs[0] if planes == 1 else np.stack(imgs), photometric="minisblack")
        out.append(p)
    return out


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_predict_measure_end_to_end(tmp_path, model_file, capsys, planned_labels):
    inputs = make_inputs(tmp_path / "in")
    planned_labels.add("f3.tif")
    out = tmp_path / "out"
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out, "--measure",
                    "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"f{i}_labels.tif" for i in range(4)] + [f"f{i}_cells.csv" for i in range(4)]
        + ["summary.csv"])
    for f in inputs:  # each table: the cells of the labels written beside it
        labels = tifffile.imread(out / f"{f.stem}_labels.tif")
        want = M.measure_plane(labels, tifffile.imread(f))
        got = M.read_table(out / f"{f.stem}_cells.csv")
        assert list(got) == list(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-9)
    assert len(M.read_table(out / "f0_cells.csv")["id"]) == 12
    rows = read_csv(out / "summary.csv")
    assert [r["file"] for r in rows] == ["f0.tif", "f1.tif", "f2.tif", "f3.tif"]
    assert [r["cells"] for r in rows] == ["12", "12", "12", "1"]
    assert rows[0]["median_area_px"] == "64" and rows[0]["flags"] == ""
    assert float(rows[0]["median_intensity"]) == pytest.approx(
        np.median(M.read_table(out / "f0_cells.csv")["mean_intensity_c0"]))
    assert "cells cover 100% of the image" in rows[3]["flags"]
    assert "only 1 cell, far fewer than in the other files" in rows[3]["flags"]
    # the report after the run: where the tables are, the flagged file
    assert f"Measurements: {out / '<name>_cells.csv'} per file, {out / 'summary.csv'}" in err
    report = err[err.index("Quality: "):].splitlines()
    assert report[:1] == ["Quality: 1 file(s) to check first:"]
    assert report[1].startswith("  f3.tif: only 1 cell") and "cells cover 100%" in report[1]
    assert "Traceback" not in err


def test_a_rerun_skips_finished_files_and_still_reports_them(
        tmp_path, model_file, capsys, planned_labels, monkeypatch):
    make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    # a first run without --measure; then --measure measures the labels, predicts nothing
    code, _ = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out, "--device", "cpu")
    assert code == 0 and not list(out.glob("*.csv"))
    labels_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_labels.tif")}
    predicted = []
    real_run = cbatch.run_file
    monkeypatch.setattr(cbatch, "run_file",
                        lambda m, path, *a, **k: predicted.append(path) or real_run(m, path, *a, **k))
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out, "--measure",
                    "--device", "cpu")
    assert code == 0, err
    assert predicted == []
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_labels.tif")} == labels_before
    assert "4 skipped" in err and "measured the existing labels into f0_cells.csv" in err
    first = read_csv(out / "summary.csv")
    assert [r["cells"] for r in first] == ["12"] * 4
    tables = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("*_cells.csv")}
    # again: nothing predicted, nothing measured, the same summary
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out, "--measure",
                    "--device", "cpu")
    assert code == 0 and predicted == [] and "measured the existing" not in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in out.glob("*_cells.csv")} == tables
    assert read_csv(out / "summary.csv") == first
    # a table that went missing is measured again, from the labels
    (out / "f1_cells.csv").unlink()
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out, "--measure",
                    "--device", "cpu")
    assert code == 0 and predicted == []
    assert (out / "f1_cells.csv").read_bytes() == tables["f1_cells.csv"][0]
    # labels redone without --measure make their old table outdated: measured again
    code, _ = cli(capsys, "predict", model_file, tmp_path / "in" / "f2.tif", "--out", out,
                  "--device", "cpu", "--overwrite")
    assert code == 0 and len(predicted) == 1
    planned_labels.add("f2.tif")  # (what the labels now hold does not matter: the table follows)
    stale = (out / "f2_cells.csv").stat().st_mtime_ns
    code, err = cli(capsys, "predict", model_file, tmp_path / "in", "--out", out, "--measure",
                    "--device", "cpu")
    assert code == 0 and len(predicted) == 1
    assert (out / "f2_cells.csv").stat().st_mtime_ns > stale
    assert "measured the existing labels into f2_cells.csv" in err


def test_zarr_labels_are_measured_too(tmp_path, model_file, planned_labels):
    pytest.importorskip("zarr")
    make_inputs(tmp_path / "in", names=("a",), planes=3)
    out = tmp_path / "out"
    list(cbatch.predict_files(model_file, [tmp_path / "in"], out, device="cpu", measure=True,
                              format="zarr"))
    first = (out / "a_cells.csv").read_bytes()
    assert len(M.read_table(out / "a_cells.csv")["id"]) == 36
    (out / "a_cells.csv").unlink()
    events = list(cbatch.predict_files(model_file, [tmp_path / "in"], out, device="cpu",
                                       measure=True, format="zarr"))
    assert [ev.status for ev in events] == ["skipped"]
    assert (out / "a_cells.csv").read_bytes() == first


def test_a_stack_is_measured_plane_by_plane_with_its_calibration(
        tmp_path, model_file, planned_labels, monkeypatch):
    """A 5-plane calibrated ImageJ stack: the measurer gets one 2-D plane at a time,
    in order, with that plane's pixels; the table has micrometre columns."""
    folder = tmp_path / "in"
    folder.mkdir()
    stack = np.stack([synthetic_cells((48, 64), n_cells=4, seed=k)[0] for k in range(5)])
    tifffile.imwrite(folder / "s.tif", stack, imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "unit": "um"})
    seen = []
    real_add = M.Measurer.add

    def add(self, labels, image=None, plane=None):
        seen.append((plane, labels.shape, None if image is None else image.shape))
        assert image is not None and np.array_equal(image[0], stack[plane])
        return real_add(self, labels, image, plane)

    monkeypatch.setattr(M.Measurer, "add", add)
    events = list(cbatch.predict_files(model_file, [folder], tmp_path / "out", device="cpu",
                                       measure=True))
    assert [p for p, _, _ in seen] == [0, 1, 2, 3, 4]
    assert all(lab == (48, 64) and img == (1, 48, 64) for _, lab, img in seen)
    t = M.read_table(tmp_path / "out" / "s_cells.csv")
    assert t["plane"].tolist() == [p for p in range(5) for _ in range(12)]
    assert t["area_um2"].tolist() == pytest.approx([64 * 0.25] * 60)
    done = [ev for ev in events if ev.status == "done"]
    assert done[0].summary.cells == 60 and done[0].summary.planes == 5


def test_measure_needs_an_instance_model(tmp_path, capsys):
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5, mode="semantic",
                     n_classes=2, class_names=["background", "class 1"])
    model = save_model(tmp_path / "sem.cellfit", build_model(info), info)
    make_inputs(tmp_path / "in", names=("a",))
    code, err = cli(capsys, "predict", model, tmp_path / "in", "--out", tmp_path / "out",
                    "--measure", "--device", "cpu")
    assert code == 2 and "no cells to measure" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------- the diameter note (two bugs)
@pytest.fixture
def any_size_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5, cell_diameter=30.0)
    return save_model(tmp_path_factory.mktemp("m") / "any.cellfit", build_model(info), info)


@pytest.fixture
def estimates(monkeypatch) -> list[str]:
    """The files the diameter is estimated from (always 25 pixels)."""
    calls: list = []

    def estimate(model, info, plane, device=None):
        calls.append(plane.shape)
        return 25.0

    monkeypatch.setattr(cbatch, "estimate_diameter", estimate)
    return calls


def test_the_diameter_note_names_the_file_it_came_from(tmp_path, any_size_model, capsys,
                                                        estimates):
    """Bug: "corrupt.tif: cell diameter estimated ... from good.tif": the note went to
    the first event of the batch, whichever file it was."""
    folder = tmp_path / "in"
    make_inputs(folder, names=("good",))
    (folder / "corrupt.tif").write_bytes(b"II*\x00" + bytes(100))
    code, err = cli(capsys, "predict", any_size_model, folder, "--out", tmp_path / "out",
                    "--device", "cpu")
    assert code == 1 and len(estimates) == 1
    notes = [line for line in err.splitlines() if "cell diameter estimated" in line]
    assert notes == ["cellfit: note: good.tif: cell diameter estimated at 25 pixels from "
                     "good.tif; to choose it yourself, set --diameter"], err
    assert not any(line.startswith("cellfit: note: corrupt.tif") for line in err.splitlines())


def test_no_diameter_is_estimated_when_every_output_exists(tmp_path, any_size_model, capsys,
                                                           estimates, monkeypatch):
    """Bug: every file was skipped, yet the model was loaded and run to estimate a
    diameter nothing used."""
    make_inputs(tmp_path / "in", names=("a", "b"))
    out = tmp_path / "out"
    code, _ = cli(capsys, "predict", any_size_model, tmp_path / "in", "--out", out,
                  "--device", "cpu")
    assert code == 0 and len(estimates) == 1
    loads = []
    with monkeypatch.context() as m:
        m.setattr(cbatch, "LoadedModel", lambda *a, **k: loads.append(a))
        code, err = cli(capsys, "predict", any_size_model, tmp_path / "in", "--out", out,
                        "--device", "cpu", "--measure")
    assert code == 0, err
    assert len(estimates) == 1 and loads == []
    assert "2 skipped" in err and "cell diameter estimated" not in err
    assert sorted(p.name for p in out.glob("*.csv")) == ["a_cells.csv", "b_cells.csv",
                                                        "summary.csv"]
    # one file more: the diameter is estimated again, as before from the first file,
    # so the finished files stay finished
    c = make_inputs(tmp_path / "new", names=("c",))[0]
    os.replace(c, tmp_path / "in" / "c.tif")
    code, err = cli(capsys, "predict", any_size_model, tmp_path / "in", "--out", out,
                    "--device", "cpu")
    assert code == 0 and len(estimates) == 2
    assert "note: a.tif: cell diameter estimated at 25 pixels from a.tif" in err
    assert "2 skipped" in err


# ------------------------------------------------------------------------- the demo
def test_the_area_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from cellfit.demo import area_plot_png

    png = area_plot_png(tmp_path / "areas.png", np.array([50, 60, 70.0]), np.array([55, 65.0]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["areas.png"]
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # not installed
    assert area_plot_png(tmp_path / "b.png", np.array([1.0])) is None
    assert not (tmp_path / "b.png").exists()


@pytest.mark.slow
def test_the_cluster_path_measures_too(tmp_path, model_file, planned_labels):
    """``--scheduler``: the workers measure as they write (whole files, and long stacks
    split into runs of slices); the tables and the summary equal a local run's."""
    distributed = pytest.importorskip("distributed")
    folder = tmp_path / "in"
    make_inputs(folder, names=("a",))
    stack = np.stack([synthetic_cells((48, 64), n_cells=4, seed=k)[0] for k in range(5)])
    tifffile.imwrite(folder / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    local = list(cbatch.predict_files(model_file, [folder], tmp_path / "local", device="cpu",
                                      measure=True))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        dist = list(cbatch.predict_files(model_file, [folder], tmp_path / "dist", device="cpu",
                                         measure=True, scheduler=cluster.scheduler_address,
                                         slices_per_task=2))
    assert {ev.path.name for ev in dist if ev.status == "done"} == {"a.tif", "stack.tif"}
    for name in ("a_cells.csv", "stack_cells.csv", "summary.csv"):
        assert (tmp_path / "dist" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert len(M.read_table(tmp_path / "dist" / "stack_cells.csv")["id"]) == 60
    assert [ev.summary.cells for ev in local if ev.summary] == [12, 60]
