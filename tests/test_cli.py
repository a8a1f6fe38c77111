"""The command line end to end, and one clear sentence for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from _faults import deny_writes_under, fill_disk_under
from cellfit.cli import main
from cellfit.model import ModelInfo, build_model, read_model_info, save_model
from cellfit.synthetic import sparse_annotation, synthetic_cells

SHAPE = (96, 96)


# ----------------------------------------------------------------- helpers
def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> str:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    line = lines[0]
    assert line.startswith("cellfit: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert "Traceback" not in out + err
    assert "internal error" not in line
    return line


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_pair(folder: Path, name: str, image: np.ndarray, labels: np.ndarray, **kw) -> None:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "lab").mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "img" / name, image, **kw)
    tifffile.imwrite(folder / "lab" / name, labels)


@pytest.fixture
def data(tmp_path):
    """img/a.tif (2D, uint16), lab/a.tif (sparse annotation), truth/a.tif (all cells)."""
    image, labels = synthetic_cells(SHAPE, n_cells=8, seed=1)
    ann = sparse_annotation(labels, fraction=0.8, seed=0)
    write_pair(tmp_path, "a.tif", image, ann)
    (tmp_path / "truth").mkdir()
    tifffile.imwrite(tmp_path / "truth" / "a.tif", labels.astype(np.uint16))
    return tmp_path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained, tiny grayscale instance model (fast to build and run)."""
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16, 16, 16, 16, 16])
    path = tmp_path_factory.mktemp("model") / "tiny.cellfit"
    return save_model(path, build_model(info), info)


def _train_args(folder: Path, *extra) -> list:
    return [
        "train",
        folder / "img",
        "--labels",
        folder / "lab",
        "--out",
        folder / "m.cellfit",
        "--steps",
        "3",
        "--patch-size",
        "64",
        "--batch-size",
        "2",
        "--val-every",
        "100",
        "--device",
        "cpu",
        *extra,
    ]


