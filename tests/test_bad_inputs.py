"""The bad-input matrix (docs/reliability.md): every input a user may get wrong, through
the command line (``cellfit train`` / ``cellfit predict``) and through the plugin's jobs
(what the dock runs in its worker thread), and the dock itself for its notifications.

A bad input ends in one sentence (what is wrong, what to do): on the command line one
``cellfit:`` line, exit status 2 (1 when ``predict`` reports a file and goes on), no
traceback; in the plugin the job's ``error`` (or a failed file's reason), which the dock
shows as a notification, the viewer still usable. Nothing is half-written and inputs are
never modified. The inputs that should work (8/16-bit, float, RGB, a constant image, an
image smaller than a tile or one pixel wide, 5-D stacks, one painted cell) are shown to
work, on both sides.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from _faults import deny_writes_under, fill_disk_under
from cellfit.cli import main
from cellfit.model import ModelInfo, build_model, load_model, save_model
from cellfit.synthetic import sparse_annotation, synthetic_cells
from cellfit.train import TrainConfig

SHAPE = (64, 64)
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
TINY = {
    "patch_size": 64,
    "val_every": 100,
    "warmup_steps": 1,
    "device": "cpu",
    "preview_every": 0.0,
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread: on a small shared CPU several threads spin against each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Tiny untrained instance models of 1 and 3 input channels (fast to run)."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for channels in (1, 3):
        torch.manual_seed(0)
        info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5, in_channels=channels)
        out[channels] = save_model(folder / f"tiny{channels}.cellfit", build_model(info), info)
    return out


def scene() -> tuple[np.ndarray, np.ndarray]:
    """A 64 x 64 uint16 image of cells and a sparse annotation of it."""
    img, lab = synthetic_cells(SHAPE, n_cells=6, seed=1)
    return img, sparse_annotation(lab, fraction=0.8, seed=0).astype(np.uint16)


# ------------------------------------------------------------------------ helpers
def cli(capsys, *args) -> tuple[int, str, list[str]]:
    """Run ``cellfit``; its exit status, stderr and the lines it starts with 'cellfit: '."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "<tifffile" not in out + err  # the TIFF library's own log lines (issue #12)
    return code, err, [line for line in err.splitlines() if line.startswith("cellfit: ")]


def one_sentence(message: str | None, *fragments: str) -> str:
    """``message`` is one sentence holding ``fragments``, not a crash in disguise."""
    assert message, "no message"
    assert "\n" not in message and message.rstrip().endswith("."), message
    for bad in ("Traceback", "internal error", "unexpected error", "please report"):
        assert bad not in message, message
    # no library text: "(IndexError: list index out of range)", "header=b'hell'",
    # "<tifffile.TiffPages @…> invalid offset…" (issue #12)
    assert not re.search(r"\b[A-Za-z]*(Error|Exception)\b", message), message
    for raw in ("<tifffile", "header=b", "TiffPage"):
        assert raw not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def cli_error(code: int, lines: list[str], status: int, *fragments: str) -> str:
    """One ``cellfit: error:`` line (notes aside) and exit ``status``."""
    assert code == status, lines
    errors = [line for line in lines if not line.startswith("cellfit: note: ")]
    assert len(errors) == 1 and errors[0].startswith("cellfit: error: "), lines
    return one_sentence(errors[0], *fragments)


def cli_file_failure(code: int, err: str, lines: list[str], path: Path, *fragments: str) -> str:
    """``predict`` reported ``path`` as failed and went on: exit 1, one line."""
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith(f"cellfit: {path}: "), lines
    assert f"1 failed: {path.name}" in err
    return one_sentence(lines[0], *fragments)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file under ``folder``: size, modification time and bytes (None where it
    may not be read)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            try:
                data = p.read_bytes()
            except PermissionError:
                data = None
            out[str(p.relative_to(folder))] = (p.stat().st_size, p.stat().st_mtime_ns, data)
    return out


