"""``cellfit export``: ONNX and bioimage.io packages, and packages read back as models.

The exports need the optional packages of the ``export`` extra (onnx, onnxruntime,
bioimageio.spec); without them these tests are skipped, except the one that checks
the message saying what to install. Nothing here touches the network: the fixture
``no_network`` records any connection attempt (the spec library catches errors of its
URL checks and turns them into warnings, so a refused connection alone would pass
unseen).
"""

from __future__ import annotations

import gc
import io
import json
import socket
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import cellfit.export as export_module
from cellfit.cli import main
from cellfit.errors import CellfitError
from cellfit.export import (
    MIN_SIZE,
    ONNX_OPSET,
    PACKAGE_FILES,
    SIZE_STEP,
    export_bioimageio,
    export_onnx,
)
from cellfit.model import ModelInfo, build_model, load_model, read_model_info, save_model
from cellfit.starting import starting_model_path
from cellfit.synthetic import synthetic_cells

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
bioimageio_spec = pytest.importorskip("bioimageio.spec")


# ----------------------------------------------------------------- helpers
def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("cellfit: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


class _Network:
    """Records every attempt to reach the network (and refuses it)."""

    def __init__(self) -> None:
        self.touched: list[str] = []

    def refuse(self, *args, **kwargs):
        self.touched.append(repr(args)[:200])
        raise OSError("the network is not allowed in this test")

    def patch(self, mp: pytest.MonkeyPatch) -> _Network:
        mp.setattr(socket.socket, "connect", self.refuse)
        mp.setattr(socket.socket, "connect_ex", self.refuse)
        mp.setattr(socket, "create_connection", self.refuse)
        mp.setattr(socket, "getaddrinfo", self.refuse)
        return self


@pytest.fixture
def no_network(monkeypatch):
    net = _Network().patch(monkeypatch)
    yield net
    assert not net.touched, f"the network was touched: {net.touched}"


def tiny_model(path: Path, records: list[dict] | None = None) -> Path:
    """An untrained tiny grayscale instance model whose random weights still find
    objects in the synthetic image (the boundary class is turned down)."""
    torch.manual_seed(0)
    info = ModelInfo(encoder="mobilenet_v2", decoder_channels=[16] * 5)
    info.training = list(records or [])
    model = build_model(info)
    with torch.no_grad():
        model.segmentation_head[0].bias[:] = torch.tensor([0.0, 0.0, -3.0])
    return save_model(path, model, info)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """The tiny model, with the training record of the starting model (whose data
    licences the package must carry)."""
    records = read_model_info(starting_model_path()).training
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny.cellfit", records)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    img, _ = synthetic_cells((96, 96), n_cells=8, seed=1)
    path = tmp_path_factory.mktemp("img") / "a.tif"
    tifffile.imwrite(path, img)
    return path


@pytest.fixture(scope="module")
def package(tmp_path_factory, model_file) -> Path:
    """The tiny model exported as a bioimage.io package, with the network refused."""
    out = tmp_path_factory.mktemp("package") / "tiny.zip"
    with pytest.MonkeyPatch.context() as mp:
        net = _Network().patch(mp)
        export_bioimageio(model_file, out, authors=["Ada Lovelace"], license="CC-BY-4.0")
    assert not net.touched, f"the export touched the network: {net.touched}"
    return out


def scale_range(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """The spec's scale_range over axes y and x, written out (not cellfit's code)."""
    lo = np.percentile(x, low, axis=(2, 3), keepdims=True)
    hi = np.percentile(x, high, axis=(2, 3), keepdims=True)
    return ((x - lo) / (hi - lo + 1e-6)).astype(np.float32)


def probabilities(model_path: Path, x: np.ndarray) -> np.ndarray:
    model, _ = load_model(model_path)
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()


# --------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, model_file) -> Path:
    """The tiny model exported by ``cellfit export --format onnx``, offline."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with pytest.MonkeyPatch.context() as mp:
        net = _Network().patch(mp)
        code = main(["export", str(model_file), "--format", "onnx", "--out", str(out)])
    assert code == 0 and not net.touched
    return out


def test_onnx_gives_pytorchs_probabilities_at_any_batch_and_size(onnx_file, model_file):
    out = onnx_file
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("input", "probabilities")
    # batch, height and width are dynamic; channels are the model's
    assert isinstance(inp.shape[0], str) and inp.shape[1] == 1
    assert all(isinstance(d, str) for d in inp.shape[2:])
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 64, 96), (3, 1, 128, 32 * 5)]:
        x = rng.normal(0.5, 0.3, shape).astype(np.float32)
        got = session.run(None, {"input": x})[0]
        want = probabilities(model_file, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # softmax, not logits


def test_onnx_metadata_holds_the_model_information(onnx_file, model_file):
    proto = onnx.load(str(onnx_file))
    assert proto.opset_import[0].version == ONNX_OPSET
    props = {p.key: p.value for p in proto.metadata_props}
    assert ModelInfo.from_json(props["cellfit"]) == read_model_info(model_file)
    assert f"multiples of {SIZE_STEP}" in props["input"]
    assert "1 percentile mapped to 0" in props["input"] and "99.8 percentile" in props["input"]
    assert "softmax probabilities" in props["output"] and "not logits" in props["output"]
    assert "watershed" in props["postprocessing"]


def test_an_onnx_file_that_does_not_reproduce_the_network_is_not_written(
    tmp_path, monkeypatch, model_file
):
    monkeypatch.setattr(export_module, "ONNX_TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(CellfitError, match="does not reproduce the network"):
        export_onnx(model_file, tmp_path / "tiny.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ the package
def in_memory(path: Path) -> zipfile.ZipFile:
    """The zip ``path`` read from memory: the spec library leaves the files of the zips
    it reads open (a ResourceWarning wherever they are collected)."""
    return zipfile.ZipFile(io.BytesIO(path.read_bytes()))


def test_the_package_validates_offline_with_the_spec_library(package, no_network):
    from bioimageio.spec import InvalidDescr, load_description

    with in_memory(package) as zf:
        descr = load_description(zf, perform_io_checks=True)
        summary = descr.validation_summary
        assert not isinstance(descr, InvalidDescr), summary.format()
        assert summary.status in ("valid-format", "passed"), summary.format()
        assert not summary.errors
        assert descr.type == "model" and str(descr.format_version).startswith("0.5")
        weights = {w for w in ("onnx", "torchscript") if getattr(descr.weights, w) is not None}
        assert weights == {"onnx", "torchscript"}
        assert [str(a.source.path) for a in descr.attachments] == ["tiny.cellfit"]


def test_a_tampered_package_fails_validation(tmp_path, package, no_network):
    """The validation above can fail: a file that no longer matches its hash does."""
    from bioimageio.spec import load_description

    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data + b"\n" if name == "README.md" else data)
    with in_memory(bad) as zf:
        summary = load_description(zf, perform_io_checks=True).validation_summary
    assert summary.status == "failed"
    assert "SHA256 mismatch" in summary.format()


def test_the_package_holds_weights_test_data_docs_and_the_model(package, model_file):
    with zipfile.ZipFile(package) as zf:
        assert zf.namelist()[0] == "rdf.yaml"
        assert set(zf.namelist()) == {*PACKAGE_FILES, "tiny.cellfit"}
        assert zf.read("tiny.cellfit") == model_file.read_bytes()
        rdf = zf.read("rdf.yaml").decode()
        readme = zf.read("README.md").decode()
        x = np.load(io.BytesIO(zf.read("test_input.npy")), allow_pickle=False)
        y = np.load(io.BytesIO(zf.read("test_output.npy")), allow_pickle=False)
        onnx_weights = zf.read("weights.onnx")
        torchscript = zf.read("weights_torchscript.pt")
        cover = zf.read("cover.png")
    from ruyaml import YAML

    content = YAML(typ="safe").load(rdf)
    # the normalisation is the spec's own percentile scaling, per image and channel
    (pre,) = content["inputs"][0]["preprocessing"]
    assert pre == {
        "id": "scale_range",
        "kwargs": {"axes": ["y", "x"], "min_percentile": 1.0, "max_percentile": 99.8},
    }
    axes = content["inputs"][0]["axes"]
    assert axes[2]["size"] == {"min": MIN_SIZE, "step": SIZE_STEP}
    assert content["outputs"][0]["axes"][1]["channel_names"] == ["background", "cell", "boundary"]
    assert content["authors"] == [{"name": "Ada Lovelace"}]
    assert content["license"] == "CC-BY-4.0"
    # the starting model's data: BBBC038, cited by DOI (no URL: validation stays offline)
    dois = [c["doi"] for c in content["cite"]]
    assert "10.1038/s41592-019-0612-7" in dois and all("url" not in c for c in content["cite"])
    assert "http" not in rdf
    assert content["config"]["cellfit"]["model"] == "tiny.cellfit"
    # the README: training record, validation, data and their licences
    for fragment in (
        "## Training record",
        "## Validation",
        "## Data and licences",
        "BBBC038",
        "CC0",
        "BSD-3-Clause",
        "cellfit generalist starting model",
        "multiples of 32",
        "Ada Lovelace",
    ):
        assert fragment in readme, fragment
    # the test output is what either weights give for the scaled test input
    assert x.dtype == y.dtype == np.float32
    assert x.shape[:2] == (1, 1) and x.shape[2] % SIZE_STEP == 0 and x.shape[3] % SIZE_STEP == 0
    assert y.shape == (1, 3, *x.shape[2:])
    scaled = scale_range(x, 1.0, 99.8)
    session = onnxruntime.InferenceSession(onnx_weights, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": scaled})[0], y, atol=1e-4)
    traced = torch.jit.load(io.BytesIO(torchscript))  # our own file, just written
    with torch.no_grad():
        np.testing.assert_allclose(traced(torch.from_numpy(scaled)).numpy(), y, atol=1e-4)
    assert cover.startswith(b"\x89PNG")


# bioimageio.core leaves the package's file open, and torch.jit.load is deprecated
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bioimageio_core_runs_the_package(package, no_network):
    """bioimageio.core (not a dependency of cellfit) reproduces the test output from
    the test input with each weights format, preprocessing included."""
    core = pytest.importorskip("bioimageio.core")
    for weights in ("onnx", "torchscript"):
        summary = core.test_model(package, weight_format=weights, devices=["cpu"])
        assert summary.status == "passed", summary.format()
    gc.collect()  # the files it left open are closed here, under this test's filters


def fake_weights(monkeypatch) -> None:
    """Weights files of a few bytes (fast), where a test looks at other parts of a
    package: the spec library checks their hashes, never runs them."""
    monkeypatch.setattr(export_module, "onnx_bytes", lambda model, info: b"onnx")
    monkeypatch.setattr(export_module, "_torchscript_bytes", lambda model, info: b"torchscript")


def test_a_sample_image_becomes_the_test_input(tmp_path, monkeypatch, model_file, no_network):
    fake_weights(monkeypatch)
    img, _ = synthetic_cells((200, 300), n_cells=20, seed=2)
    tifffile.imwrite(tmp_path / "s.tif", img)
    out = export_bioimageio(model_file, tmp_path / "s.zip", sample=tmp_path / "s.tif")
    with zipfile.ZipFile(out) as zf:
        x = np.load(io.BytesIO(zf.read("test_input.npy")))
    # the centre of the image, cut to multiples of 32, in raw intensities
    assert x.shape == (1, 1, 192, 256)
    np.testing.assert_array_equal(x[0, 0], img[4:196, 22:278].astype(np.float32))


# ----------------------------------------------------------- reading it back
def test_predict_and_info_take_the_package_as_the_model(
    tmp_path, capsys, package, model_file, image
):
    assert read_model_info(package) == read_model_info(model_file)
    for model, folder in ((model_file, "from_file"), (package, "from_package")):
        code, _, err = run(
            capsys,
            "predict",
            model,
            image,
            "--out",
            tmp_path / folder,
            "--probabilities",
            "--device",
            "cpu",
        )
        assert code == 0, err
    labels = [tifffile.imread(tmp_path / f / "a_labels.tif") for f in ("from_file", "from_package")]
    probs = [tifffile.imread(tmp_path / f / "a_prob.tif") for f in ("from_file", "from_package")]
    assert labels[0].max() > 0  # a test of something
    np.testing.assert_array_equal(labels[0], labels[1])
    np.testing.assert_array_equal(probs[0], probs[1])
    code, out_file, _ = run(capsys, "info", model_file)
    code2, out_package, _ = run(capsys, "info", package)
    assert code == code2 == 0
    assert out_file.splitlines()[1:] == out_package.splitlines()[1:]
    assert str(package) in out_package.splitlines()[0]
    code, out_json, _ = run(capsys, "info", package, "--json")
    assert json.loads(out_json)["encoder"] == "mobilenet_v2"


def test_load_model_reads_the_package_as_the_plugin_does(package, model_file):
    a, info_a = load_model(model_file)
    b, info_b = load_model(package)
    assert info_a == info_b
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_package_exports_again_to_onnx(tmp_path, package, no_network):
    out = export_onnx(package, tmp_path / "again.onnx")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert ModelInfo.from_json(props["cellfit"]) == read_model_info(package)


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize(
    ("files", "fragments"),
    [
        (
            {"rdf.yaml": b"type: model\n", "weights.onnx": b"x"},
            (
                "bioimage.io model package that was not made by cellfit",
                "bioimageio.core, deepImageJ or ilastik",
            ),
        ),
        ({"notes.txt": b"hello"}, ("is a zip file but neither a cellfit model nor a bioimage.io",)),
        (
            {"rdf.yaml": b"type: model\n", "a.cellfit": b"x", "b.cellfit": b"y"},
            ("holds 2 cellfit models",),
        ),
        (
            {"rdf.yaml": b"type: model\n", "m.cellfit": b"\x80\x04\x95pickled"},
            ("m.cellfit in", "is a pickled Python file"),
        ),
    ],
    ids=["foreign package", "plain zip", "two models", "pickle inside"],
)
def test_a_zip_cellfit_cannot_run_is_one_sentence(tmp_path, capsys, image, files, fragments):
    path = _zip(tmp_path / "p.zip", files)
    for command in (["predict", path, image, "--out", tmp_path / "out"], ["info", path]):
        code, _, err = run(capsys, *command)
        one_line_error(code, err, *fragments)
    with pytest.raises(CellfitError):
        load_model(path)
    assert not (tmp_path / "out" / "a_labels.tif").exists()


def test_a_damaged_attachment_is_refused(tmp_path, package):
    """The attachment's CRC is checked: a flipped byte in its weights is noticed."""
    raw = bytearray(package.read_bytes())
    with zipfile.ZipFile(package) as zf:
        item = zf.getinfo("tiny.cellfit")
    # flip a byte near the end of the attachment's (stored or deflated) data
    at = item.header_offset + 30 + len(item.filename.encode()) + len(item.extra)
    raw[at + item.compress_size - 100] ^= 0xFF
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    read_model_info(bad)  # the header is intact
    with pytest.raises(CellfitError, match=r"tiny\.cellfit in .*(damaged|could not read)"):
        load_model(bad)


def test_a_package_with_too_many_files_is_refused_unread(tmp_path, monkeypatch):
    import cellfit.packages

    monkeypatch.setattr(cellfit.packages, "MAX_ENTRIES", 3)
    path = _zip(tmp_path / "p.zip", {f"{i}.txt": b"" for i in range(4)} | {"rdf.yaml": b""})
    with pytest.raises(CellfitError, match="lists 5 files"):
        read_model_info(path)


def test_a_zip64_package_is_refused_unread(tmp_path):
    raw = _zip(tmp_path / "p.zip", {"rdf.yaml": b"", "m.cellfit": b"x"}).read_bytes()
    end = raw.rfind(b"PK\x05\x06")
    forged = raw[:end] + b"PK\x06\x07" + bytes(16) + raw[end:]  # a zip64 locator
    (tmp_path / "p.zip").write_bytes(forged)
    with pytest.raises(CellfitError, match="is a zip64 archive"):
        read_model_info(tmp_path / "p.zip")


# --------------------------------------------- dependencies, overwrite, atomicity
@pytest.mark.parametrize("format", ["onnx", "bioimageio"])
def test_missing_packages_say_what_to_install(tmp_path, capsys, monkeypatch, model_file, format):
    for module in ("onnx", "onnxruntime", "bioimageio.spec"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    out = tmp_path / "m.zip"
    code, _, err = run(capsys, "export", model_file, "--format", format, "--out", out)
    line = one_line_error(code, err, "pip install 'napari-cellfit[export]'", "onnxruntime")
    assert ("bioimageio.spec" in line) == (format == "bioimageio")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_overwrite(tmp_path, capsys, monkeypatch, model_file):
    monkeypatch.setattr(export_module, "onnx_bytes", lambda model, info: b"\x08 onnx")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"older")
    code, _, err = run(capsys, "export", model_file, "--format", "onnx", "--out", out)
    one_line_error(code, err, "already exists", "--overwrite")
    assert out.read_bytes() == b"older"
    code, _, err = run(
        capsys, "export", model_file, "--format", "onnx", "--out", out, "--overwrite"
    )
    assert code == 0, err
    assert out.read_bytes() == b"\x08 onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--format", "bioimageio", "--out", "m.onnx"], ("does not end in .zip",)),
        (
            ["--format", "bioimageio", "--out", "m.zip", "--license", "Nope-1"],
            ("'Nope-1' is not an SPDX licence identifier", "--license"),
        ),
        (["--format", "onnx", "--out", "m.onnx", "--author", "X"], ("leave them out",)),
        (["--format", "onnx", "--out", "."], ("is a folder", "--out")),
    ],
)
def test_bad_export_settings_are_one_sentence(
    tmp_path, capsys, monkeypatch, model_file, args, fragments
):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "export", model_file, *args)
    one_line_error(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("older", [None, b"older package"])
def test_a_failed_export_leaves_no_file_and_the_older_one_intact(
    tmp_path, capsys, monkeypatch, model_file, older
):
    """The package is complete before it has its name: a failure while it is written
    (here its validation) leaves nothing new, and no temporary file."""
    out = tmp_path / "m.zip"
    if older is not None:
        out.write_bytes(older)
    seen = []

    def fail(path):
        seen.append(zipfile.ZipFile(path).namelist())  # the whole package was written
        raise CellfitError("validation failed (on purpose).")

    monkeypatch.setattr(export_module, "_validate", fail)
    fake_weights(monkeypatch)
    code, _, err = run(
        capsys, "export", model_file, "--format", "bioimageio", "--out", out, "--overwrite"
    )
    one_line_error(code, err, "on purpose")
    assert seen and "m.cellfit" in seen[0]
    if older is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == older
    assert sorted(p.name for p in tmp_path.iterdir()) == (["m.zip"] if older else [])


def test_an_interrupted_onnx_export_leaves_the_older_file(tmp_path, monkeypatch, model_file):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"older")
    real = Path.write_bytes

    def interrupted(self, data):
        real(self, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "onnx_bytes", lambda model, info: b"\x08 onnx" * 100)
    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model_file, out, overwrite=True)
    monkeypatch.undo()
    assert out.read_bytes() == b"older"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