# ------------------------------------------------------------ end to end
@pytest.mark.slow
def test_train_predict_evaluate_info_2d(data, capsys):
    code, _, err = run(capsys, *_train_args(data))
    assert code == 0, err
    assert "Traceback" not in err
    model = data / "m.cellfit"
    assert model.is_file()
    assert f"Saved model to {model}" in err
    info = read_model_info(model)
    # fine-tuned from the starting model by default (grayscale into its RGB input)
    assert info.mode == "instances" and info.in_channels == 3 and info.n_classes == 3
    assert "fine-tuning cellfit's starting model" in err
    rec = info.training[-1]
    assert rec["init"] == "cellfit starting model"
    assert info.diameter == rec["annotation"]["median_cell_diameter"]
    assert rec["steps"] == 3 and rec["patch_size"] == 64 and rec["batch_size"] == 2
    assert rec["annotation"]["cells"] == len(
        np.setdiff1d(np.unique(tifffile.imread(data / "lab" / "a.tif")), [0, 1])
    )

    out_dir = data / "pred"
    code, _, err = run(
        capsys,
        "predict",
        model,
        data / "img",
        "--out",
        out_dir,
        "--probabilities",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "1 file(s) segmented" in err
    labels = tifffile.imread(out_dir / "a_labels.tif")
    probs = tifffile.imread(out_dir / "a_prob.tif")
    assert labels.shape == SHAPE and labels.dtype in (np.uint8, np.uint16, np.uint32)
    assert probs.shape == (3, *SHAPE) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert sorted(p.name for p in out_dir.iterdir()) == ["a_labels.tif", "a_prob.tif"]

    code, out, err = run(capsys, "evaluate", out_dir, data / "truth")
    assert code == 0, err
    assert out.splitlines()[0].split()[:3] == ["image", "AP@0.5", "F1@0.5"]
    assert "a.tif" in out and "all (pooled)" in out

    code, out, err = run(capsys, "evaluate", out_dir, data / "truth", "--json")
    assert code == 0, err
    result = json.loads(out)
    n_true = len(np.setdiff1d(np.unique(tifffile.imread(data / "truth" / "a.tif")), [0]))
    assert result["images"][0]["n_true"] == n_true
    assert result["images"][0]["n_pred"] == labels.max()
    for key in ("ap50", "f1_50", "precision_50", "recall_50", "ap50_95"):
        assert 0.0 <= result["total"][key] <= 1.0

    code, out, err = run(capsys, "info", model)
    assert code == 0, err
    assert "mobilenet_v2" in out and "instances" in out and "3 steps" in out
    # round painted cells: the model cuts merged pairs, and says so
    assert info.postprocess["split_area"] > 0 and "cut in two" in out
    code, out, err = run(capsys, "info", model, "--json")
    assert code == 0
    assert json.loads(out)["training"][-1]["steps"] == 3

    # fine-tune the same model in place (no --overwrite needed for --init == --out)
    args = _train_args(data, "--init", model)
    args[args.index("--steps") + 1] = "2"
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert f"fine-tuning {model}" in err
    runs = read_model_info(model).training
    assert [r["steps"] for r in runs[-2:]] == [3, 2] and runs[-1]["init"] == str(model)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rgb", "stack"])
def test_train_and_predict_rgb_and_3d_stack(tmp_path, capsys, kind):
    image, labels = synthetic_cells((64, 72), n_cells=6, seed=2, dtype=np.uint8)
    ann = sparse_annotation(labels, fraction=1.0, seed=0)
    if kind == "rgb":
        img = np.stack([image, image // 2, 255 - image], axis=-1)  # (Y, X, 3)
        lab = ann
        expect_labels, expect_probs, channels = (64, 72), (3, 64, 72), 3
        photometric = "rgb"
    else:
        img = np.stack([image, np.roll(image, 5, axis=1), image[::-1]])  # (Z, Y, X)
        lab = np.stack([ann, np.zeros_like(ann), np.zeros_like(ann)])  # one annotated slice
        expect_labels, expect_probs, channels = (3, 64, 72), (3, 3, 64, 72), 1
        photometric = "minisblack"  # three slices, not the planes of an RGB image
    write_pair(tmp_path, "x.tif", img, lab, photometric=photometric)
    args = [*_train_args(tmp_path), "--init", "scratch"]  # a model of the data's channels
    args[args.index("--steps") + 1] = "2"
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert "1 annotated plane(s)" in err
    assert read_model_info(tmp_path / "m.cellfit").in_channels == channels
    code, _, err = run(
        capsys,
        "predict",
        tmp_path / "m.cellfit",
        tmp_path / "img" / "x.tif",
        "--out",
        tmp_path / "out",
        "--probabilities",
    )
    assert code == 0, err
    labels_out = tifffile.imread(tmp_path / "out" / "x_labels.tif")
    probs_out = tifffile.imread(tmp_path / "out" / "x_prob.tif")
    assert labels_out.shape == expect_labels and np.issubdtype(labels_out.dtype, np.unsignedinteger)
    assert probs_out.shape == expect_probs and probs_out.dtype == np.float32


@pytest.mark.slow  # six U-Net passes: a few seconds, more on a busy machine
def test_predict_2d_rgb_and_stack_with_a_grayscale_model(tmp_path, capsys, model_file):
    image, _ = synthetic_cells((50, 70), n_cells=4, seed=3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "flat.tif", image)
    tifffile.imwrite(inputs / "rgb.tif", np.stack([image] * 3, axis=-1), photometric="rgb")
    stack = np.stack([image, image[::-1], image[:, ::-1], image])
    tifffile.imwrite(inputs / "stack.tif", stack, photometric="minisblack")
    before = snapshot(inputs)
    code, _, err = run(
        capsys,
        "predict",
        model_file,
        inputs,
        "--out",
        tmp_path / "out",
        "--probabilities",
    )
    assert code == 0, err
    assert "3 file(s) segmented" in err
    out = tmp_path / "out"
    expected = {
        "flat": ((50, 70), (3, 50, 70)),
        "rgb": ((50, 70), (3, 50, 70)),
        "stack": ((4, 50, 70), (4, 3, 50, 70)),
    }
    for stem, (lshape, pshape) in expected.items():
        lab = tifffile.imread(out / f"{stem}_labels.tif")
        prob = tifffile.imread(out / f"{stem}_prob.tif")
        assert lab.shape == lshape and np.issubdtype(lab.dtype, np.unsignedinteger), stem
        assert prob.shape == pshape and prob.dtype == np.float32, stem
    assert len(list(out.iterdir())) == 6
    assert snapshot(inputs) == before  # inputs untouched


def test_predict_without_probabilities_and_skip_existing(tmp_path, capsys, model_file):
    image, _ = synthetic_cells((40, 40), n_cells=3, seed=4)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", image)
    out = tmp_path / "out"
    code, _, err = run(capsys, "predict", model_file, tmp_path / "in", "--out", out)
    assert code == 0, err
    assert [p.name for p in out.iterdir()] == ["a_labels.tif"]
    first = snapshot(out)
    code, _, err = run(
        capsys, "predict", model_file, tmp_path / "in", "--out", out, "--skip-existing"
    )
    assert code == 0 and "1 skipped" in err
    assert snapshot(out) == first


def test_predict_tta_reaches_the_tile_runner_and_redoes_outputs_made_without(
    tmp_path, capsys, model_file, monkeypatch
):
    import cellfit.batch as cbatch
    from cellfit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = sub.choices["predict"].format_help()
    assert "--tta" in help_text and "flipped and rotated copies" in help_text

    made = []
    real = cbatch.LoadedModel

    def spy(path, settings):
        loaded = real(path, settings)
        made.append((settings.tta, loaded.runner.tta))
        return loaded

    monkeypatch.setattr(cbatch, "LoadedModel", spy)
    image, _ = synthetic_cells((40, 40), n_cells=3, seed=4)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", image)
    out = tmp_path / "out"
    args = ["predict", model_file, tmp_path / "in", "--out", out, "--probabilities",
            "--device", "cpu"]
    code, _, err = run(capsys, *args)
    assert code == 0 and "1 file(s) segmented" in err, err
    assert made == [(False, False)]
    plain = tifffile.imread(out / "a_prob.tif")
    # --tta: outputs made without it are redone, with it
    code, _, err = run(capsys, *args, "--tta")
    assert code == 0 and "1 file(s) segmented" in err and "skipped" not in err, err
    assert made[-1] == (True, True)
    tta = tifffile.imread(out / "a_prob.tif")
    assert tta.shape == plain.shape and not np.allclose(tta, plain, atol=1e-4)
    # and a rerun with it skips them
    code, _, err = run(capsys, *args, "--tta")
    assert code == 0 and "1 skipped" in err, err


def test_evaluate_hand_made_predictions(tmp_path, capsys):
    _, truth = synthetic_cells((64, 64), n_cells=6, seed=5)
    n = int(truth.max())
    pred = truth.copy()
    pred[pred == n] = 0  # one cell missed, the others exact
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "truth" / "c.tif", truth.astype(np.uint16))
    tifffile.imwrite(tmp_path / "pred" / "c_labels.tif", pred.astype(np.uint16))
    code, out, err = run(capsys, "evaluate", tmp_path / "pred", tmp_path / "truth", "--json")
    assert code == 0, err
    res = json.loads(out)
    row = res["images"][0]
    assert (row["image"], row["prediction"]) == ("c.tif", "c_labels.tif")
    assert (row["n_true"], row["n_pred"]) == (n, n - 1)
    assert res["total"]["ap50"] == pytest.approx((n - 1) / n)
    assert res["total"]["recall_50"] == pytest.approx((n - 1) / n)
    assert res["total"]["precision_50"] == 1.0
    assert res["total"]["ap50_95"] == pytest.approx((n - 1) / n)
    assert row["pixel_f1"] < 1.0
    assert res["total"]["per_threshold"]["0.5"]["fn"] == 1
    code, out, _ = run(capsys, "evaluate", tmp_path / "pred", tmp_path / "truth")
    assert code == 0
    assert f"{(n - 1) / n:.3f}" in out


def test_evaluate_semantic(tmp_path, capsys):
    truth = np.array([[1, 1, 2, 2], [1, 3, 3, 2]], np.uint8)
    pred = np.array([[1, 2, 2, 2], [1, 3, 3, 3]], np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", truth)
    tifffile.imwrite(tmp_path / "p.tif", pred)
    code, out, err = run(
        capsys, "evaluate", tmp_path / "p.tif", tmp_path / "t.tif", "--semantic", "--json"
    )
    assert code == 0, err
    pix = json.loads(out)["pixel"]
    # class 2 (value 2): TP 2, FP 1, FN 1
    assert pix["class 2"]["precision"] == pytest.approx(2 / 3)
    assert pix["class 2"]["recall"] == pytest.approx(2 / 3)
    assert pix["class 3"]["recall"] == 1.0 and pix["class 3"]["precision"] == pytest.approx(2 / 3)


def test_info_and_devices(capsys, model_file):
    code, out, _ = run(capsys, "info", model_file)
    assert code == 0
    assert "U-Net++ / mobilenet_v2, 1 channel(s) in" in out
    assert "instances: background, cell, boundary" in out
    code, out, _ = run(capsys, "devices")
    assert code == 0 and "cellfit will use:" in out


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "train" in out and "predict" in out


# --------------------------------------------------------- bad inputs: train
def _bad_train_case(folder: Path, case: str) -> tuple[list, tuple[str, ...]]:
    """Set up one bad input under ``folder``; return the CLI args and expected fragments."""
    image, labels = synthetic_cells(SHAPE, n_cells=6, seed=1)
    ann = sparse_annotation(labels, fraction=0.8, seed=0)
    write_pair(folder, "a.tif", image, ann)
    img, lab = folder / "img" / "a.tif", folder / "lab" / "a.tif"
    out = folder / "m.cellfit"
    common = ["--out", out, "--steps", "2", "--patch-size", "64", "--device", "cpu"]
    if case == "missing image":
        return ["train", folder / "img" / "nope.tif", "--labels", lab, *common], (
            "nope.tif",
            "does not exist",
        )
    if case == "missing labels":
        return ["train", img, "--labels", folder / "nope.tif", *common], (
            "nope.tif",
            "does not exist",
        )
    if case == "png image":
        png = folder / "img" / "a.png"
        png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
        return ["train", png, "--labels", lab, *common], ("a.png", "is not a TIFF file")
    if case == "text renamed tif":
        fake = folder / "img" / "notes.tif"
        fake.write_text("these are my notes, not an image\n")
        return ["train", fake, "--labels", lab, *common], (
            "notes.tif",
            "could not be read as a TIFF",
        )
    if case == "truncated tif":
        raw = img.read_bytes()
        img.write_bytes(raw[: len(raw) // 2])
        return ["train", img, "--labels", lab, *common], ("a.tif", "truncated or corrupt")
    if case == "shape mismatch":
        tifffile.imwrite(lab, ann[:64, :80])
        return ["train", img, "--labels", lab, *common], ("has shape (64, 80)", "(96, 96)")
    if case == "nothing annotated":
        tifffile.imwrite(lab, np.zeros(SHAPE, np.uint16))
        return ["train", img, "--labels", lab, *common], ("no pixel is annotated",)
    if case == "only background":
        tifffile.imwrite(lab, np.where(ann > 0, 1, 0).astype(np.uint16))
        return ["train", img, "--labels", lab, *common], ("no cell is annotated", "only background")
    if case == "semantic, only background":
        tifffile.imwrite(lab, np.where(ann > 0, 1, 0).astype(np.uint16))
        return ["train", img, "--labels", lab, *common, "--mode", "semantic"], (
            "no class is annotated",
        )
    if case == "unknown encoder":
        return ["train", img, "--labels", lab, *common, "--encoder", "resnet9000"], (
            "unknown encoder 'resnet9000'",
        )
    if case == "unknown loss":
        return ["train", img, "--labels", lab, *common, "--loss", "focal+bce"], (
            "unknown loss 'focal+bce'",
        )
    if case == "existing model":
        out.write_bytes(b"an older model")
        return ["train", img, "--labels", lab, *common], ("already exists", "--overwrite")
    if case == "bad class weights":
        return ["train", img, "--labels", lab, *common, "--class-weights", "1,x"], (
            "--class-weights",
        )
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing image",
        "missing labels",
        "png image",
        "text renamed tif",
        "truncated tif",
        "shape mismatch",
        "nothing annotated",
        "only background",
        "semantic, only background",
        "unknown encoder",
        "unknown loss",
        "existing model",
        "bad class weights",
    ],
)
def test_train_bad_input_is_one_clear_line(tmp_path, capsys, case):
    args, fragments = _bad_train_case(tmp_path, case)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, *args)
    assert code == 2
    assert_one_line_error(code, out, err, *fragments)
    # nothing written half-way, inputs unchanged
    assert snapshot(tmp_path) == before


# ------------------------------------------------------- bad inputs: predict
def test_predict_into_the_input_folder_is_refused(tmp_path, capsys, model_file):
    image, _ = synthetic_cells((40, 40), n_cells=3, seed=4)
    tifffile.imwrite(tmp_path / "a.tif", image)
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "predict", model_file, tmp_path, "--out", tmp_path)
    assert_one_line_error(code, out, err, "separate output folder")
    assert snapshot(tmp_path) == before
    # the same folder spelled differently
    code, out, err = run(
        capsys, "predict", model_file, tmp_path / "a.tif", "--out", tmp_path / "sub" / ".."
    )
    assert_one_line_error(code, out, err, "separate output folder")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "case", ["missing model", "pickled model", "missing input", "output is a file"]
)
def test_predict_bad_setup_is_one_clear_line(tmp_path, capsys, model_file, case):
    image, _ = synthetic_cells((40, 40), n_cells=3, seed=4)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", image)
    model, inputs, out = model_file, tmp_path / "in", tmp_path / "out"
    if case == "missing model":
        model, fragments = tmp_path / "nope.cellfit", ("nope.cellfit", "does not exist")
    elif case == "pickled model":
        model = tmp_path / "old.pth"
        torch.save({"weights": torch.zeros(3)}, model)
        fragments = ("pickled", "can run code")
    elif case == "missing input":
        inputs, fragments = tmp_path / "nowhere", ("nowhere", "does not exist")
    else:
        out.write_text("a file, not a folder")
        fragments = ("is a file",)
    before = snapshot(tmp_path)
    code, o, err = run(capsys, "predict", model, inputs, "--out", out)
    assert code == 2
    assert_one_line_error(code, o, err, *fragments)
    assert snapshot(tmp_path) == before
    if case != "output is a file":
        assert not out.exists()  # not even an empty output folder


