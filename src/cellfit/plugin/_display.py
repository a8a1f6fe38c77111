"""What the dock widget shows, apart from its controls: layer colours, the model record
in words, and whether the CPU draws the window (no Qt widgets are built here)."""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path

import numpy as np
from napari.utils.colormaps import (
    Colormap,
    CyclicLabelColormap,
    DirectLabelColormap,
    label_colormap,
)

from cellfit.model import ModelInfo
from cellfit.objectclass import rule_text

__all__ = [
    "ENCODERS",
    "STARTING_PURPOSE",
    "annotation_colormap",
    "class_map_colormap",
    "encoder_name",
    "model_record_html",
    "number",
    "opengl_renderer",
    "probability_colormap",
    "semantic_annotation_colormap",
    "software_opengl",
    "user_runs",
]

ENCODERS = [
    ("mobilenet_v2", "Small (MobileNet V2)"),
    ("resnet18", "Medium (ResNet-18)"),
    ("resnet34", "Large (ResNet-34)"),
]
BACKGROUND_COLOR = (0.35, 0.55, 0.85, 0.45)  # label 1: a quiet, see-through blue

_COLORMAP: CyclicLabelColormap | None = None


def annotation_colormap() -> CyclicLabelColormap:
    """napari's usual label colours for cells, a quiet see-through blue for background (1).

    The colours cycle every 65534 ids, so no cell id of a 16-bit annotation ever
    takes the background colour.
    """
    global _COLORMAP
    if _COLORMAP is None:
        base = label_colormap(49).colors
        n = 2**16 - 1
        colors = np.concatenate([base[:1], np.resize(base[1:], (n - 1, 4))])
        colors[1] = BACKGROUND_COLOR
        _COLORMAP = CyclicLabelColormap(colors=colors)
    return _COLORMAP


#: the colour of painted values no class is named for yet (semantic mode)
UNNAMED_COLOR = (0.6, 0.6, 0.6, 1.0)


def _rgba(color: str, alpha: float = 1.0) -> tuple[float, float, float, float]:
    """``"#rrggbb"`` as RGBA floats."""
    return (int(color[1:3], 16) / 255, int(color[3:5], 16) / 255, int(color[5:7], 16) / 255, alpha)


def semantic_annotation_colormap(colors: list[str]) -> DirectLabelColormap:
    """The annotation's colours in semantic mode: 0 transparent, 1 background (its
    colour, see-through), value k + 1 the colour of class k (``colors``: one per class,
    background first); values beyond them grey."""
    mapping: dict = {None: UNNAMED_COLOR, 0: (0.0, 0.0, 0.0, 0.0)}
    mapping[1] = _rgba(colors[0], BACKGROUND_COLOR[3])
    for k, color in enumerate(colors[1:], 1):
        mapping[k + 1] = _rgba(color)
    return DirectLabelColormap(color_dict=mapping)


def class_map_colormap(colors: list[str]) -> DirectLabelColormap:
    """A predicted class map's colours: 0 (background) transparent, class k the colour
    of class k (``colors``: one per class, background first)."""
    mapping: dict = {None: UNNAMED_COLOR, 0: (0.0, 0.0, 0.0, 0.0)}
    for k, color in enumerate(colors[1:], 1):
        mapping[k] = _rgba(color)
    return DirectLabelColormap(color_dict=mapping)


_SOFTWARE_GL_NAMES = ("llvmpipe", "softpipe", "swrast", "swiftshader", "software rasterizer",
                      "basic render driver", "gdi generic")
_RENDERER: str | None = None


def opengl_renderer() -> str:
    """The OpenGL renderer of this session, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"
    ("" when it cannot be asked)."""
    global _RENDERER
    if _RENDERER is None:
        _RENDERER = ""
        try:
            # deferred: PyOpenGL is optional (no OpenGL to ask: the except below), and
            # this module builds no Qt objects until the dock asks
            from OpenGL import GL
            from qtpy.QtGui import QOffscreenSurface, QOpenGLContext

            if QOpenGLContext.currentContext() is not None:  # napari's canvas: just ask
                _RENDERER = (GL.glGetString(GL.GL_RENDERER) or b"").decode(errors="replace")
            else:  # a throw-away context, released after (no other one was current)
                ctx = QOpenGLContext()
                if ctx.create():
                    surface = QOffscreenSurface()
                    surface.setFormat(ctx.format())
                    surface.create()
                    if ctx.makeCurrent(surface):
                        name = GL.glGetString(GL.GL_RENDERER) or b""
                        _RENDERER = name.decode(errors="replace")
                        ctx.doneCurrent()
        except Exception:  # no OpenGL to ask: assume a GPU draws the window
            _RENDERER = ""
    return _RENDERER


def software_opengl() -> bool:
    """Whether the window is drawn by the CPU (remote desktops, VMs, Xvfb).

    There every repaint of the window costs tens of milliseconds, and napari's
    activity indicator (a spinner shown while any napari progress bar is open) repaints
    continuously: it slows the event loop and the training thread several-fold (see
    docs/plugin.md). Jobs then report progress in the dock only.
    """
    name = opengl_renderer().lower()
    return any(word in name for word in _SOFTWARE_GL_NAMES)


