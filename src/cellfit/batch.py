"""Prediction over many files: the engine function behind ``cellfit predict`` and the
plugin's batch button.

Inputs are never modified or overwritten; each output is written to a temporary name
and renamed when complete; one bad file is reported and the batch goes on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellfit.errors import CellfitError
from cellfit.io import atomic_write_tiff, expand_inputs, read_image
from cellfit.model import load_model
from cellfit.postprocess import labels_from_probs
from cellfit.predict import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    iter_predict,
    prepare_planes,
    resolve_device,
)

__all__ = ["FileEvent", "label_dtype", "output_paths", "predict_files"]


@dataclass
class FileEvent:
    """Progress of a batch: one event per finished plane, and one per finished file.

    ``status`` is ``"plane"`` while a file is in progress, then ``"done"``,
    ``"skipped"`` (complete outputs exist) or ``"failed"`` (``error`` says why).
    """

    index: int
    n_files: int
    path: Path
    status: str
    plane: int = 0
    n_planes: int = 1
    outputs: tuple[Path, ...] = ()
    error: str | None = None


def label_dtype(max_label: int) -> type:
    """Smallest unsigned dtype that holds ``max_label``."""
    if max_label < 2**8:
        return np.uint8
    if max_label < 2**16:
        return np.uint16
    return np.uint32


def output_paths(path: Path, out_dir: Path) -> tuple[Path, Path]:
    """``(<out>/<stem>_labels.tif, <out>/<stem>_prob.tif)`` for an input file."""
    return out_dir / f"{path.stem}_labels.tif", out_dir / f"{path.stem}_prob.tif"


def _check_out_dir(files: Sequence[Path], out_dir: Path) -> None:
    out_r = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise CellfitError(f"output {out_dir} is a file: give a folder for the results.")
    for f in files:
        if f.resolve().parent == out_r:
            raise CellfitError(
                f"the output folder {out_dir} is the folder of the input {f.name}: choose a "
                "separate output folder so inputs are never overwritten."
            )


def _unique_outputs(files: Sequence[Path], out_dir: Path) -> list[Path]:
    """Drop repeats of the same file; refuse two files that would write the same outputs."""
    seen: dict[str, Path] = {}
    unique = []
    for f in files:
        key = f.stem.lower()  # case-insensitive file systems collide too
        other = seen.get(key)
        if other is None:
            seen[key] = f
            unique.append(f)
        elif other.resolve() != f.resolve():
            raise CellfitError(
                f"the inputs {other} and {f} would both be written to the same output "
                f"{output_paths(f, out_dir)[0].name}: rename one of them or predict them "
                "into separate output folders."
            )
    return unique


def predict_files(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    probabilities: bool = False,
    overwrite: bool = True,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 4,
    device: str = "auto",
    postprocess: dict | None = None,
) -> Iterator[FileEvent]:
    """Predict every TIFF in ``inputs`` (files or folders) into ``out_dir``.

    Yields a :class:`FileEvent` after each plane and each file. Bad files yield a
    ``"failed"`` event and the batch goes on.
    """
    files = expand_inputs(inputs, "input")
    out_dir = Path(out_dir)
    _check_out_dir(files, out_dir)
    files = _unique_outputs(files, out_dir)
    dev = resolve_device(device)
    model, info = load_model(model_path, dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        lab_path, prob_path = output_paths(f, out_dir)
        wanted = (lab_path, prob_path) if probabilities else (lab_path,)
        if not overwrite and all(p.exists() for p in wanted):
            yield FileEvent(i, len(files), f, "skipped", outputs=wanted)
            continue
        try:
            stack = read_image(f)
            planes, stats = prepare_planes(stack, info)
            labels = np.zeros((stack.n_planes, *stack.plane_shape), np.uint32)
            probs_all = (
                np.zeros((stack.n_planes, info.n_classes, *stack.plane_shape), np.float32)
                if probabilities
                else None
            )
            for ev in iter_predict(
                model, info, planes, stats, tile=tile, overlap=overlap,
                batch_size=batch_size, device=dev,
            ):
                if ev.probabilities is None:
                    continue
                labels[ev.plane] = labels_from_probs(
                    ev.probabilities, info.mode, **{**info.postprocess, **(postprocess or {})}
                )
                if probs_all is not None:
                    probs_all[ev.plane] = ev.probabilities
                yield FileEvent(i, len(files), f, "plane", ev.plane + 1, ev.n_planes)
            labels_out = labels.reshape(stack.labels_shape).astype(label_dtype(int(labels.max())))
            atomic_write_tiff(lab_path, labels_out, resolution=stack.resolution)
            written = [lab_path]
            if probs_all is not None:
                shape = (*stack.lead_shape, info.n_classes, *stack.plane_shape)
                atomic_write_tiff(prob_path, probs_all.reshape(shape), resolution=stack.resolution)
                written.append(prob_path)
            yield FileEvent(i, len(files), f, "done", outputs=tuple(written))
        except CellfitError as exc:
            yield FileEvent(i, len(files), f, "failed", error=str(exc))
        except MemoryError:
            yield FileEvent(
                i, len(files), f, "failed",
                error=f"{f.name} is too large for this machine's memory: use a smaller --tile "
                "or split the stack.",
            )