def files_under(folder: Path) -> list[str]:
    """Every file (temporaries included) under ``folder``; [] when it does not exist."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


@pytest.fixture
def unreadable(monkeypatch):
    """Make a file unreadable: ``chmod 000``, or, where that cannot stop this user (root
    reads every file), its opening refused as the system refuses it (EACCES)."""
    changed: list[Path] = []

    def make(path: Path) -> None:
        path = path.absolute()
        if not AS_ROOT:
            path.chmod(0)
            changed.append(path)
            return
        real_open, real_os_open = io.open, os.open

        def refuse(file) -> None:
            if isinstance(file, (str, os.PathLike)) and Path(file).absolute() == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))

        def open_(file, *args, **kwargs):
            refuse(file)
            return real_open(file, *args, **kwargs)

        def os_open(file, *args, **kwargs):
            refuse(file)
            return real_os_open(file, *args, **kwargs)

        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "open", os_open)

    yield make
    for path in changed:
        path.chmod(0o644)


# ----------------------------------------------------------------- bad image files
#: case -> a fragment of the one sentence that must answer it
BAD_IMAGES = {
    "not a TIFF (a PNG)": "is not a TIFF file: cellfit reads .tif/.tiff files",
    "text file named .tif": "its content is not a TIFF image, though its name ends in .tif",
    "truncated TIFF": "the file may be truncated or corrupt: export it again",
    "corrupt TIFF": "the file may be truncated or corrupt: export it again",
    "TIFF header, no page": "the file may be truncated or corrupt: export it again",
    "empty file": "could not be read as a TIFF: the file is empty (0 bytes)",
    "1-D image": "an image needs at least two dimensions",
    "NaN pixels": "has NaN or infinite pixels, which cellfit cannot use",
    "infinite pixels": "has NaN or infinite pixels, which cellfit cannot use",
    "does not exist": "does not exist: check the path",
    "cannot be read": "could not be read (Permission denied): check that you may read it",
}


def write_bad_image(folder: Path, case: str, unreadable, name: str = "bad") -> Path:
    """Write the bad image ``case`` into ``folder``; the path to give cellfit."""
    img, _ = scene()
    path = folder / f"{name}.tif"
    folder.mkdir(parents=True, exist_ok=True)
    if case == "not a TIFF (a PNG)":
        path = path.with_suffix(".png")
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif case == "text file named .tif":
        path.write_text("my notes, not an image\n")
    elif case == "truncated TIFF":
        raw = tiff_bytes(img)
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "corrupt TIFF":  # a whole file whose compressed pixels are damaged
        raw = bytearray(tiff_bytes(img, compression="zlib"))
        with tifffile.TiffFile(io.BytesIO(bytes(raw))) as tif:
            start, size = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
        raw[start + 8 : start + size] = b"\xff" * (size - 8)
        path.write_bytes(bytes(raw))
    elif case == "TIFF header, no page":  # its first page lies past the end of the file
        path.write_bytes(b"II*\x00" + (10**6).to_bytes(4, "little") + bytes(100))
    elif case == "empty file":
        path.write_bytes(b"")
    elif case == "1-D image":
        tifffile.imwrite(path, img.ravel()[:500])
    elif case in ("NaN pixels", "infinite pixels"):
        bad = img.astype(np.float32)
        bad[:, :3] = np.nan if case == "NaN pixels" else np.inf
        tifffile.imwrite(path, bad)
    elif case == "cannot be read":
        tifffile.imwrite(path, img)
        unreadable(path)
    else:
        assert case == "does not exist"
    return path


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_cli_train_refuses_a_bad_image_in_one_sentence(tmp_path, capsys, unreadable, case):
    image = write_bad_image(tmp_path / "in", case, unreadable)
    _, ann = scene()
    tifffile.imwrite(tmp_path / "in" / "ann.tif", ann)
    before = snapshot(tmp_path)
    code, _, lines = cli(
        capsys,
        "train",
        image,
        "--labels",
        tmp_path / "in" / "ann.tif",
        "--out",
        tmp_path / "m.cellfit",
        "--steps",
        "2",
        "--patch-size",
        "64",
        "--device",
        "cpu",
        "--init",
        "scratch",
    )
    cli_error(code, lines, 2, BAD_IMAGES[case], image.name)
    assert snapshot(tmp_path) == before  # no model file, inputs untouched


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_cli_predict_reports_a_bad_image_and_writes_nothing(
    tmp_path, capsys, models, unreadable, case
):
    image = write_bad_image(tmp_path / "in", case, unreadable)
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out"
    code, err, lines = cli(
        capsys, "predict", models[1], image, "--out", out, "--device", "cpu", "--probabilities"
    )
    if case == "does not exist":  # nothing to do at all: a setup error
        cli_error(code, lines, 2, BAD_IMAGES[case], image.name)
        assert not out.exists()
    else:
        cli_file_failure(code, err, lines, image, BAD_IMAGES[case])
        assert files_under(out) == []  # not even a temporary
    assert snapshot(tmp_path / "in") == before


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_plugin_folder_segmentation_reports_a_bad_image(tmp_path, models, unreadable, case):
    """Segment folder (a BatchJob): a bad file is reported with its reason (the dock
    warns "<name> was not segmented: <reason>") and the good file next to it is done."""
    from cellfit.plugin.jobs import BatchJob

    folder = tmp_path / "in"
    image = write_bad_image(folder, case, unreadable)
    tifffile.imwrite(folder / "good.tif", scene()[0])
    before = snapshot(folder)
    out = tmp_path / "out"
    res = drain(
        BatchJob(models[1], [folder], out, probabilities=True, device="cpu", threads=1).run()
    )
    assert res.done == 1 and res.error is None
    if case == "not a TIFF (a PNG)":  # the dock segments the TIFF files of a folder
        assert res.failed == [] and res.n_files == 1
    elif case == "does not exist":
        assert res.failed == [] and res.n_files == 1  # only the good file exists
    else:
        [(name, reason)] = res.failed
        assert name == image.name
        one_sentence(reason, BAD_IMAGES[case])
    assert files_under(out) == ["good_labels.tif", "good_prob.tif"]
    assert snapshot(folder) == before


def test_plugin_folder_segmentation_of_no_tiffs_or_no_folder_is_one_sentence(tmp_path, models):
    from cellfit.plugin.jobs import BatchJob

    folder = tmp_path / "pngs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    res = drain(BatchJob(models[1], [folder], tmp_path / "out", device="cpu").run())
    one_sentence(res.error, "holds no .tif/.tiff files: point to the folder of TIFFs")
    res = drain(BatchJob(models[1], [tmp_path / "nowhere"], tmp_path / "out", device="cpu").run())
    one_sentence(res.error, "nowhere does not exist: check the path")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["NaN pixels", "infinite pixels"])
def test_plugin_jobs_refuse_nan_and_infinite_pixels(case):
    """An image layer with NaN or infinite pixels: Train, Segment image and Estimate
    say so (the engine's loss and prediction would be NaN: "training diverged", or
    empty labels said to be done)."""
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import DiameterJob, PredictJob, TrainJob

    img, ann = scene()
    bad = img.astype(np.float32)
    bad[5:9, 5:9] = np.nan if case == "NaN pixels" else -np.inf
    planes = planes_of(bad)
    before = planes.copy()
    res = drain(TrainJob([planes], [ann[None]], TrainConfig(steps=2, **TINY), threads=1).run())
    one_sentence(res.error, "the image has NaN or infinite pixels")
    assert res.model is None
    model, info = build_model(ModelInfo(decoder_channels=[16] * 5)), ModelInfo()
    res = drain(PredictJob(model, info, planes, threads=1).run())
    one_sentence(res.error, "the image has NaN or infinite pixels")
    assert res.labels is None
    res = drain(DiameterJob(model, info, planes[0], threads=1).run())
    one_sentence(res.error, "the image has NaN or infinite pixels")
    np.testing.assert_array_equal(planes, before)


def test_plugin_train_job_names_the_layer_it_cannot_use():
    """Train uses every annotated image: the sentence names the layer at fault."""
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import TrainJob

    img, ann = scene()
    bad = img.astype(np.float32)
    bad[0, 0] = np.nan
    config = TrainConfig(steps=2, **TINY)
    res = drain(
        TrainJob(
            [planes_of(img), planes_of(bad)],
            [ann[None]] * 2,
            config,
            names=["good", "nan"],
            threads=1,
        ).run()
    )
    one_sentence(res.error, "the image 'nan' has NaN or infinite pixels")
    res = drain(
        TrainJob(
            [planes_of(img)] * 2,
            [ann[None], ann[None].astype(np.int32) - 1],
            config,
            names=["good", "mine"],
            threads=1,
        ).run()
    )
    one_sentence(res.error, "the annotation of 'mine' has negative values")


def test_plugin_a_1d_layer_is_one_sentence():
    """napari itself refuses a 1-D image layer (tested in the dock below); the dock's
    own conversion says so in one sentence too."""
    from cellfit.errors import CellfitError
    from cellfit.plugin._layers import planes_of

    with pytest.raises(CellfitError) as exc:
        planes_of(np.arange(100.0))
    one_sentence(
        str(exc.value), "the image layer has shape (100,)", "needs at least two dimensions"
    )


# ------------------------------------------------------------- bad annotations
#: case -> (the annotation, a fragment of the CLI's sentence, of the plugin's)
def bad_annotation(case: str) -> np.ndarray:
    _, ann = scene()
    if case == "shapes differ":
        return ann[:50, :60]
    if case == "nothing annotated":
        return np.zeros(SHAPE, np.uint16)
    if case == "only background":
        return np.where(ann > 0, 1, 0).astype(np.uint16)
    if case == "negative labels":
        return ann.astype(np.int16) - 1  # -1 for "not annotated", as some tools write
    assert case == "fractional labels"
    return ann.astype(np.float32) + 0.5


BAD_ANNOTATIONS = {
    "shapes differ": (
        "has shape (50, 60) but its image has shape (64, 64)",
        "annotation 1 has shape (1, 50, 60) but its image has 1 plane(s) of 64x64",
    ),
    "nothing annotated": ("no pixel is annotated",) * 2,
    "only background": ("no cell is annotated (only background)",) * 2,
    "negative labels": ("has negative values: labels must be 0 or more",) * 2,
    "fractional labels": ("holds non-integer values (float32)",) * 2,
}


@pytest.mark.parametrize("case", BAD_ANNOTATIONS)
def test_cli_train_refuses_a_bad_annotation_in_one_sentence(tmp_path, capsys, case):
    img, _ = scene()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "ann.tif", bad_annotation(case))
    before = snapshot(tmp_path)
    code, _, lines = cli(
        capsys,
        "train",
        tmp_path / "img.tif",
        "--labels",
        tmp_path / "ann.tif",
        "--out",
        tmp_path / "m.cellfit",
        "--steps",
        "2",
        "--patch-size",
        "64",
        "--device",
        "cpu",
        "--init",
        "scratch",
    )
    cli_error(code, lines, 2, BAD_ANNOTATIONS[case][0])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", BAD_ANNOTATIONS)
def test_plugin_train_job_refuses_a_bad_annotation_in_one_sentence(case):
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import TrainJob

    img, _ = scene()
    ann = bad_annotation(case)[None]
    before = ann.copy()
    res = drain(TrainJob([planes_of(img)], [ann], TrainConfig(steps=2, **TINY), threads=1).run())
    one_sentence(res.error, BAD_ANNOTATIONS[case][1])
    assert res.model is None
    np.testing.assert_array_equal(ann, before)


# ------------------------------------------------------------- inputs that work
def working_input(case: str) -> tuple[np.ndarray, dict, np.ndarray, bool]:
    """(image, tifffile keywords, annotation of its planes, is RGB) for ``case``."""
    img, ann = scene()
    if case == "8-bit":
        return (img // max(1, img.max() // 255 + 1)).astype(np.uint8), {}, ann, False
    if case == "16-bit":
        return img, {}, ann, False
    if case == "32-bit float":
        return img.astype(np.float32) / 1000.0, {}, ann, False
    if case == "RGB":
        rgb = np.stack([img // 256, img // 300, img // 400], axis=-1).astype(np.uint8)
        return rgb, {"photometric": "rgb"}, ann, True
    if case == "constant image":
        return np.full(SHAPE, 7, np.uint16), {}, ann, False
    if case == "smaller than a tile":
        small = np.ones((20, 24), np.uint16)
        small[1:19, 1:23] = 1  # background all round
        small[6:13, 6:13] = 2  # one cell
        small[13:20, 14:22] = 3
        image = (img[:20, :24] // 4 + 3000 * (small >= 2)).astype(np.uint16)
        return image, {}, small, False
    if case == "1 pixel wide":
        line = np.zeros((64, 1), np.uint16)
        line[:20] = 1
        line[30:40] = 2
        line[45:55] = 3
        return img[:, 30:31], {}, line, False
    if case == "5-D stack":
        stack = np.stack([np.stack([img, img[::-1]])] * 2)[:, :, None]  # (2, 2, 1, Y, X)
        stack = np.concatenate([stack, stack[:, :, :, ::-1]], axis=2)  # (2, 2, 2, Y, X)
        anns = np.zeros(stack.shape, np.uint16)
        anns[0, 0, 0] = ann  # one annotated plane of eight
        return stack, {"photometric": "minisblack"}, anns, False
    assert case == "one annotated cell"
    one = np.where(ann == 1, 1, 0).astype(np.uint16)
    one[ann == 2] = 2
    return img, {}, one, False


WORKING = [
    "8-bit",
    "16-bit",
    "32-bit float",
    "RGB",
    "constant image",
    "smaller than a tile",
    "1 pixel wide",
    "5-D stack",
    "one annotated cell",
]


@pytest.mark.parametrize("case", WORKING)
def test_cli_trains_and_predicts_what_should_work(tmp_path, capsys, models, case):
    image, kw, ann, _ = working_input(case)
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", image, **kw)
    tifffile.imwrite(folder / "a_ann.tif", ann)
    before = snapshot(folder)
    model = tmp_path / "m.cellfit"
    code, err, lines = cli(
        capsys,
        "train",
        folder / "a.tif",
        "--labels",
        folder / "a_ann.tif",
        "--out",
        model,
        "--steps",
        "2",
        "--patch-size",
        "64",
        "--batch-size",
        "2",
        "--val-every",
        "100",
        "--device",
        "cpu",
        "--init",
        models[1],
    )
    assert code == 0 and lines == [] and model.is_file(), err
    out = tmp_path / "out"
    code, err, lines = cli(
        capsys,
        "predict",
        model,
        folder / "a.tif",
        "--out",
        out,
        "--probabilities",
        "--device",
        "cpu",
    )
    assert code == 0 and lines == [] and "1 file(s) segmented" in err, err
    labels = tifffile.imread(out / "a_labels.tif")
    probs = tifffile.imread(out / "a_prob.tif")
    assert labels.shape == ann.shape and np.issubdtype(labels.dtype, np.unsignedinteger)
    assert probs.shape == (*ann.shape[:-2], 3, *ann.shape[-2:]) and np.isfinite(probs).all()
    assert files_under(out) == ["a_labels.tif", "a_prob.tif"]
    assert snapshot(folder) == before


@pytest.mark.parametrize("case", WORKING)
def test_plugin_jobs_train_and_segment_what_should_work(models, case):
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import PredictJob, TrainJob

    image, _, ann, rgb = working_input(case)
    planes = planes_of(image, rgb)
    anns = ann.reshape(-1, *ann.shape[-2:])
    model, info = load_model(models[1], "cpu")
    res = drain(
        TrainJob(
            [planes], [anns], TrainConfig(steps=2, **TINY), model=model, info=info, threads=1
        ).run()
    )
    assert res.error is None and res.model is not None
    pred = drain(PredictJob(res.model, res.info, planes, threads=1).run())
    assert pred.error is None
    assert pred.labels.shape == anns.shape and np.isfinite(pred.probability).all()


# ------------------------------------------------------------------------ channels
def test_cli_a_model_meets_images_of_other_channel_counts(tmp_path, capsys, models):
    """A grayscale model segments RGB (averaged); an RGB model cannot take two channels,
    neither to segment (the file is reported) nor to fine-tune (refused)."""
    img, ann = scene()
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "rgb.tif", np.stack([img] * 3, axis=-1), photometric="rgb")
    code, err, lines = cli(
        capsys,
        "predict",
        models[1],
        folder / "rgb.tif",
        "--out",
        tmp_path / "o1",
        "--device",
        "cpu",
    )
    assert code == 0 and lines == [], err
    assert tifffile.imread(tmp_path / "o1" / "rgb_labels.tif").shape == SHAPE
    two = folder / "two.tif"
    tifffile.imwrite(two, np.stack([img, img // 2]), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(folder / "two_ann.tif", ann)
    code, err, lines = cli(
        capsys, "predict", models[3], two, "--out", tmp_path / "o3", "--device", "cpu"
    )
    cli_file_failure(
        code, err, lines, two, "the image has 2 channels but the model was trained on 3"
    )
    assert files_under(tmp_path / "o3") == []
    code, err, lines = cli(
        capsys,
        "train",
        two,
        "--labels",
        folder / "two_ann.tif",
        "--out",
        tmp_path / "m.cellfit",
        "--steps",
        "2",
        "--patch-size",
        "64",
        "--device",
        "cpu",
        "--init",
        models[3],
    )
    cli_error(code, lines, 2, "the image has 2 channels but the model was trained on 3")
    assert not (tmp_path / "m.cellfit").exists()


def test_plugin_a_model_meets_images_of_other_channel_counts(tmp_path, models):
    from cellfit.plugin._layers import planes_of
    from cellfit.plugin.jobs import BatchJob, PredictJob, TrainJob

    img, ann = scene()
    gray, gray_info = load_model(models[1], "cpu")
    rgb = planes_of(np.stack([img] * 3, axis=-1), rgb=True)
    res = drain(PredictJob(gray, gray_info, rgb, threads=1).run())
    assert res.error is None and res.labels.shape == (1, *SHAPE)
    colour, colour_info = load_model(models[3], "cpu")
    two = planes_of(np.stack([img, img // 2]), rgb=False).reshape(1, 2, *SHAPE)
    res = drain(PredictJob(colour, colour_info, two, threads=1).run())
    one_sentence(res.error, "the image has 2 channels but the model was trained on 3")
    res = drain(
        TrainJob(
            [two],
            [ann[None]],
            TrainConfig(steps=2, **TINY),
            model=colour,
            info=colour_info,
            threads=1,
        ).run()
    )
    one_sentence(res.error, "the image has 2 channels but the model was trained on 3")
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(
        folder / "two.tif", np.stack([img, img // 2]), imagej=True, metadata={"axes": "CYX"}
    )
    res = drain(BatchJob(models[3], [folder], tmp_path / "out", device="cpu", threads=1).run())
    [(name, reason)] = res.failed
    assert name == "two.tif"
    one_sentence(reason, "the image has 2 channels but the model was trained on 3")
    assert files_under(tmp_path / "out") == []


# ------------------------------------------------------------------ write faults
WRITE_FAULTS = {
    "cannot be written": "Permission denied",
    "disk full while writing": "No space left on device",
}


def _fault(monkeypatch, folder: Path, fault: str, room: int = 2000) -> None:
    if fault == "cannot be written":
        deny_writes_under(monkeypatch, folder)
    else:
        fill_disk_under(monkeypatch, folder, room=room)


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_cli_train_whose_model_cannot_be_written(tmp_path, capsys, monkeypatch, models, fault):
    img, ann = scene()
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "ann.tif", ann)
    folder = tmp_path / "models"
    folder.mkdir()
    out = folder / "m.cellfit"
    with monkeypatch.context() as m:
        _fault(m, folder, fault)
        code, _, lines = cli(
            capsys,
            "train",
            tmp_path / "img.tif",
            "--labels",
            tmp_path / "ann.tif",
            "--out",
            out,
            "--steps",
            "2",
            "--patch-size",
            "64",
            "--val-every",
            "100",
            "--device",
            "cpu",
            "--init",
            models[1],
        )
    cli_error(code, lines, 2, f"could not save the model to {out} ({WRITE_FAULTS[fault]})")
    assert files_under(folder) == []


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_cli_predict_whose_outputs_cannot_be_written(tmp_path, capsys, monkeypatch, models, fault):
    img, _ = scene()
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", img)
    out = tmp_path / "out"
    out.mkdir()
    with monkeypatch.context() as m:
        _fault(m, out, fault)
        code, err, lines = cli(
            capsys,
            "predict",
            models[1],
            tmp_path / "in",
            "--out",
            out,
            "--probabilities",
            "--device",
            "cpu",
        )
    cli_file_failure(
        code,
        err,
        lines,
        tmp_path / "in" / "a.tif",
        f"could not write {out / 'a_'}",
        f"({WRITE_FAULTS[fault]}): check the free space and permissions of the output folder",
    )
    assert files_under(out) == []


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_plugin_folder_segmentation_whose_outputs_cannot_be_written(
    tmp_path, monkeypatch, models, fault
):
    from cellfit.plugin.jobs import BatchJob

    img, _ = scene()
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", img)
    out = tmp_path / "out"
    out.mkdir()
    with monkeypatch.context() as m:
        _fault(m, out, fault)
        res = drain(
            BatchJob(
                models[1], [tmp_path / "in"], out, probabilities=True, device="cpu", threads=1
            ).run()
        )
    assert res.error is None and res.done == 0
    [(name, reason)] = res.failed
    assert name == "a.tif"
    one_sentence(reason, f"could not write {out / 'a_'}", f"({WRITE_FAULTS[fault]})")
    assert files_under(out) == []


def test_a_one_pixel_wide_stack_writes_probabilities_or_nothing(tmp_path, models):
    """tifffile drops a trailing axis of length 1 from a described series: probabilities
    (K, Y, 1) failed to write ("internal error"), after the labels had been published."""
    from cellfit.batch import predict_files

    img, _ = scene()
    # a stack of two planes 64 x 1 (described by hand: tifffile would write 2 x 64)
    line = np.stack([img[:, 30:31]] * 2)
    tifffile.imwrite(
        tmp_path / "line.tif",
        line,
        photometric="minisblack",
        metadata=None,
        description='{"shape": [2, 64, 1]}',
    )
    assert tifffile.imread(tmp_path / "line.tif").shape == (2, 64, 1)
    events = [
        ev
        for ev in predict_files(
            models[1], [tmp_path / "line.tif"], tmp_path / "out", probabilities=True, device="cpu"
        )
        if ev.status != "plane"
    ]
    assert [ev.status for ev in events] == ["done"], events[-1].error
    assert tifffile.imread(tmp_path / "out" / "line_prob.tif").shape == (2, 3, 64, 1)
    assert tifffile.imread(tmp_path / "out" / "line_labels.tif").shape == (2, 64, 1)


def test_outputs_are_published_together_or_not_at_all(tmp_path, models, monkeypatch):
    """A file's labels are not published when its probabilities fail to finish."""
    from cellfit import outputs
    from cellfit.batch import predict_files

    img, _ = scene()
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", img)
    real = outputs.TiffSink.finish

    def failing(self):
        if self.path.name.endswith("_prob.tif"):
            self.abort()
            raise outputs.CellfitError(f"could not write {self.path}: test.")
        real(self)

    monkeypatch.setattr(outputs.TiffSink, "finish", failing)
    events = [
        ev
        for ev in predict_files(
            models[1], [tmp_path / "in"], tmp_path / "out", probabilities=True, device="cpu"
        )
        if ev.status != "plane"
    ]
    assert [ev.status for ev in events] == ["failed"]
    assert files_under(tmp_path / "out") == []


