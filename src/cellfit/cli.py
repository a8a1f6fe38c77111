"""The ``cellfit`` command line: ``train``, ``predict``, ``evaluate``, ``demo``, ``info``,
``export``, ``devices``.

Every bad input ends with one sentence on stderr (what is wrong, what to do) and exit
status 2, without a traceback. Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellfit import __version__
from cellfit.batch import SUMMARY_NAME, predict_files
from cellfit.checkpoint import resume_path
from cellfit.console import FLAGS, progress_bar, run_training
from cellfit.demo import DEMO_SECONDS, run_demo
from cellfit.devices import describe_devices
from cellfit.errors import CellfitError, fault, worded
from cellfit.export import FORMATS, export_model
from cellfit.io import pair_files, read_image, read_labels
from cellfit.losses import DEFAULT_LOSS
from cellfit.measure import FileSummary, flagged_first
from cellfit.metrics import aggregate_instance_metrics, instance_metrics, pixel_metrics
from cellfit.model import BACKGROUND_COLOR, DEFAULT_ENCODER, ModelInfo, read_model_info
from cellfit.objectclass import rule_text
from cellfit.starting import is_scratch, is_starting, starting_model_path
from cellfit.targets import annotation_from_mask, looks_like_mask
from cellfit.train import CLASSIFY, TrainConfig, Trainer, objects_text, validation_text

__all__ = ["FLAGS", "main"]

EXIT_BAD_INPUT = 2
EXIT_FAILED_FILES = 1
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return v


def _nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or above")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellfit",
        description="Train a U-Net++ from a few painted cells and segment folders of TIFFs.",
    )
    parser.add_argument("--version", action="version", version=f"cellfit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model from images and sparse annotations",
        description="Annotations: 0 = not annotated (ignored), 1 = background, 2, 3, ... = "
        "one id per cell (instances) or class 1, 2, ... (semantic).",
    )
    t.add_argument("images", nargs="+", metavar="IMAGES", help="image TIFFs or a folder of them")
    t.add_argument("--labels", nargs="+", required=True, metavar="LABELS",
                   help="annotation TIFFs or a folder (paired with images by file name)")
    t.add_argument("--out", required=True, metavar="MODEL", help="model file to write")
    t.add_argument("--time-limit", type=_positive_float, metavar="SECONDS",
                   help=f"stop after this many seconds (default {TrainConfig.time_limit:g} "
                   "unless --steps is given)")
    t.add_argument("--steps", type=_positive_int, metavar="N", help="stop after N steps")
    t.add_argument("--init", metavar="MODEL",
                   help="model to fine-tune: 'starting' (cellfit's generalist starting "
                   "model; the default unless --encoder or --encoder-weights is given), "
                   "'scratch' (random weights) or a model file")
    t.add_argument("--distill", type=float, default=TrainConfig.distill, metavar="WEIGHT",
                   help="when fine-tuning, keep unannotated pixels as the starting model "
                   f"predicts them, with this weight (default {TrainConfig.distill:g}; 0 = off)")
    t.add_argument("--loss", default=DEFAULT_LOSS, metavar="NAME",
                   help=f"ce, focal, dice, jaccard, tversky or a sum such as focal+dice (default {DEFAULT_LOSS})")
    t.add_argument("--encoder", metavar="NAME",
                   help=f"encoder of a new U-Net++ (default {DEFAULT_ENCODER}); implies "
                   "--init scratch")
    t.add_argument("--encoder-weights", metavar="imagenet|FILE",
                   help="pretrained encoder weights: 'imagenet' (needs internet) or a local file")
    t.add_argument("--mode", choices=("instances", "semantic"), default="instances")
    t.add_argument("--class-names", action="append", metavar="NAMES",
                   help="semantic mode: the names of the classes painted 2, 3, ... (class 1, "
                   "2, ...), comma-separated or the flag repeated, e.g. "
                   "--class-names nucleus,mitosis,debris; background (1) is 'background'. "
                   "Kept in the model (cellfit info shows them)")
    t.add_argument("--class-colors", action="append", metavar="COLOURS",
                   help="semantic mode: a colour for each of those classes, such as "
                   "'#e6194b,#3cb44b' (default: a palette that tells dozens of classes apart)")
    t.add_argument("--classify", choices=CLASSIFY, default=None,
                   help="semantic mode: 'objects' gives each object found one class, that of "
                   "the painted object it most resembles (classes that are kinds of cell); "
                   "'pixels' gives each pixel its likeliest class (regions, such as kinds of "
                   "tissue); 'auto' (default) chooses objects when you painted whole objects")
    t.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--patch-size", type=_positive_int, default=256, metavar="PIXELS")
    t.add_argument("--batch-size", type=_positive_int, metavar="N")
    t.add_argument("--lr", type=_positive_float, metavar="RATE",
                   help=f"learning rate (default {TrainConfig.lr:g} for a new model, "
                   f"{TrainConfig.finetune_lr:g} when fine-tuning)")
    t.add_argument("--class-weights", default="balanced",
                   help="balanced (default), none, or comma-separated numbers, one per class")
    t.add_argument("--val-every", type=_positive_int, default=50, metavar="STEPS")
    t.add_argument("--overwrite", action="store_true", help="replace MODEL if it exists")
    t.add_argument("--masks", action="store_true",
                   help="LABELS are complete masks (0 = background, 1..N = cells or classes), "
                   "e.g. existing ground truth: every pixel counts as annotated")
    t.add_argument("--resume", action="store_true",
                   help="go on with a training of MODEL that was stopped or killed, where it "
                   "stopped (same files and settings as then): its state is kept in "
                   "MODEL.resume while training runs, and removed when it finishes")
    t.add_argument("--checkpoint-every", type=_nonnegative_float,
                   default=TrainConfig.checkpoint_every, metavar="SECONDS",
                   help="save the state for --resume every SECONDS of training (default "
                   f"{TrainConfig.checkpoint_every:g}; 0 = after every step) and when stopped")

    p = sub.add_parser(
        "predict",
        help="segment TIFF files or folders with a trained model",
        description="Writes DIR/<stem>_labels.tif (and <stem>_prob.tif, "
        "<stem>_uncertainty.tif) for each input, "
        "streaming: stacks slice by slice, huge images tile by tile. A rerun skips files "
        "whose outputs are complete (made by this model from this input); --overwrite "
        "redoes them. Inputs are never modified. --measure adds DIR/<stem>_cells.csv (a "
        "row per cell) and DIR/summary.csv (a row per file, with quality flags).",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a model file, or 'starting' for cellfit's starting model as is")
    p.add_argument("inputs", nargs="+", metavar="INPUTS", help="TIFF files or folders of TIFFs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--probabilities", action="store_true",
                   help="also write <stem>_prob (float32, one channel per class)")
    p.add_argument("--link-slices", action="store_true",
                   help="join per-slice objects of 3D stacks into 3D objects by overlap "
                   "(one id per nucleus through the stack)")
    p.add_argument("--format", choices=("tiff", "zarr"), default="tiff",
                   help="tiff (default; BigTIFF above 4 GB) or zarr (<stem>_labels.zarr)")
    p.add_argument("--compression", choices=("zlib", "zstd", "lzw", "none"), default="zlib",
                   help="TIFF compression (default zlib, which Fiji reads)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo files whose outputs are complete (default: skip them)")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip files whose outputs are complete (the default; kept for old scripts)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on a dask.distributed cluster: scheduler address "
                   "(tcp://host:8786) or scheduler file; default: this machine")
    p.add_argument("--slices-per-task", type=_positive_int, default=64, metavar="N",
                   help="with --scheduler, stacks longer than N slices are split into tasks "
                   "of N slices (default 64)")
    p.add_argument("--diameter", type=_positive_float, metavar="PIXELS",
                   help="cell diameter in pixels, for the starting model (default: "
                   "estimated from the first image); models fine-tuned on painted cells "
                   "know it already")
    p.add_argument("--tta", action="store_true",
                   help="average the prediction over flipped and rotated copies of the "
                   "image: a little more accurate, 4-8 times slower")
    p.add_argument("--uncertainty", action="store_true",
                   help="also write <stem>_uncertainty (float32, 0 = sure to 1 = unsure, "
                   "one value per pixel) showing where the model is unsure, the places "
                   "worth painting next; implies --tta (4-8 times slower); not with "
                   "--scheduler or for single planes too large for memory")
    p.add_argument("--measure", action="store_true",
                   help="measure every cell (position, area, shape, intensities) into "
                   "<stem>_cells.csv beside its labels, and write summary.csv (a row per "
                   "file: cell count, median area and intensity, quality flags); finished "
                   "files are measured from their labels, not predicted again")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--tile", type=_positive_int, default=512, metavar="PIXELS")
    p.add_argument("--overlap", type=int, default=64, metavar="PIXELS")
    p.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                   help="tiles per batch (default: automatic, from free GPU memory on CUDA)")

    e = sub.add_parser("evaluate", help="compare predicted labels with ground truth")
    e.add_argument("predictions", metavar="PREDICTIONS", help="folder or file of predicted labels")
    e.add_argument("truth", metavar="TRUTH", help="folder or file of true labels")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--semantic", action="store_true",
                   help="compare class maps pixel by pixel instead of matching instances")

    d = sub.add_parser("demo", help="train and predict on a bundled sample image, headless")
    d.add_argument("--out", default="cellfit-demo", metavar="DIR")
    d.add_argument("--time-limit", type=_positive_float, default=DEMO_SECONDS, metavar="SECONDS")
    d.add_argument("--device", default="auto")
    d.add_argument("--seed", type=int, default=0)

    i = sub.add_parser("info", help="show a model file's settings and training record")
    i.add_argument("model", metavar="MODEL")
    i.add_argument("--json", action="store_true")

    x = sub.add_parser(
        "export",
        help="write a model for other tools: ONNX, or a bioimage.io model package",
        description="onnx: the network with its softmax (input: the image normalised and "
        "resized as the model says, height and width multiples of 32; output: class "
        "probabilities; the model's settings in the file's metadata). bioimageio: a .zip "
        "for bioimageio.core, deepImageJ or ilastik, with ONNX and TorchScript weights, test "
        "data, a README with the training record and data licences, and the cellfit model "
        "itself, so that cellfit predict and info take the package too. Needs "
        "pip install 'napari-cellfit[export]'.",
    )
    x.add_argument("model", metavar="MODEL",
                   help="a model file, a package cellfit exported, or 'starting'")
    x.add_argument("--format", choices=FORMATS, required=True)
    x.add_argument("--out", required=True, metavar="PATH",
                   help="file to write (.onnx; a .zip for bioimageio)")
    x.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    x.add_argument("--author", action="append", metavar="NAME",
                   help="bioimageio: an author of the package (repeat for several)")
    x.add_argument("--license", metavar="SPDX",
                   help="bioimageio: the package's licence, an SPDX identifier (default "
                   "BSD-3-Clause, cellfit's)")
    x.add_argument("--sample", metavar="TIFF",
                   help="bioimageio: an image whose first plane makes the test data and cover "
                   "(default: a synthetic image with cells of the model's size)")

    sub.add_parser("devices", help="say which devices PyTorch sees and which cellfit would use")
    return parser


# --------------------------------------------------------------------------- train
def _parse_weights(text: str) -> str | list[float]:
    if text in ("balanced", "none"):
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise CellfitError(
            f"--class-weights {text!r} is not understood: use balanced, none, or numbers such as 1,5,5."
        ) from None


def _listed(values: list[str] | None) -> list[str] | None:
    """The items of a repeatable, comma-separated option (None: not given)."""
    if not values:
        return None
    return [item.strip() for value in values for item in value.split(",")]


def _class_settings(args: argparse.Namespace) -> dict:
    """``--class-names`` and ``--class-colors`` as TrainConfig fields (background first)."""
    names, colors = _listed(args.class_names), _listed(args.class_colors)
    if (names or colors) and args.mode != "semantic":
        flag = "--class-names" if names else "--class-colors"
        raise CellfitError(
            f"{flag} is for semantic mode (classes painted 2, 3, ...): add --mode semantic, "
            "or leave it out to segment cells."
        )
    if args.classify is not None and args.mode != "semantic":
        raise CellfitError(
            "--classify is for semantic mode (classes painted 2, 3, ...): add --mode semantic, "
            "or leave it out to segment cells."
        )
    out: dict = {}
    if args.classify is not None:
        out["classify"] = args.classify
    if names is not None:
        out["class_names"] = ["background", *names]
    if colors is not None:
        out["class_colors"] = [BACKGROUND_COLOR, *colors]
    return out


def _time_limit(args: argparse.Namespace) -> float | None:
    """``--time-limit``; without it, the training's default length unless ``--steps``
    is given (then the steps alone end the training)."""
    if args.time_limit is not None:
        return args.time_limit
    return None if args.steps is not None else TrainConfig.time_limit


def cmd_train(args: argparse.Namespace) -> int:
    classes = _class_settings(args)  # a flag of the wrong mode: said before reading files
    fresh = args.encoder is not None or args.encoder_weights is not None
    if args.init is None:
        args.init = "scratch" if fresh else "starting"
    elif fresh and not is_scratch(args.init):
        raise CellfitError(
            "--encoder and --encoder-weights build a new network, but --init fine-tunes an "
            "existing one: give one of them (or --init scratch)."
        )
    out = Path(args.out)
    checkpoint = resume_path(out)
    if args.resume and not checkpoint.is_file():
        raise CellfitError(
            f"there is no interrupted training of {out} to resume ({checkpoint} does not "
            "exist: it is removed when training finishes): run the command without --resume."
        )
    if out.exists() and not args.overwrite and not args.resume and not (
        args.init and not is_starting(args.init) and Path(args.init) == out
    ):
        more = " or --resume to go on with its interrupted training" if checkpoint.is_file() else ""
        raise CellfitError(
            f"{out} already exists: choose another --out, or add --overwrite to replace "
            f"it{more}."
        )
    if out.exists() and out.is_dir():
        raise CellfitError(f"--out {out} is a folder: give a file name such as {out / 'model.cellfit'}.")
    pairs = pair_files(args.images, args.labels)
    images, anns = [], []
    for img_path, lab_path in pairs:
        stack = read_image(img_path)
        images.append(stack)
        ann = read_labels(lab_path, stack.labels_shape)
        if args.masks:
            ann = annotation_from_mask(ann)
        elif looks_like_mask(ann):
            print(f"cellfit: note: {lab_path.name} looks like a complete mask (0 = background, "
                  "1..N = cells), but cellfit reads 0 as not annotated and 1 as background; "
                  "if it is a mask, add --masks.", file=sys.stderr)
        anns.append(ann)
    cfg = TrainConfig(
        mode=args.mode,
        encoder=args.encoder or DEFAULT_ENCODER,
        loss=args.loss,
        class_weights=_parse_weights(args.class_weights),
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        steps=args.steps,
        time_limit=_time_limit(args),
        lr=args.lr or TrainConfig.lr,
        finetune_lr=args.lr or TrainConfig.finetune_lr,
        val_every=args.val_every,
        seed=args.seed,
        device=args.device,
        init=args.init,
        distill=args.distill,
        encoder_weights=args.encoder_weights,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        **classes,
    )
    if checkpoint.is_file() and not args.resume:
        print(f"cellfit: note: {checkpoint} holds an interrupted training of {out}; this new "
              "training replaces it (add --resume to go on with that one instead).",
              file=sys.stderr)
    trainer = Trainer(images, anns, cfg)
    s = trainer.summary
    print(
        f"Training on {s['planes']} annotated plane(s) of {len(pairs)} image(s): {s['cells']} "
        f"cell(s)/object(s), {s['background_pixels']} background pixels; device {trainer.device}"
        + (
            ", fine-tuning cellfit's starting model"
            if is_starting(args.init) and trainer.init is not None
            else (f", fine-tuning {trainer.init}" if trainer.init is not None else ", from scratch")
        )
        + ("." if not trainer.split.on_training else
           "; fewer than 5 cells, so validation uses the training annotation."),
        file=sys.stderr,
    )
    if args.resume:
        print(f"Resuming the interrupted training from {checkpoint} at step {trainer.step}.",
              file=sys.stderr)
    every = f"every {args.checkpoint_every:g} s" if args.checkpoint_every else "after every step"
    print(f"Progress is saved to {checkpoint} {every}: if training is interrupted, run the "
          "same command with --resume to go on (Ctrl-C stops after the current step).",
          file=sys.stderr)
    completed = run_training(trainer)
    trainer.save(out)
    rec = trainer.info.training[-1]
    val = rec.get("validation") or {}
    # the same words as the dock's Train tab, then the other pixel figures
    checked = validation_text(rec) or "Validation: not run"
    names = {"precision": "precision", "recall": "recall", "iou": "IoU"}
    figures = ", ".join(f"{names[k]} {val[k]:.3f}" for k in names if k in val)
    if figures:
        checked += f". At step {rec['best_step']}, pixel {figures}"
    if objects_text(rec):
        checked += f". {objects_text(rec)}"
    status = "Finished" if completed else "Interrupted; kept the best model so far"
    print(
        f"{status}: {rec['steps']} steps in {rec['seconds']:.0f} s. {checked}."
        f"\nSaved model to {out}",
        file=sys.stderr,
    )
    if not completed and checkpoint.is_file():
        print(f"To go on from step {trainer.step}, run the same command with --resume (the "
              f"state is in {checkpoint}).", file=sys.stderr)
    return 0 if completed else EXIT_INTERRUPTED


# ------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    if args.overwrite and args.skip_existing:
        raise CellfitError(
            "--overwrite and --skip-existing contradict each other: give one of them "
            "(complete outputs are skipped by default)."
        )
    events = predict_files(
        args.model,
        args.inputs,
        args.out,
        probabilities=args.probabilities,
        overwrite=args.overwrite,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        link_slices=args.link_slices,
        format=args.format,
        compression=args.compression,
        scheduler=args.scheduler,
        slices_per_task=args.slices_per_task,
        diameter=args.diameter,
        tta=args.tta,
        measure=args.measure,
        uncertainty=args.uncertainty,
    )
    failed: list[tuple[Path, str]] = []
    summaries: list[FileSummary] = []
    done = skipped = 0
    files_bar = inner = None
    current = None
    spread = args.scheduler is not None  # events of many files interleave
    planes_done: dict[int, int] = {}
    try:
        for ev in events:
            if files_bar is None:
                # in a log: a line per file
                files_bar = progress_bar(every=0, total=ev.n_files, desc="files",
                                         unit="file", position=0)
                # the second bar only on a terminal (in a log it would garble the lines)
                inner = tqdm(total=0, desc="slices", unit="slice", position=1, leave=False,
                             disable=None)
            if ev.notice:
                tqdm.write(f"cellfit: note: {ev.path.name}: {worded(ev.notice, FLAGS)}",
                           file=sys.stderr)
            if ev.status == "plane":
                if spread:  # one bar over the slices of all files
                    if ev.index not in planes_done:
                        planes_done[ev.index] = 0
                        inner.total += ev.n_planes
                    inner.update(ev.plane - planes_done[ev.index])
                    planes_done[ev.index] = ev.plane
                    inner.refresh()
                    continue
                if ev.index != current:
                    current = ev.index
                    inner.reset(total=ev.n_planes)
                    inner.set_description_str(ev.path.name)
                if ev.tiles_total and ev.n_planes == 1:  # one huge plane: tiles
                    inner.unit = "tile"
                    inner.total = ev.tiles_total
                    inner.n = ev.tiles_done
                else:
                    inner.unit = "slice"
                    inner.total = ev.n_planes
                    inner.n = ev.plane
                inner.refresh()
                continue
            files_bar.update(1)
            if ev.summary is not None:
                summaries.append(ev.summary)
            if ev.status == "done":
                done += 1
            elif ev.status == "skipped":
                skipped += 1
            elif ev.status == "failed":
                why = worded(ev.error, FLAGS) if ev.error is not None else "unknown error"
                failed.append((ev.path, why))
                tqdm.write(f"cellfit: {ev.path}: {why}", file=sys.stderr)
    except KeyboardInterrupt:
        events.close()  # aborts the file in progress: its temporaries are removed
        for bar in (inner, files_bar):
            if bar is not None:
                bar.close()
        print(
            f"cellfit: interrupted after {done} file(s); the file in progress was discarded "
            "(finished outputs are complete, nothing is half-written): run the same command "
            "again to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    for bar in (inner, files_bar):
        if bar is not None:
            bar.close()
    summary = f"{done} file(s) segmented into {args.out}"
    if skipped:
        summary += f", {skipped} skipped (complete outputs exist; --overwrite redoes them)"
    if failed:
        summary += f", {len(failed)} failed: " + "; ".join(f"{p.name}" for p, _ in failed)
    print(summary + ".", file=sys.stderr)
    if args.measure:
        print(quality_report(summaries, Path(args.out)), file=sys.stderr)
    return EXIT_FAILED_FILES if failed else 0


#: most flagged files the quality report lists (the rest: summary.csv)
REPORT_FILES = 10


def quality_report(summaries: Sequence[FileSummary], out: Path) -> str:
    """The lines printed after ``cellfit predict --measure``: where the tables are, and
    the flagged files, most suspicious first."""
    lines = [f"Measurements: {out / '<name>_cells.csv'} per file, {out / SUMMARY_NAME} "
             "for the run."]
    flagged = flagged_first(summaries)
    if not flagged:
        measured = sum(1 for s in summaries if s.error is None)
        lines.append(f"Quality: nothing unusual in the {measured} measured file(s).")
        return "\n".join(lines)
    lines.append(f"Quality: {len(flagged)} file(s) to check first:")
    for s in flagged[:REPORT_FILES]:
        lines.append(f"  {s.file}: " + "; ".join(f.text for f in s.flags) + ".")
    if len(flagged) > REPORT_FILES:
        lines.append(f"  ... and {len(flagged) - REPORT_FILES} more (the flags column of "
                     f"{SUMMARY_NAME}).")
    return "\n".join(lines)


# ------------------------------------------------------------------------ evaluate
def evaluate_pairs(pairs, semantic: bool = False) -> dict:
    """Metrics for ``(truth_path, pred_path)`` pairs: per image and pooled."""
    rows = []
    per = []
    preds_all, truth_all = [], []
    for truth_path, pred_path in pairs:
        truth = read_labels(truth_path)
        pred = read_labels(pred_path, truth.shape)
        if semantic:
            preds_all.append(pred.ravel())
            truth_all.append(truth.ravel())
            continue
        flat_t = truth.reshape(-1, *truth.shape[-2:])
        flat_p = pred.reshape(-1, *pred.shape[-2:])
        m_planes = [instance_metrics(p, t) for p, t in zip(flat_p, flat_t)]
        agg = aggregate_instance_metrics(m_planes)
        per.extend(m_planes)
        pm = pixel_metrics((pred > 0).astype(np.uint8), (truth > 0).astype(np.uint8), 2,
                           ["background", "cell"])["cell"]
        rows.append({"image": truth_path.name, "prediction": pred_path.name,
                     **{k: agg[k] for k in ("ap50", "f1_50", "precision_50", "recall_50", "ap50_95")},
                     "pixel_f1": pm["f1"], "pixel_iou": pm["iou"],
                     "n_true": agg["per_threshold"][0.5]["tp"] + agg["per_threshold"][0.5]["fn"],
                     "n_pred": agg["per_threshold"][0.5]["tp"] + agg["per_threshold"][0.5]["fp"]})
    if semantic:
        p = np.concatenate(preds_all)
        t = np.concatenate(truth_all)
        k = int(max(p.max(), t.max())) + 1
        return {"pixel": pixel_metrics(p, t, k, ["background"] + [f"class {i}" for i in range(1, k)],
                                       ignore_index=-1)}
    total = aggregate_instance_metrics(per)
    total = {k: v for k, v in total.items() if k != "per_threshold"} | {
        "per_threshold": {str(k): v for k, v in total["per_threshold"].items()}
    }
    return {"images": rows, "total": total}


def cmd_evaluate(args: argparse.Namespace) -> int:
    pairs = pair_files([args.truth], [args.predictions])
    result = evaluate_pairs(pairs, args.semantic)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if args.semantic:
        print(f"{'class':<12}{'precision':>10}{'recall':>8}{'F1':>8}{'IoU':>8}{'pixels':>10}")
        for name, m in result["pixel"].items():
            print(f"{name:<12}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}{m['iou']:>8.3f}{m['support']:>10d}")
        return 0
    head = f"{'image':<24}{'AP@0.5':>8}{'F1@0.5':>8}{'prec.':>8}{'recall':>8}{'AP50:95':>9}{'true':>6}{'pred':>6}"
    print(head)
    for r in result["images"]:
        print(f"{r['image'][:23]:<24}{r['ap50']:>8.3f}{r['f1_50']:>8.3f}{r['precision_50']:>8.3f}"
              f"{r['recall_50']:>8.3f}{r['ap50_95']:>9.3f}{r['n_true']:>6d}{r['n_pred']:>6d}")
    t = result["total"]
    print(f"{'all (pooled)':<24}{t['ap50']:>8.3f}{t['f1_50']:>8.3f}{t['precision_50']:>8.3f}"
          f"{t['recall_50']:>8.3f}{t['ap50_95']:>9.3f}")
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.out), time_limit=args.time_limit, device=args.device, seed=args.seed)


# ---------------------------------------------------------------------------- info
def class_lines(info: ModelInfo, width: int = 88) -> list[str]:
    """The classes of a semantic model for ``cellfit info``: "value name colour" for
    each, one a line up to 12 classes, else as many to a line as fit in ``width``
    (painted value k + 1 is class k; background is painted 1)."""
    items = [f"{k + 1}: {name} {color}"
             for k, (name, color) in enumerate(zip(info.class_names, info.colors()))]
    if len(items) <= 12:
        return items
    lines, line = [], ""
    for item in items:
        if line and len(line) + 3 + len(item) > width - 12:
            lines.append(line)
            line = ""
        line = f"{line}   {item}" if line else item
    return [*lines, line] if line else lines


def class_rule_text(info: ModelInfo) -> str:
    """How a semantic model decides classes, in words (``cellfit info``)."""
    return rule_text(info.postprocess.get("objects"))


def cmd_info(args: argparse.Namespace) -> int:
    if is_starting(args.model):
        args.model = starting_model_path()
    info = read_model_info(args.model)
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    norm = info.normalization
    norm_text = (
        f"percentiles {norm.get('low')}-{norm.get('high')} of each image mapped to 0-1"
        if norm.get("method", "percentile") == "percentile"
        else str(norm.get("method"))
    )
    print(f"model       {args.model}")
    print(f"network     U-Net++ / {info.encoder}, {info.in_channels} channel(s) in")
    if info.mode == "semantic":
        print(f"mode        semantic: {info.n_classes - 1} class"
              f"{'es' if info.n_classes != 2 else ''} and background (painted value: name "
              "colour; a predicted class map holds the painted value minus 1)")
        for line in class_lines(info):
            print(f"            {line}")
    else:
        print(f"mode        {info.mode}: {', '.join(info.class_names)}")
    print(f"normalise   {norm_text}")
    if info.cell_diameter and not info.diameter:
        print(f"cell size   any: images are resized so cells are {info.cell_diameter:g} px "
              "across (give --diameter to predict, or fine-tune on painted cells)")
    elif abs(info.scale - 1.0) > 1e-6 or info.diameter:
        across = f"{info.diameter:g} px" if info.diameter else "large"
        print(f"scale       images are resized by {info.scale:g} before the network "
              f"(cells {across} across brought to ~{info.cell_diameter or 30:g} px)")
    if info.mode == "semantic":
        print(f"classes     {class_rule_text(info)}")
    if info.postprocess.get("min_size"):
        print(f"min. size   objects under {info.postprocess['min_size']} pixels are dropped "
              "(under a quarter of that on the image edge)")
    if "fg_threshold" in info.postprocess or "seed_threshold" in info.postprocess:
        print(f"thresholds  a pixel is cell above {info.postprocess.get('fg_threshold', 0.5):g} "
              f"probability, a cell's centre above {info.postprocess.get('seed_threshold', 0.5):g}")
    if info.postprocess.get("split_area"):
        print(f"touching    the painted cells are convex: a blob larger than one cell "
              f"({info.postprocess['split_area']} pixels) with a waist is cut in two")
    for k, rec in enumerate(info.training, 1):
        val = rec.get("validation") or {}
        names = {"precision": "precision", "recall": "recall", "f1": "F1", "ap50": "AP@0.5"}
        figs = ", ".join(f"{names[n]} {val[n]:.3f}" for n in names if n in val)
        ann = rec.get("annotation", {})
        print(f"training {k}  {rec.get('date')}: {rec.get('steps')} steps, {rec.get('seconds')} s on "
              f"{rec.get('device')}; {ann.get('cells')} cells annotated; validation: {figs or 'n/a'}")
        if rec.get("purpose"):
            print(f"            {rec['purpose']}")
        if rec.get("guard"):
            print(f"            {rec['guard']}")
        elif rec.get("guard_scores"):
            g = rec["guard_scores"]
            print(f"            checked on the held-back cells: score {g['trained']:.3f} against "
                  f"{g['start']:.3f} for the model it started from, so the trained model was kept")
        if rec.get("calibration"):
            c = rec["calibration"]
            chosen = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in c["chosen"].items())
            print(f"            post-processing chosen on the held-back cells: {chosen} "
                  f"(AP@0.5 {c['score']:.3f} against {c['default_score']:.3f} before)")
        for item in rec.get("data", []):
            print(f"            data: {item.get('name')} (licence: {item.get('licence')})")
    return 0


# -------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    model = starting_model_path() if is_starting(args.model) else args.model
    if args.format == "onnx" and (args.author or args.license or args.sample):
        raise CellfitError(
            "--author, --license and --sample are for --format bioimageio: leave them out "
            "for ONNX."
        )
    extra = {}
    if args.format == "bioimageio":
        extra = {"authors": args.author, "license": args.license, "sample": args.sample}
    out = export_model(model, args.out, args.format, overwrite=args.overwrite, **extra)
    what = "ONNX model" if args.format == "onnx" else "bioimage.io model package"
    print(f"Wrote the {what} {out}.", file=sys.stderr)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    print(describe_devices())
    return 0


COMMANDS = {
    "train": cmd_train,
    "predict": cmd_predict,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "info": cmd_info,
    "export": cmd_export,
    "devices": cmd_devices,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return COMMANDS[args.command](args)
    except CellfitError as exc:
        print(f"cellfit: error: {exc.worded(FLAGS)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("cellfit: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so plainly, details on request
        if os.environ.get("CELLFIT_DEBUG"):
            raise
        print(f"cellfit: internal error: {fault(exc, 'the command')}", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
