"""TIFF reading into the planes layout, label checks, file pairing, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cellfit.errors import CellfitError
from cellfit.io import (
    atomic_write_tiff,
    expand_inputs,
    find_tiffs,
    guess_axes,
    pair_files,
    read_image,
    read_labels,
    to_planes,
)


def _ramp(*shape, dtype=np.uint16):
    return (np.arange(int(np.prod(shape))) % 1000).reshape(shape).astype(dtype)


# ------------------------------------------------------------------ read_image
def test_read_2d(tmp_path):
    arr = _ramp(30, 40)
    tifffile.imwrite(tmp_path / "cells.tif", arr)
    s = read_image(tmp_path / "cells.tif")
    assert s.data.shape == (1, 1, 30, 40) and s.data.dtype == np.uint16
    assert s.lead_shape == () and s.labels_shape == (30, 40)
    assert s.name == "cells" and s.n_planes == 1 and s.n_channels == 1
    np.testing.assert_array_equal(s.data[0, 0], arr)


def test_read_rgb(tmp_path):
    arr = _ramp(30, 40, 3, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", arr, photometric="rgb")
    s = read_image(tmp_path / "rgb.tiff")
    assert s.data.shape == (1, 3, 30, 40) and s.labels_shape == (30, 40)
    for c in range(3):
        np.testing.assert_array_equal(s.data[0, c], arr[..., c])


def test_read_3d_stack(tmp_path):
    arr = _ramp(5, 30, 40)
    tifffile.imwrite(tmp_path / "stack.tif", arr)
    s = read_image(tmp_path / "stack.tif")
    assert s.data.shape == (5, 1, 30, 40) and s.lead_shape == (5,)
    assert s.labels_shape == (5, 30, 40)
    np.testing.assert_array_equal(s.data[3, 0], arr[3])


def test_read_imagej_hyperstack(tmp_path):
    arr = _ramp(2, 3, 4, 20, 24)  # T Z C Y X
    tifffile.imwrite(tmp_path / "h.tif", arr, imagej=True, metadata={"axes": "TZCYX"})
    s = read_image(tmp_path / "h.tif")
    assert s.axes == "TZCYX"
    assert s.data.shape == (6, 4, 20, 24) and s.lead_shape == (2, 3)
    np.testing.assert_array_equal(s.data[1 * 3 + 2, 3], arr[1, 2, 3])


def test_read_float_and_bool(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30))
    assert read_image(tmp_path / "f.tif").data.dtype == np.float32
    tifffile.imwrite(tmp_path / "b.tif", np.eye(20, dtype=bool))
    assert read_image(tmp_path / "b.tif").data.dtype == np.uint8


def test_resolution_survives_a_round_trip(tmp_path):
    tifffile.imwrite(tmp_path / "r.tif", _ramp(20, 20), resolution=(2.5, 4.0))
    s = read_image(tmp_path / "r.tif")
    atomic_write_tiff(tmp_path / "out.tif", _ramp(20, 20), resolution=s.resolution)
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        page = tif.pages[0]
        assert page.tags["XResolution"].value == (5, 2)
        assert page.tags["YResolution"].value == (4, 1)


# -------------------------------------------------------------------- axes
@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((30, 40), "YX"),
        ((30, 40, 3), "YXS"),
        ((30, 40, 4), "YXS"),
        ((5, 30, 40), "QYX"),
        ((3, 30, 40), "QYX"),  # leading 3 is a stack, not colour
        ((2, 5, 30, 40, 3), "QQYXS"),
        ((30, 3), "YX"),  # a thin image is not RGB
    ],
)
def test_guess_axes(shape, axes):
    assert guess_axes(shape) == axes


def test_to_planes_merges_two_channel_axes_and_keeps_input():
    arr = _ramp(2, 20, 24, 3)  # C Y X S
    before = arr.copy()
    planes, lead, axes = to_planes(arr, "CYXS")
    assert planes.shape == (1, 6, 20, 24) and lead == () and axes == "YXC"
    np.testing.assert_array_equal(arr, before)
    np.testing.assert_array_equal(planes[0, 1 * 3 + 2], arr[1, :, :, 2])


def test_to_planes_refuses_1d_and_odd_types():
    with pytest.raises(CellfitError, match="at least two dimensions"):
        to_planes(np.zeros(10))
    with pytest.raises(CellfitError, match="complex"):
        to_planes(np.zeros((4, 4), np.complex64))


# ------------------------------------------------------------------ labels
def test_read_labels_checks_shape(tmp_path):
    tifffile.imwrite(tmp_path / "l.tif", np.ones((30, 40), np.uint16))
    assert read_labels(tmp_path / "l.tif", (30, 40)).shape == (30, 40)
    # a singleton axis is tolerated
    assert read_labels(tmp_path / "l.tif", (1, 30, 40)).shape == (1, 30, 40)
    with pytest.raises(
        CellfitError, match=r"has shape \(30, 40\) but its image has shape \(40, 30\)"
    ):
        read_labels(tmp_path / "l.tif", (40, 30))


def test_read_labels_shape_check_allocates_nothing(tmp_path):
    """Comparing against a huge stack's shape must not allocate that stack (it used to
    build np.empty(shape): a MemoryError instead of the mismatch message)."""
    tifffile.imwrite(tmp_path / "l.tif", np.ones((4, 5), np.uint16))
    with pytest.raises(CellfitError, match="has shape"):
        read_labels(tmp_path / "l.tif", (100_000, 100_000, 1000))
    assert read_labels(tmp_path / "l.tif", (1, 4, 1, 5)).shape == (1, 4, 1, 5)


def test_read_labels_value_checks(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.0, 1.0], [2.0, 3.0]], np.float32))
    lab = read_labels(tmp_path / "f.tif")
    assert np.issubdtype(lab.dtype, np.integer) and lab.tolist() == [[0, 1], [2, 3]]
    tifffile.imwrite(tmp_path / "g.tif", np.array([[0.5, 1.0]], np.float32))
    with pytest.raises(CellfitError, match="non-integer"):
        read_labels(tmp_path / "g.tif")
    tifffile.imwrite(tmp_path / "n.tif", np.array([[-1, 2]], np.int16))
    with pytest.raises(CellfitError, match="negative"):
        read_labels(tmp_path / "n.tif")


# ------------------------------------------------------------------ bad files
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg.endswith(".")
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(CellfitError, match="does not exist") as e:
        read_image(tmp_path / "nope.tif")
    _one_line(e)


def test_folder_is_not_a_file(tmp_path):
    with pytest.raises(CellfitError, match="is a folder") as e:
        read_image(tmp_path)
    _one_line(e)


@pytest.mark.parametrize("name", ["cells.png", "cells.txt", "cells.jpg", "cells"])
def test_not_a_tiff_by_name(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CellfitError, match="is not a TIFF file") as e:
        read_image(tmp_path / name)
    _one_line(e)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world\n", b"\x89PNG\r\n\x1a\n" + bytes(100)],
    ids=["empty", "text", "png"],
)
def test_not_a_tiff_inside(tmp_path, content):
    (tmp_path / "x.tif").write_bytes(content)
    with pytest.raises(CellfitError, match="could not be read as a TIFF") as e:
        read_labels(tmp_path / "x.tif")
    _one_line(e)


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_truncated_tiff(tmp_path, compression, keep):
    tifffile.imwrite(tmp_path / "full.tif", _ramp(96, 96), compression=compression)
    raw = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: max(4, int(len(raw) * keep))])
    with pytest.raises(CellfitError, match="truncated or corrupt") as e:
        read_image(tmp_path / "cut.tif")
    _one_line(e)


# ------------------------------------------------------------------ pairing
def _touch_tiffs(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        tifffile.imwrite(folder / n, np.zeros((4, 4), np.uint8))


def test_find_tiffs_sorted_skips_hidden_and_others(tmp_path):
    _touch_tiffs(tmp_path, "b.tif", "a.TIFF", ".hidden.tif")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.tif").mkdir()
    assert [p.name for p in find_tiffs(tmp_path)] == ["a.TIFF", "b.tif"]


def test_expand_inputs(tmp_path):
    _touch_tiffs(tmp_path / "d", "1.tif", "2.tif")
    (tmp_path / "empty").mkdir()
    files = expand_inputs([tmp_path / "d", tmp_path / "d" / "1.tif"])
    assert [p.name for p in files] == ["1.tif", "2.tif", "1.tif"]
    with pytest.raises(CellfitError, match=r"holds no \.tif"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(CellfitError, match="does not exist"):
        expand_inputs([tmp_path / "nowhere"])


def test_pair_folders_by_name_and_suffix(tmp_path):
    _touch_tiffs(tmp_path / "img", "a.tif", "b.tif", "c.tif")
    _touch_tiffs(tmp_path / "lab", "a.tif", "b_labels.tif", "c_mask.tif", "zzz.tif")
    pairs = pair_files([tmp_path / "img"], [tmp_path / "lab"])
    assert [(i.name, lab.name) for i, lab in pairs] == [
        ("a.tif", "a.tif"),
        ("b.tif", "b_labels.tif"),
        ("c.tif", "c_mask.tif"),
    ]


def test_pair_images_and_labels_kept_in_one_folder(tmp_path):
    """cells1.tif next to cells1_labels.tif: the label files are not taken for images
    (this used to fail with "no label file for 1 image(s) (a_labels.tif)")."""
    _touch_tiffs(tmp_path, "a.tif", "a_labels.tif", "b.tif", "b_mask.tif")
    pairs = pair_files([tmp_path], [tmp_path])
    assert [(i.name, lab.name) for i, lab in pairs] == [
        ("a.tif", "a_labels.tif"),
        ("b.tif", "b_mask.tif"),
    ]
    _touch_tiffs(tmp_path, "c.tif")  # an image without labels is still reported
    with pytest.raises(CellfitError, match=r"no label file for 1 image\(s\) \(c.tif\)"):
        pair_files([tmp_path], [tmp_path])


def test_pair_reports_images_without_labels(tmp_path):
    _touch_tiffs(tmp_path / "img", "a.tif", "b.tif")
    _touch_tiffs(tmp_path / "lab", "a.tif")
    with pytest.raises(CellfitError, match=r"no label file for 1 image\(s\) \(b.tif\)"):
        pair_files([tmp_path / "img"], [tmp_path / "lab"])
    _touch_tiffs(tmp_path / "other", "x.tif")
    with pytest.raises(CellfitError, match="no label file matches any image"):
        pair_files([tmp_path / "img"], [tmp_path / "other"])


def test_pair_lists_of_files_in_order(tmp_path):
    _touch_tiffs(tmp_path, "i1.tif", "i2.tif", "l1.tif", "l2.tif")
    pairs = pair_files(
        [tmp_path / "i1.tif", tmp_path / "i2.tif"], [tmp_path / "l1.tif", tmp_path / "l2.tif"]
    )
    assert [(i.name, lab.name) for i, lab in pairs] == [("i1.tif", "l1.tif"), ("i2.tif", "l2.tif")]
    with pytest.raises(CellfitError, match="2 image file"):
        pair_files([tmp_path / "i1.tif", tmp_path / "i2.tif"], [tmp_path / "l1.tif"])


# ------------------------------------------------------------ atomic writes
def test_atomic_write(tmp_path):
    data = _ramp(3, 20, 30)
    out = atomic_write_tiff(tmp_path / "deep" / "o.tif", data)
    assert out.is_file()
    np.testing.assert_array_equal(tifffile.imread(out), data)
    assert [p.name for p in out.parent.iterdir()] == ["o.tif"]


def test_atomic_write_refuses_to_overwrite_when_asked(tmp_path):
    path = tmp_path / "o.tif"
    atomic_write_tiff(path, _ramp(4, 4))
    before = path.read_bytes()
    with pytest.raises(CellfitError, match="already exists"):
        atomic_write_tiff(path, _ramp(5, 5), overwrite=False)
    assert path.read_bytes() == before


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "o.tif"
    atomic_write_tiff(path, _ramp(4, 4))
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever tifffile raises
        atomic_write_tiff(path, np.array([[object()]]))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.tif"]