# ------------------------------------------------------------ write errors
@pytest.mark.parametrize("fault", ["disk full", "permission denied"])
def test_a_trained_model_that_cannot_be_saved_is_one_clear_line_and_the_old_file_is_kept(
        data, capsys, monkeypatch, model_file, fault):
    """Training ends, then its model file cannot be written (the disk fills up
    half-way, or the folder may not be written to): one line says why and what to
    check, the exit code says it failed, and the model --overwrite was replacing is
    kept byte for byte, with no temporary beside it."""
    folder = data / "models"
    folder.mkdir()
    out = folder / "m.cellfit"
    out.write_bytes(model_file.read_bytes())
    before = snapshot(folder)
    if fault == "disk full":
        fill_disk_under(monkeypatch, folder, room=len(out.read_bytes()) // 2)
        why = "No space left on device"
    else:
        deny_writes_under(monkeypatch, folder)
        why = "Permission denied"
    code, o, err = run(capsys, *_train_args(data, "--init", model_file, "--out", out,
                                            "--overwrite"))
    monkeypatch.undo()
    assert code == 2
    assert "Traceback" not in o + err
    assert [line for line in err.splitlines() if line.startswith("cellfit: ")] == [
        f"cellfit: error: could not save the model to {out} ({why}): check the free space "
        "and the write permission of its folder."
    ]
    assert snapshot(folder) == before


def test_predict_into_a_folder_that_cannot_be_created_is_one_clear_line(
        tmp_path, capsys, monkeypatch, model_file):
    image, _ = synthetic_cells((40, 40), n_cells=3, seed=4)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", image)
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes_under(monkeypatch, locked)
    code, o, err = run(capsys, "predict", model_file, tmp_path / "in", "--out",
                       locked / "results", "--device", "cpu")
    monkeypatch.undo()
    assert code == 2
    assert_one_line_error(
        code, o, err,
        f"could not create the output folder {locked / 'results'} (Permission denied): "
        "check the free space and permissions of the folder above it",
    )
    assert list(locked.iterdir()) == []


def test_predict_bad_files_are_reported_and_the_batch_goes_on(tmp_path, capsys, model_file):
    image, _ = synthetic_cells((40, 48), n_cells=3, seed=4)
    inputs = tmp_path / "in"
    inputs.mkdir()
    tifffile.imwrite(inputs / "a_good.tif", image)
    raw = (inputs / "a_good.tif").read_bytes()
    (inputs / "b_cut.tif").write_bytes(raw[: len(raw) // 3])
    (inputs / "c_text.tif").write_text("not an image")
    tifffile.imwrite(inputs / "d_good.tif", image[::-1])
    (inputs / "e_empty.tif").write_bytes(b"")
    # a TIFF header whose first page lies past the end: tifffile logs a line of its own
    (inputs / "f_offset.tif").write_bytes(b"II*\x00" + (10**6).to_bytes(4, "little") + bytes(100))
    before = snapshot(inputs)
    out = tmp_path / "out"
    code, o, err = run(capsys, "predict", model_file, inputs, "--out", out, "--probabilities")
    assert code == 1
    assert "Traceback" not in o + err
    reported = [line for line in err.splitlines() if line.startswith("cellfit: ")]
    assert len(reported) == 4
    assert "b_cut.tif" in reported[0] and "truncated or corrupt" in reported[0]
    assert "c_text.tif" in reported[1] and "could not be read as a TIFF" in reported[1]
    assert "its content is not a TIFF image" in reported[1]
    assert "e_empty.tif" in reported[2] and "the file is empty (0 bytes)" in reported[2]
    assert "f_offset.tif" in reported[3] and "truncated or corrupt" in reported[3]
    # plain words only: no library text (issue #12)
    for raw_text in ("<tifffile", "TiffPage", "Error:", "header=b", "invalid offset",
                     "list index out of range", "failed to read"):
        assert raw_text not in o + err, raw_text
    assert "2 file(s) segmented" in err
    assert "4 failed: b_cut.tif; c_text.tif; e_empty.tif; f_offset.tif" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "a_good_labels.tif",
        "a_good_prob.tif",
        "d_good_labels.tif",
        "d_good_prob.tif",
    ]
    assert snapshot(inputs) == before


def test_predict_wrong_channel_count_is_a_per_file_failure(tmp_path, capsys):
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5, in_channels=3)
    model = save_model(tmp_path / "rgb.cellfit", build_model(info), info)
    image, _ = synthetic_cells((40, 40), n_cells=3, seed=4)
    (tmp_path / "in").mkdir()
    two = np.stack([image, image // 2])  # two channels (C, Y, X) into an RGB model
    tifffile.imwrite(tmp_path / "in" / "a_two.tif", two, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "in" / "b_gray.tif", image)
    code, o, err = run(capsys, "predict", model, tmp_path / "in", "--out", tmp_path / "out")
    assert code == 1, err
    assert "Traceback" not in o + err
    reported = [line for line in err.splitlines() if line.startswith("cellfit: ")]
    assert len(reported) == 1
    assert (
        "a_two.tif" in reported[0]
        and "has 2 channels but the model was trained on 3" in reported[0]
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b_gray_labels.tif"]


# ------------------------------------------------------ bad inputs: others
def test_evaluate_bad_inputs(tmp_path, capsys):
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "truth" / "a.tif", np.ones((20, 20), np.uint16))
    tifffile.imwrite(tmp_path / "pred" / "a_labels.tif", np.ones((20, 24), np.uint16))
    code, out, err = run(capsys, "evaluate", tmp_path / "pred", tmp_path / "truth")
    assert_one_line_error(code, out, err, "has shape (20, 24)")
    code, out, err = run(capsys, "evaluate", tmp_path / "nope", tmp_path / "truth")
    assert_one_line_error(code, out, err, "does not exist")


def test_info_on_a_non_model(tmp_path, capsys):
    path = tmp_path / "x.cellfit"
    path.write_text("hello")
    code, out, err = run(capsys, "info", path)
    assert_one_line_error(code, out, err, "not a cellfit model file")


def test_predict_inputs_with_the_same_name_are_refused(tmp_path, capsys, model_file):
    """a/x.tif and b/x.tif would both write out/x_labels.tif: the second used to
    overwrite the first silently while the summary said "2 file(s) segmented"."""
    image, _ = synthetic_cells((40, 40), n_cells=3, seed=4)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "x.tif", image)
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    code, o, err = run(capsys, "predict", model_file, tmp_path / "a", tmp_path / "b", "--out", out)
    assert code == 2
    assert_one_line_error(code, o, err, "x.tif", "same output")
    assert snapshot(tmp_path) == before and not out.exists()
    # x.tif and x.tiff in one folder collide too
    tifffile.imwrite(tmp_path / "a" / "x.tiff", image)
    code, o, err = run(capsys, "predict", model_file, tmp_path / "a", "--out", out)
    assert_one_line_error(code, o, err, "same output")


def test_predict_the_same_file_twice_is_done_once(tmp_path, capsys, model_file):
    image, _ = synthetic_cells((40, 40), n_cells=3, seed=4)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "x.tif", image)
    out = tmp_path / "out"
    code, _, err = run(
        capsys, "predict", model_file, tmp_path / "in", tmp_path / "in" / "x.tif", "--out", out
    )
    assert code == 0, err
    assert "1 file(s) segmented" in err
    assert [p.name for p in out.iterdir()] == ["x_labels.tif"]


def test_the_last_training_line_says_what_was_checked_and_what_the_scores_mean(tmp_path, capsys):
    """Stray one- or two-pixel pieces of painted cells are not cells (issue #12: "6
    held-back cells" of 7 painted, F1 0.99 beside AP50 0.25); the last line says what
    the two scores mean, in the words of the dock's Train tab."""
    from cellfit.train import validation_text

    image, labels = synthetic_cells(SHAPE, n_cells=8, seed=1)
    ann = sparse_annotation(labels, fraction=1.0, seed=0)
    n_cells = len(np.setdiff1d(np.unique(ann), [0, 1]))
    rng = np.random.default_rng(0)
    strays = 0
    while strays < 20:  # specks of the painted ids on unannotated pixels
        y, x = (int(v) for v in rng.integers(1, SHAPE[0] - 2, 2))
        if (ann[y - 1 : y + 2, x - 1 : x + 2] == 0).all():
            ann[y, x] = 2 + strays % n_cells
            strays += 1
    write_pair(tmp_path, "a.tif", image, ann)
    code, _, err = run(capsys, *_train_args(tmp_path, "--val-every", "2", "--init", "scratch"))
    assert code == 0, err
    rec = read_model_info(tmp_path / "m.cellfit").training[-1]
    held = round(0.2 * n_cells)
    assert rec["validated_on"] == f"{held} held-back cell{'s' if held != 1 else ''}"
    line = next(line for line in err.splitlines() if line.startswith("Finished: "))
    assert validation_text(rec) in line
    assert f"Validation on {rec['validated_on']}: pixels right F1 " in line
    assert ", cells matched AP50 " in line and "(1 is perfect; F1: cell and background" in line
    assert "AP50: cells found one for one" in line


def test_train_from_scratch_and_from_a_model_file(data, capsys):
    code, _, err = run(capsys, *_train_args(data), "--init", "scratch")
    assert code == 0, err
    assert "from scratch" in err
    info = read_model_info(data / "m.cellfit")
    assert info.in_channels == 1 and info.training[-1]["init"] is None
    code, _, err = run(capsys, *_train_args(data), "--init", str(data / "m.cellfit"),
                       "--overwrite", "--distill", "0.5")
    assert code == 0, err
    rec = read_model_info(data / "m.cellfit").training[-1]
    assert rec["init"] == str(data / "m.cellfit") and rec["distill"] == 0.5


def test_predict_takes_a_cell_diameter_only_for_models_of_any_cell_size(data, capsys):
    code, _, err = run(capsys, *_train_args(data), "--init", "scratch")
    assert code == 0, err
    code, _, err = run(capsys, "predict", data / "m.cellfit", data / "img", "--out",
                       data / "p", "--diameter", "20", "--device", "cpu")
    assert code == 2 and "leave --diameter out" in err and "Traceback" not in err


def test_flags_name_every_setting_an_engine_error_can_name():
    from cellfit.cli import FLAGS
    from cellfit.errors import SETTING_WORDS, CellfitError

    assert set(FLAGS) == set(SETTING_WORDS)
    err = CellfitError("needs their diameter: give {setting}.", setting="diameter")
    assert err.worded(FLAGS) == "needs their diameter: give --diameter PIXELS."
    assert CellfitError("leave {setting} out.", setting="diameter_option").worded(FLAGS) == (
        "leave --diameter out.")


def test_the_training_length_comes_from_train_config():
    import argparse

    from cellfit.cli import _time_limit, build_parser
    from cellfit.train import TrainConfig

    ns = argparse.Namespace
    assert _time_limit(ns(time_limit=None, steps=None)) == TrainConfig.time_limit
    assert _time_limit(ns(time_limit=None, steps=5)) is None  # --steps alone: steps end it
    assert _time_limit(ns(time_limit=12.0, steps=5)) == 12.0
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert f"default {TrainConfig.time_limit:g} unless" in " ".join(help_text.split())


def test_the_demo_has_its_own_short_default(monkeypatch):
    import cellfit.cli as ccli
    from cellfit.demo import DEMO_SECONDS

    seen = {}
    monkeypatch.setattr(ccli, "run_demo", lambda out, **kw: seen.update(kw) or 0)
    assert main(["demo", "--device", "cpu"]) == 0
    assert seen["time_limit"] == DEMO_SECONDS == 60.0


def test_progress_in_a_log_is_whole_lines_not_carriage_returns(tmp_path, capsys, model_file):
    # stderr is not a terminal here (as in a log file or a cluster job's output): a line
    # per file, none of the carriage returns that redraw a bar on a terminal
    (tmp_path / "in").mkdir()
    for k in range(3):
        image, _ = synthetic_cells((40, 40), n_cells=3, seed=k)
        tifffile.imwrite(tmp_path / "in" / f"f{k}.tif", image)
    code, _, err = run(capsys, "predict", model_file, tmp_path / "in", "--out", tmp_path / "o")
    assert code == 0, err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("files:")]
    assert [line.split("|")[-1].split()[0] for line in lines][-1] == "3/3"
    assert len(lines) == 4  # the start, then one per file


def test_a_log_gets_a_training_line_every_few_seconds_at_most(monkeypatch):
    import io

    from cellfit import console

    clock = iter(range(0, 10_000, 2))  # 2 s between two updates
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    log = io.StringIO()
    bar = console.LineBar(total=100, file=log, every=10)
    for _ in range(100):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # one line at the start, one every 10 s of the 200 s, and the last one
    assert 20 <= len(lines) <= 23, lines
    assert lines[-1].split("|")[-1].split()[0] == "100/100"