def probability_colormap() -> Colormap:
    """Transparent at 0, magenta at 1: the image stays visible under low probabilities."""
    return Colormap([[0.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.9, 1.0]], name="cell probability")


def number(n: int) -> str:
    return f"{n:,}"


def encoder_name(encoder: str) -> str:
    for value, text in ENCODERS:
        if value == encoder:
            return f"U-Net++, {text.split(' (')[0].lower()} ({encoder})"
    return f"U-Net++ ({encoder})"


#: how the ``purpose`` of the starting model's own training records begins (a version
#: may follow: "… starting model v2")
STARTING_PURPOSE = "cellfit generalist starting model"


def is_pretraining(rec: dict) -> bool:
    """True for a run of the starting model's pretraining (any version)."""
    return str(rec.get("purpose") or "").startswith(STARTING_PURPOSE)


def user_runs(training: list[dict]) -> int:
    """How many training runs were on the user's cells (not the starting model's
    pretraining)."""
    return sum(not is_pretraining(rec) for rec in training)


def model_record_html(info: ModelInfo | None, path: Path | None, saved: bool) -> str:
    """The Model tab's text: what the model is and how it was trained, in words."""
    if info is None:
        return (
            "<p><b>No model yet.</b></p><p>Train one in the Train tab, or load a .cellfit "
            "file. A model file holds the network and its training record; it opens "
            "without running any code.</p>"
        )
    esc = html.escape
    classes = ", ".join(esc(c) for c in info.class_names)
    kind = "cells (instances)" if info.mode == "instances" else "classes (semantic)"
    where = esc(str(path)) if path else "not saved yet"
    if path and not saved:
        where += " (trained further since it was saved)"
    out = [
        f"<p><b>{esc(encoder_name(info.encoder))}</b><br>"
        f"Segments {kind}; classes: {classes}; {info.in_channels} input channel"
        f"{'s' if info.in_channels != 1 else ''}.<br>File: {where}</p>"
    ]
    notes = []
    scale = float(getattr(info, "scale", 1.0) or 1.0)
    if abs(scale - 1.0) > 1e-6:
        notes.append(f"Images are resized ×{scale:.2g} before the network (set from the size "
                     "of the annotated cells).")
    if getattr(info, "cell_diameter", None) and not getattr(info, "diameter", None):
        notes.append("Works on cells of any size: it must be told their diameter in pixels "
                     "(Segment tab), until it is trained on your painted cells.")
    elif getattr(info, "cell_diameter", None):
        notes.append(f"Set for cells about {float(info.diameter):g} pixels across (from the "
                     "annotated cells).")
    min_size = (getattr(info, "postprocess", None) or {}).get("min_size")
    if min_size:
        notes.append(f"Objects smaller than {int(min_size)} pixels are dropped.")
    if info.mode == "semantic":
        objects = (getattr(info, "postprocess", None) or {}).get("objects")
        how = "by whole objects" if objects else "pixel by pixel"
        notes.append(f"Classes {how}: {rule_text(objects)}.")
    if (getattr(info, "postprocess", None) or {}).get("split_area"):
        notes.append("Your cells are round, so two touching cells found as one blob are "
                     "cut apart at their waist.")
    if notes:
        out.append("<p>" + " ".join(notes) + "</p>")
    if not info.training:
        out.append("<p>No training record in this file.</p>")
    n = user_runs(info.training) + 1
    for rec in reversed(info.training):
        n -= not is_pretraining(rec)  # the user's runs, counted from 1
        date = _local_date(rec.get("date"))
        if is_pretraining(rec):
            data = ", ".join(f"{number(int(v))} {esc(str(kind))}"
                             for kind, v in (rec.get("data_counts") or {}).items())
            out.append(
                f"<p><b>Pretraining</b> (cellfit's starting model, not your images): "
                f"{rec.get('steps', '?')} steps on {data or 'synthetic images'}</p>"
            )
            continue
        val = rec.get("validation") or {}
        ann = rec.get("annotation") or {}
        scores = ", ".join(
            f"{name} {val[key]:.2f}"
            for key, name in (("f1", "F1"), ("ap50", "AP50"), ("precision", "precision"),
                              ("recall", "recall"), ("iou", "IoU"))
            if isinstance(val.get(key), (int, float))
        )
        how = "fine-tuned" if (rec.get("init") or n > 1) else "trained from scratch"
        if rec.get("init") == "cellfit starting model":
            how = "fine-tuned from the cellfit starting model"
        stopped = ", stopped early" if rec.get("stopped_early") else ""
        out.append(
            f"<p><b>Run {n}</b>: {esc(date)}, {how}<br>"
            f"{rec.get('steps', '?')} steps in {rec.get('seconds', 0):.0f} s on "
            f"{esc(str(rec.get('device', '?')))}{stopped}<br>"
            f"Validation ({esc(str(rec.get('validated_on', '?')))}): {scores or 'not run'}<br>"
            f"Annotation: {number(int(ann.get('cells', 0)))} cells, "
            f"{number(int(ann.get('background_pixels', 0)))} background pixels in "
            f"{ann.get('planes', 0)} slice{'s' if ann.get('planes', 0) != 1 else ''}</p>"
        )
    return "\n".join(out)


def _local_date(text: str | None) -> str:
    if not text:
        return "date unknown"
    try:
        return datetime.fromisoformat(text).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return text