# ---------------------------------------------------------------------- the dock
def _notes(since: int) -> list[tuple[str, str]]:
    from napari.utils.notifications import notification_manager

    return [(str(n.severity), n.message) for n in notification_manager.records[since:]]


def _n_notes() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


@pytest.mark.napari
def test_the_dock_says_what_is_wrong_and_stays_usable(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, models, unreadable
):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget(
        "napari-cellfit", "Annotate, train & segment"
    )
    annotate, train = widget.annotate_panel, widget.train_panel
    segment, model_tab = widget.segment_panel, widget.model_panel

    def wait() -> None:
        qtbot.waitUntil(lambda: widget.runner.job is None, timeout=120_000)

    def expect(action, *fragments: str, severity=("error",)) -> list[str]:
        n = _n_notes()
        action()
        wait()
        said = [m for sev, m in _notes(n) if sev in severity]
        assert said, f"no notification for {fragments!r}: {_notes(n)}"
        one_sentence(said[-1], *fragments)
        return said

    # a 1-D image: napari refuses the layer itself, and the dock carries on
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        viewer.add_image(np.arange(100.0), name="line")

    img, ann = scene()
    nan = img.astype(np.float32)
    nan[:, :3] = np.nan
    viewer.add_image(nan, name="nan")
    widget.image_combo.setCurrentText("nan")
    layer = annotate.create_annotation_layer()
    layer.data = ann.copy()
    train.budget_unit.setCurrentIndex(train.budget_unit.findData("steps"))
    train.budget_spin.setValue(2)
    train.patch_combo.setCurrentIndex(train.patch_combo.findData("128"))
    train.device_combo.setCurrentIndex(train.device_combo.findData("cpu"))
    expect(train.start_training, "has NaN or infinite pixels")
    viewer.layers.remove("nan annotation")  # (Train uses every annotated image)

    # negative labels (a Labels layer of the user's, -1 for "not annotated")
    viewer.add_image(img, name="cells")
    viewer.add_labels(ann.astype(np.int32) - 1, name="cells annotation")
    viewer.add_labels(np.zeros((50, 60), np.uint16), name="other size")
    widget.image_combo.setCurrentText("cells")
    choices = [annotate.ann_combo.itemText(i) for i in range(annotate.ann_combo.count())]
    assert "other size" not in choices  # a layer of another shape is not offered
    assert annotate.ann_combo.currentText() == "cells annotation"
    expect(train.start_training, "has negative values")

    # a model in memory: Segment image on the NaN image
    assert model_tab.load_model_file(models[1])
    widget.image_combo.setCurrentText("nan")
    expect(segment.predict_image, "has NaN or infinite pixels")

    # Segment folder: each bad file is listed in the Segment tab with its reason (one
    # warning names them), the good one is done
    folder = tmp_path / "in"
    for k, case in enumerate(
        (
            "text file named .tif",
            "truncated TIFF",
            "empty file",
            "1-D image",
            "NaN pixels",
            "cannot be read",
        )
    ):
        write_bad_image(folder, case, unreadable, name=f"bad{k}")
    tifffile.imwrite(folder / "good.tif", img)
    segment.in_edit.setText(str(folder))
    segment.out_edit.setText(str(tmp_path / "out"))
    n = _n_notes()
    segment.predict_folder()
    wait()
    warned = [m for sev, m in _notes(n) if sev == "warning"]
    assert len(warned) == 1 and segment.last_batch_result.done == 1, _notes(n)
    one_sentence(warned[0], "6 files were not segmented (bad0.tif, bad1.tif, bad2.tif, …)")
    listed = [segment.failed_list.item(i).text() for i in range(segment.failed_list.count())]
    assert len(listed) == 6 and segment.failed_label.text() == "6 files were not segmented:"
    for k, text in enumerate(listed):
        one_sentence(text, f"bad{k}.tif")
    assert files_under(tmp_path / "out") == ["good_labels.tif"]

    # Save model into a folder that cannot be written, or onto a full disk
    locked = tmp_path / "locked"
    locked.mkdir()
    for fault, why in WRITE_FAULTS.items():
        with monkeypatch.context() as m:
            _fault(m, locked, fault, room=1000)
            expect(
                lambda: model_tab.save_model_file(locked / "m.cellfit"),
                f"could not save the model to {locked / 'm.cellfit'} ({why})",
            )
        assert files_under(locked) == []

    # the viewer is still usable: paint properly and train
    viewer.layers["cells annotation"].data = ann.astype(np.int32)
    widget.image_combo.setCurrentText("cells")
    n = _n_notes()
    train.start_training()
    wait()
    assert train.last_result.error is None, _notes(n)
    assert not [m for sev, m in _notes(n) if sev == "error"]
    viewer.add_points(np.zeros((1, 2)))
    assert widget.runner.job is None
