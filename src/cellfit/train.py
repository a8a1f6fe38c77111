"""Training: a generator of progress events that can be stopped between steps.

>>> trainer = Trainer(images, annotations, TrainConfig(steps=200))   # doctest: +SKIP
>>> for event in trainer.run():                                       # doctest: +SKIP
...     print(event.step, event.loss, event.validation)
>>> trainer.save("cells.cellfit")                                     # doctest: +SKIP

The same generator is drained by the CLI (with a tqdm bar) and by the napari plugin
(inside a ``thread_worker``), and by the tests, synchronously.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from cellfit.errors import CellfitError
from cellfit.io import ImageStack, to_planes
from cellfit.losses import DEFAULT_LOSS, balanced_class_weights, build_loss
from cellfit.metrics import aggregate_instance_metrics, instance_metrics, pixel_metrics
from cellfit.model import (
    DEFAULT_DECODER_CHANNELS,
    DEFAULT_ENCODER,
    ModelInfo,
    build_model,
    load_model,
    package_versions,
    save_model,
)
from cellfit.normalize import (
    DEFAULT_NORMALIZATION,
    match_channels,
    normalize,
    resize_plane,
    scaled_shape,
)
from cellfit.postprocess import instances_from_probs, solidity
from cellfit.predict import iter_predict, resolve_device
from cellfit.sampling import DEFAULT_FG_FRACTION, PatchSampler, split_annotations
from cellfit.starting import (
    MIN_SIZE_FRACTION,
    is_scratch,
    is_starting,
    scale_for,
    starting_model_path,
    starting_model_problem,
)
from cellfit.targets import IGNORE, INSTANCE_CLASSES, class_counts, make_targets, n_classes_for

__all__ = ["TrainConfig", "TrainEvent", "Trainer", "annotation_summary", "train"]


@dataclass
class TrainConfig:
    """Settings of one training run (all have working defaults).

    Attributes
    ----------
    mode : {"instances", "semantic"}
    steps, time_limit : int, float or None
        Stop after this many steps and/or seconds (whichever comes first). With
        neither, 500 steps.
    init : path, optional
        A model file to fine-tune instead of starting from random weights.
    encoder_weights : {"imagenet"} or path, optional
        Pretrained encoder weights for a fresh model.
    class_weights : "balanced", "none" or a list of floats
    fg_fraction : float
        Share of patches centred on a cell pixel.
    val_fraction : float
        Share of annotated cells held back for validation (none if fewer than 5 cells).
    val_every : int
        Validate every this many steps (and at the end).
    min_val_cells_for_best : int
        The best validated weights are kept only when at least this many cells were
        held back; with fewer, validation is too noisy to pick a checkpoint and the
        final weights are kept.
    encoder_lr_scale : float
        Learning rate of the encoder relative to the decoder (below 1 keeps a
        pretrained encoder close to where it started).
    scale : "auto" or float
        Resize factor applied to images before the network (model pixels per image
        pixel), stored in the model and applied again at prediction. "auto" shrinks
        images whose annotated cells are larger than ``1.5 * cell_diameter`` pixels
        across (median) so they become ``cell_diameter`` across: large cells then get
        more context per patch and training and prediction run faster. Never enlarges.
    min_size_fraction : float
        Predicted objects smaller than this fraction of the median annotated cell
        area are dropped (stored in the model; at least 16 pixels; objects cut by the
        image edge are kept down to a quarter of it). A quarter of a cell: cells of one
        kind seldom differ more than twofold in diameter, and smaller specks are debris.
    split_solidity : float
        When the annotated cells are this convex (median area / convex hull area), like
        nuclei, predicted blobs that look like two touching cells are cut at their
        waist (the model stores the median cell area for it, see
        :func:`cellfit.postprocess.split_merged`). 1 or more never splits.
    lr, finetune_lr : float
        Peak learning rate of a new model, and of fine-tuning an existing one (the
        starting model or the user's own; None: ``lr``). Smaller steps keep what the
        existing model knows.
    distill : float
        When fine-tuning, weight of a term that keeps the predictions on unannotated
        pixels close to the starting model's (0: off). Costs one more forward pass
        per step.
    """

    mode: str = "instances"
    encoder: str = DEFAULT_ENCODER
    decoder_channels: tuple[int, ...] = DEFAULT_DECODER_CHANNELS
    loss: str = DEFAULT_LOSS
    class_weights: str | list[float] = "balanced"
    patch_size: int = 256
    batch_size: int | None = None
    steps: int | None = None
    time_limit: float | None = None
    lr: float = 5e-3
    finetune_lr: float | None = 1e-3
    weight_decay: float = 1e-4
    encoder_lr_scale: float = 1.0
    warmup_steps: int = 5
    val_fraction: float = 0.2
    val_every: int = 50
    min_val_cells_for_best: int = 10
    fg_fraction: float = DEFAULT_FG_FRACTION
    boundary_width: int = 2
    augment: bool = True
    intensity_augment: str = "mild"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    init: str | Path | None = None
    encoder_weights: str | None = None
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    class_names: list[str] | None = None
    preview_every: float = 3.0
    scale: str | float = "auto"
    cell_diameter: float = 30.0
    min_size_fraction: float = MIN_SIZE_FRACTION
    split_solidity: float = 0.93
    distill: float = 0.0


@dataclass
class TrainEvent:
    """One step of progress.

    ``validation`` is set on steps where validation ran: ``{"precision", "recall",
    "f1", "iou", "ap50", "score", "on_training"}`` (pixel figures for the cell
    classes; ``ap50`` in instance mode). ``preview`` holds probabilities ``(K, Y, X)``
    of the preview plane when one was computed at this step.
    """

    step: int
    loss: float
    lr: float
    elapsed: float
    fraction: float
    total_steps: int | None = None
    validation: dict | None = None
    best_score: float | None = None
    preview: np.ndarray | None = None
    done: bool = False
    stopped: bool = False
    #: a message for the user, e.g. that the batch was halved after running out of memory
    notice: str | None = None


def _as_planes(image: ImageStack | np.ndarray) -> np.ndarray:
    if isinstance(image, ImageStack):
        return image.data
    arr = np.asarray(image)
    return arr if arr.ndim == 4 else to_planes(arr)[0]


def annotation_summary(annotations: Sequence[np.ndarray], mode: str) -> dict:
    """Counts that describe a set of annotations (for messages and the model record)."""
    cells = 0
    bg = 0
    annotated = 0
    planes = 0
    areas: list[int] = []
    solid: list[float] = []
    for ann in annotations:
        flat = ann.reshape(-1, *ann.shape[-2:])
        for a in flat:
            if not a.any():
                continue
            planes += 1
            bg += int((a == 1).sum())
            annotated += int((a != 0).sum())
            if mode == "instances":
                ids = np.where(a >= 2, a, 0)
            else:
                ids = ndi.label(a >= 2)[0]
            sizes = np.bincount(ids.ravel())[1:]
            sizes = sizes[sizes > 0]
            cells += len(sizes)
            areas.extend(int(v) for v in sizes)
            if mode == "instances" and len(sizes):
                solid.extend(float(v) for v in solidity(ids)[np.bincount(ids.ravel()) > 0][1:])
    diameter = float(2 * np.sqrt(np.median(areas) / np.pi)) if areas else 0.0
    return {
        "median_cell_area": float(np.median(areas)) if areas else 0.0,
        "median_cell_diameter": round(diameter, 1),
        "median_cell_solidity": round(float(np.median(solid)), 3) if solid else 0.0,
        "images": len(annotations),
        "planes": planes,
        "cells": cells,
        "background_pixels": bg,
        "annotated_pixels": annotated,
    }


class Trainer:
    """Train (or fine-tune) a model on sparse annotations.

    Parameters
    ----------
    images : list of ImageStack or ndarray
        Each image as an :class:`ImageStack`, a ``(P, C, Y, X)`` array, or an array
        with axes guessed (``YX``, ``YXS``, ``ZYX``...).
    annotations : list of ndarray
        One annotation per image, shape ``lead_shape + (Y, X)``; unannotated planes
        are skipped.
    config : TrainConfig
    preview : ndarray, optional
        A raw plane ``(C, Y, X)`` whose probabilities are attached to events every
        ``config.preview_every`` seconds (the plugin's live preview).
    model, info : optional
        An already loaded model to fine-tune (the plugin keeps its model in memory).
    """

    def __init__(
        self,
        images: Sequence[ImageStack | np.ndarray],
        annotations: Sequence[np.ndarray],
        config: TrainConfig | None = None,
        *,
        preview: np.ndarray | None = None,
        model: nn.Module | None = None,
        info: ModelInfo | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self._stop = False
        self.preview_plane = preview
        self.history: list[dict] = []
        self.best_validation: dict | None = None
        cfg = self.config
        if cfg.mode not in ("instances", "semantic"):
            raise CellfitError(f"unknown mode {cfg.mode!r}: use 'instances' or 'semantic'.")
        if len(images) != len(annotations) or not images:
            raise CellfitError("give one annotation per image (and at least one image).")
        self.device = resolve_device(cfg.device)

        planes_list = [_as_planes(im) for im in images]
        anns = []
        for k, (pl, ann) in enumerate(zip(planes_list, annotations)):
            ann = np.asarray(ann)
            expect = pl.shape[0] * pl.shape[2] * pl.shape[3]
            if ann.size != expect or ann.shape[-2:] != pl.shape[2:]:
                raise CellfitError(
                    f"annotation {k + 1} has shape {ann.shape} but its image has "
                    f"{pl.shape[0]} plane(s) of {pl.shape[2]}x{pl.shape[3]}: the annotation "
                    "must cover the image pixel for pixel."
                )
            anns.append(ann.reshape(pl.shape[0], *pl.shape[2:]))
        self.summary = annotation_summary(anns, cfg.mode)
        if self.summary["annotated_pixels"] == 0:
            raise CellfitError(
                "no pixel is annotated: paint some cells (2, 3, ...) and some background (1) first."
            )
        if cfg.mode == "instances" and self.summary["cells"] == 0:
            raise CellfitError(
                "no cell is annotated (only background): paint at least one cell with a label of 2 or more."
            )
        if cfg.mode == "semantic" and not any((a >= 2).any() for a in anns):
            raise CellfitError(
                "no class is annotated (only background): paint some pixels with class 2 or more."
            )

        # model: fine-tune an existing one (the shipped starting model by name), or
        # build a fresh one
        self._notices: list[str] = []
        init = None if is_scratch(cfg.init) else cfg.init
        if model is None and is_starting(init):
            from cellfit.model import read_model_info

            path = starting_model_path()
            problem = starting_model_problem(
                read_model_info(path), cfg.mode, planes_list[0].shape[1]
            )
            if problem:
                self._notices.append(f"{problem}: training from scratch instead")
                init = None
            else:
                init = path
        self.init = init
        if model is None and init is not None:
            model, info = load_model(init)
        if model is not None and info is not None:
            self._check_compatible(info, anns)
            self.info = copy.deepcopy(info)
            self.model = model
            if self.info.cell_diameter and self.summary["median_cell_diameter"] > 0:
                # a model for cells of any size: resize so the painted cells are the
                # size it was trained for
                d = self.summary["median_cell_diameter"]
                self.info.diameter = d
                self.info.scale = (
                    scale_for(self.info.cell_diameter, d)
                    if cfg.scale == "auto"
                    else self._choose_scale()
                )
        else:
            n_channels = planes_list[0].shape[1]
            if any(p.shape[1] != n_channels for p in planes_list):
                raise CellfitError(
                    "the training images have different numbers of channels: give images "
                    "that all have the same channels."
                )
            n_classes = n_classes_for(cfg.mode, anns)
            if cfg.mode == "instances":
                names = list(INSTANCE_CLASSES)
            else:
                names = cfg.class_names or ["background"] + [
                    f"class {i}" for i in range(1, n_classes)
                ]
                names = (names + [f"class {i}" for i in range(len(names), n_classes)])[:n_classes]
            self.info = ModelInfo(
                scale=self._choose_scale(),
                encoder=cfg.encoder,
                in_channels=int(n_channels),
                n_classes=int(n_classes),
                mode=cfg.mode,
                class_names=names,
                decoder_channels=list(cfg.decoder_channels),
                normalization=dict(cfg.normalization),
                boundary_width=cfg.boundary_width,
            )
            torch.manual_seed(cfg.seed)
            self.model = build_model(self.info, cfg.encoder_weights)
        self.fine_tuning = self.init is not None or model is not None
        self.base_lr = (
            cfg.finetune_lr if self.fine_tuning and cfg.finetune_lr is not None else cfg.lr
        )
        self.teacher: nn.Module | None = None
        if self.fine_tuning and cfg.distill > 0:
            self.teacher = copy.deepcopy(self.model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        if cfg.mode == "instances" and self.summary["median_cell_area"] > 0:
            area = self.summary["median_cell_area"]
            post = {**self.info.postprocess,
                    "min_size": max(16, int(cfg.min_size_fraction * area))}
            post.pop("split_area", None)
            if self.summary["median_cell_solidity"] >= cfg.split_solidity:
                post["split_area"] = int(area)  # convex cells: cut merged blobs
            self.info.postprocess = post
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)

        # data: normalise each image once, derive targets, split off validation
        self.rng = np.random.default_rng(cfg.seed)
        norm_planes, train_anns = [], []
        scale = float(self.info.scale)
        for pl, ann in zip(planes_list, anns):
            pl = match_channels(pl, self.info.in_channels)
            keep = [i for i in range(pl.shape[0]) if ann[i].any()]
            normed = normalize(pl, self.info.normalization)
            for i in keep:
                img, a = normed[i], ann[i]
                if abs(scale - 1.0) > 1e-6:
                    shape = scaled_shape(a.shape, scale)
                    img = resize_plane(img, shape)
                    a = resize_plane(a[None], shape, order=0)[0]
                norm_planes.append(np.ascontiguousarray(img))
                train_anns.append(a)
        split = split_annotations(train_anns, cfg.val_fraction, seed=self.rng)
        self.split = split
        self.train_targets = [self._targets(a) for a in split.train]
        self.val_annotations = split.val
        self.val_images = norm_planes
        if not any((t != IGNORE).any() for t in self.train_targets):
            raise CellfitError(
                "after deriving training targets no pixel is usable (cells touching only "
                "unannotated pixels): paint some background (1) around your cells."
            )
        self.sampler = PatchSampler(
            norm_planes,
            self.train_targets,
            patch_size=cfg.patch_size,
            fg_fraction=cfg.fg_fraction,
            augment=cfg.augment,
            seed=self.rng,
            intensity=cfg.intensity_augment,
        )
        counts = class_counts(self.train_targets, self.info.n_classes)
        self.class_counts = counts
        if isinstance(cfg.class_weights, str):
            if cfg.class_weights == "balanced":
                weights = balanced_class_weights(counts)
            elif cfg.class_weights == "none":
                weights = None
            else:
                raise CellfitError(
                    f"unknown class weighting {cfg.class_weights!r}: use balanced, none or a list of numbers."
                )
        else:
            weights = [float(w) for w in cfg.class_weights]
            if len(weights) != self.info.n_classes:
                raise CellfitError(
                    f"{len(weights)} class weights were given for {self.info.n_classes} classes: "
                    "give one weight per class."
                )
        self.class_weights = weights
        self.loss_fn = build_loss(cfg.loss, weights).to(self.device)
        self.batch_size = cfg.batch_size or (8 if self.device.type == "cuda" else 4)
        enc_params = list(self.model.encoder.parameters())  # type: ignore[union-attr]
        enc_ids = {id(p) for p in enc_params}
        rest = [p for p in self.model.parameters() if id(p) not in enc_ids]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": enc_params, "lr_scale": cfg.encoder_lr_scale},
                {"params": rest, "lr_scale": 1.0},
            ],
            lr=self.base_lr,
            weight_decay=cfg.weight_decay,
        )
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16
            if self.use_amp and torch.cuda.is_bf16_supported()
            else torch.float16
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.step = 0
        self.best_score: float | None = None
        self.best_state: dict | None = None
        self.best_step = 0

    # ------------------------------------------------------------------ helpers
    def _choose_scale(self) -> float:
        cfg = self.config
        if cfg.scale != "auto":
            try:
                value = float(cfg.scale)
            except (TypeError, ValueError):
                raise CellfitError(
                    f"scale {cfg.scale!r} is not understood: use auto or a number such as 0.5."
                ) from None
            if not 0.05 <= value <= 4:
                raise CellfitError(f"scale {value} is out of range: use a number from 0.05 to 4.")
            return value
        d = self.summary["median_cell_diameter"]
        if d > 1.5 * cfg.cell_diameter:
            return round(max(0.125, cfg.cell_diameter / d), 4)
        return 1.0

    def _targets(self, ann: np.ndarray) -> np.ndarray:
        return make_targets(ann, self.info.mode, self.info.n_classes, self.info.boundary_width)

    def _check_compatible(self, info: ModelInfo, anns: list[np.ndarray]) -> None:
        cfg = self.config
        if info.mode != cfg.mode:
            raise CellfitError(
                f"the starting model was trained in {info.mode} mode but this training is in "
                f"{cfg.mode} mode: use the same mode or start fresh."
            )
        if info.mode == "semantic":
            top = max(int(a.max()) for a in anns)
            if top > info.n_classes:
                raise CellfitError(
                    f"the annotation uses class value {top} but the starting model knows "
                    f"{info.n_classes - 1} classes: start fresh to add classes."
                )

    def _val_postprocess(self) -> dict:
        kw = dict(self.info.postprocess)
        # validation runs on scaled planes
        if "min_size" in kw:
            kw["min_size"] = max(4, int(kw["min_size"] * self.info.scale**2))
        if kw.get("split_area"):
            kw["split_area"] = max(4, int(kw["split_area"] * self.info.scale**2))
        return kw

    def stop(self) -> None:
        """Ask the running generator to stop after the current step."""
        self._stop = True

    def _lr_factor(self, fraction: float) -> float:
        warm = self.config.warmup_steps
        if self.step < warm:
            return (self.step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))

    def _fraction(self, elapsed: float) -> float:
        cfg = self.config
        fr = []
        if cfg.steps:
            fr.append(self.step / cfg.steps)
        if cfg.time_limit:
            fr.append(elapsed / cfg.time_limit)
        return max(fr) if fr else 0.0

    #: draw the next batch in a background thread while the current step computes
    prefetch: bool = True

    def _next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of ``n`` patches as CPU tensors (pinned on CUDA), and start
        drawing the one after it in a background thread.

        Batches are drawn one after another from the sampler's generator, in the same
        order as without prefetching, so a seed gives the same batches. A batch drawn
        before the batch size was halved is cut to the new size.
        """
        pending = getattr(self, "_pending", None)
        self._pending = None
        batch = None
        if pending is not None:
            thread, box = pending
            thread.join()
            if "error" in box:
                raise box["error"]
            if len(box["batch"][0]) >= n:
                batch = (box["batch"][0][:n], box["batch"][1][:n])
        if batch is None:
            batch = self._draw(n)
        if self.prefetch:
            box: dict = {}

            def work() -> None:
                try:
                    box["batch"] = self._draw(n)
                except BaseException as exc:  # re-raised in the training thread
                    box["error"] = exc

            thread = threading.Thread(target=work, name="cellfit-prefetch", daemon=True)
            thread.start()
            self._pending = (thread, box)
        return batch

    def _draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.sample(n)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.type == "cuda":
            xt, yt = xt.pin_memory(), yt.pin_memory()
        return xt, yt

    def _train_step(self) -> float:
        """One optimizer step; on running out of device memory, halve the batch and
        retry on the first half of the same patches (a notice says so)."""
        from cellfit.predict import is_out_of_memory

        xb, yb = self._next_batch(self.batch_size)
        while True:
            try:
                return self._step_on(xb[: self.batch_size], yb[: self.batch_size])
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            n = self.batch_size
            kind = self.device.type.upper()
            if n <= 1:
                p = self.config.patch_size
                raise CellfitError(
                    f"the {kind} device ran out of memory training on a single patch of "
                    f"{p}x{p} pixels: use a smaller --patch-size (e.g. 128), close other "
                    "programs that use the GPU, or train with --device cpu."
                )
            self.batch_size = n // 2
            self._notices = [
                *getattr(self, "_notices", []),
                f"out of {kind} memory with batches of {n} patches: "
                f"continuing with {self.batch_size}",
            ]

    def _pop_notice(self) -> str | None:
        notices = getattr(self, "_notices", None)
        self._notices = []
        return "; ".join(notices) if notices else None

    def _step_on(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        xt = xb.to(self.device, non_blocking=True)
        yt = yb.to(self.device, non_blocking=True).long()
        if self.device.type == "cuda":
            xt = xt.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            logits = self.model(xt)
        loss = self.loss_fn(logits.float(), yt)
        if self.teacher is not None:
            loss = loss + self.config.distill * self._distill_loss(xt, logits, yt)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def _distill_loss(self, xt: torch.Tensor, logits: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        """KL divergence from the starting model's predictions on the pixels nobody
        annotated: what the user did not paint stays as the starting model had it."""
        free = yt == IGNORE
        if not bool(free.any()):
            return logits.sum() * 0.0
        with torch.no_grad(), torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.use_amp
        ):
            ref = torch.softmax(self.teacher(xt).float(), dim=1)
        logp = torch.log_softmax(logits.float(), dim=1)
        kl = (ref * (torch.log(ref.clamp_min(1e-6)) - logp)).sum(dim=1)
        return kl[free].mean()

    def _predict(self, plane: np.ndarray) -> np.ndarray:
        info = copy.copy(self.info)
        info.normalization = {"method": "none"}
        info.scale = 1.0  # validation planes are already scaled
        out = None
        for ev in iter_predict(
            self.model, info, plane[None], None, tile=512, overlap=64, device=self.device
        ):
            if ev.probabilities is not None:
                out = ev.probabilities
        assert out is not None
        return out

    def validate(self) -> dict:
        """Precision / recall / F1 / IoU of the cell classes and instance AP@0.5 on the
        held-back annotation (cropped around the annotated regions)."""
        preds, targs, inst = [], [], []
        for img, ann in zip(self.val_images, self.val_annotations):
            if not ann.any():
                continue
            regions, _n = ndi.label(ndi.binary_dilation(ann != 0, iterations=8))
            for sl in ndi.find_objects(regions):
                if sl is None:
                    continue
                m = 32
                y0, y1 = max(sl[0].start - m, 0), min(sl[0].stop + m, ann.shape[0])
                x0, x1 = max(sl[1].start - m, 0), min(sl[1].stop + m, ann.shape[1])
                a = ann[y0:y1, x0:x1]
                probs = self._predict(img[:, y0:y1, x0:x1])
                t = self._targets(a)
                pred_cls = probs.argmax(0)
                if self.info.mode == "instances":
                    # cell (interior or boundary) against background
                    t = np.where(t == IGNORE, IGNORE, (t > 0).astype(np.uint8))
                    pred_cls = (pred_cls > 0).astype(np.uint8)
                    truth = np.where(a >= 2, a, 0)
                    pred_lab = instances_from_probs(probs, **self._val_postprocess())
                    inst.append(instance_metrics(pred_lab, truth, (0.5,), region=a != 0))
                preds.append(pred_cls.ravel())
                targs.append(t.ravel())
        self.model.train()
        if not preds:
            return {}
        k = 2 if self.info.mode == "instances" else self.info.n_classes
        names = ["background", "cell"] if self.info.mode == "instances" else self.info.class_names
        pm = pixel_metrics(np.concatenate(preds), np.concatenate(targs), k, names)
        fg = [pm[n] for n in names[1:] if pm[n]["support"] > 0] or [pm[names[1]]]
        out = {key: float(np.mean([f[key] for f in fg])) for key in ("precision", "recall", "f1", "iou")}
        out["per_class"] = pm
        if inst:
            agg = aggregate_instance_metrics(inst)
            out["ap50"] = agg["ap50"]
            out["score"] = agg["ap50"]
        else:
            out["score"] = out["f1"]
        out["on_training"] = self.split.on_training
        return out

    # --------------------------------------------------------------------- run
    def run(self) -> Iterator[TrainEvent]:
        """Train, yielding a :class:`TrainEvent` after every step.

        Stops at the step or time limit, when :meth:`stop` is called, or when the
        consumer stops iterating; the best validated weights are then kept.
        """
        cfg = self.config
        steps = cfg.steps if (cfg.steps or cfg.time_limit) else 500
        if steps is not None:
            cfg.steps = steps
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        last_preview = -1e9
        losses: list[float] = []
        self._stop = False
        start_step = self.step
        finished = False
        try:
            while True:
                # a stop request is honoured before the next step, not after it
                stopping = self._stop and bool(losses)
                if stopping:
                    loss = losses[-1]
                else:
                    elapsed = time.perf_counter() - t0
                    fraction = self._fraction(elapsed)
                    for g in self.optimizer.param_groups:
                        g["lr"] = self.base_lr * g["lr_scale"] * self._lr_factor(fraction)
                    loss = self._train_step()
                    if not math.isfinite(loss):
                        raise CellfitError(
                            "training diverged (the loss became infinite): lower the learning "
                            "rate or check the image for extreme values."
                        )
                    self.step += 1
                    losses.append(loss)
                elapsed = time.perf_counter() - t0
                fraction = self._fraction(elapsed)
                last = (
                    stopping
                    or (cfg.steps is not None and self.step - start_step >= cfg.steps)
                    or (cfg.time_limit is not None and elapsed >= cfg.time_limit)
                )
                val = None
                if last or self.step % max(1, cfg.val_every) == 0:
                    val = self.validate()
                    if val:
                        self.history.append({"step": self.step, **_brief(val)})
                        if self.best_score is None or val["score"] >= self.best_score:
                            self.best_score = val["score"]
                            self.best_validation = val
                            self.best_step = self.step
                            self.best_state = {
                                k: v.detach().to("cpu", copy=True)
                                for k, v in self.model.state_dict().items()
                            }
                preview = None
                now = time.perf_counter()
                if self.preview_plane is not None and (
                    last or now - last_preview >= cfg.preview_every
                ):
                    preview = self.predict_raw(self.preview_plane)
                    last_preview = time.perf_counter()
                yield TrainEvent(
                    step=self.step,
                    loss=loss,
                    lr=self.optimizer.param_groups[-1]["lr"],
                    elapsed=time.perf_counter() - t0,
                    fraction=min(1.0, fraction),
                    total_steps=cfg.steps,
                    validation=val,
                    best_score=self.best_score,
                    preview=preview,
                    done=last,
                    stopped=self._stop,
                    notice=self._pop_notice(),
                )
                if last:
                    finished = True
                    break
        finally:
            self._finish(losses, time.perf_counter() - t0, start_step, finished)

    def _finish(self, losses: list[float], seconds: float, start_step: int, finished: bool) -> None:
        keep_best = (
            self.best_state is not None
            and self.split.n_val_cells >= self.config.min_val_cells_for_best
        )
        if keep_best:
            self.model.load_state_dict(self.best_state)
        self.model.eval()
        every = max(1, len(losses) // 200)
        record = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "steps": self.step - start_step,
            "seconds": round(seconds, 1),
            "stopped_early": not finished or self._stop,
            "device": str(self.device),
            "batch_size": self.batch_size,
            "patch_size": self.config.patch_size,
            "loss": self.config.loss,
            "class_weights": self.class_weights,
            "class_pixels": [int(c) for c in self.class_counts],
            "losses": [round(float(v), 5) for v in losses[::every]],
            "losses_every": every,
            "final_loss": round(float(np.mean(losses[-10:])), 5) if losses else None,
            "validation": _brief(self.best_validation) if self.best_validation else None,
            "validation_history": self.history,
            "validated_on": "training annotation (fewer than 5 cells)"
            if self.split.on_training
            else f"{self.split.n_val_cells} held-back cells",
            "best_step": self.best_step,
            "kept": "best validated weights" if keep_best else "final weights",
            "best_score": self.best_score,
            "annotation": self.summary,
            "scale": self.info.scale,
            "init": (
                "cellfit starting model"
                if is_starting(self.config.init) and self.init is not None
                else (str(self.init) if self.init is not None else None)
            ),
            "distill": self.config.distill if self.teacher is not None else None,
            "lr": self.base_lr,
            "encoder_weights": self.config.encoder_weights,
            "seed": self.config.seed,
            "versions": package_versions(),
        }
        self.info.training.append(record)

    def predict_raw(self, plane: np.ndarray) -> np.ndarray:
        """Probabilities ``(K, Y, X)`` of a raw plane ``(C, Y, X)`` with the current weights."""
        from cellfit.predict import predict_plane

        plane = match_channels(plane[None], self.info.in_channels)[0]
        probs = predict_plane(self.model, self.info, plane, device=self.device)
        self.model.train()
        return probs

    def save(self, path: str | Path) -> Path:
        """Write the model file (the best weights and the training record)."""
        return save_model(path, self.model, self.info)


def _brief(val: dict | None) -> dict:
    if not val:
        return {}
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in val.items() if k != "per_class"}


def train(
    images: Sequence[ImageStack | np.ndarray],
    annotations: Sequence[np.ndarray],
    config: TrainConfig | None = None,
) -> Iterator[TrainEvent]:
    """Shorthand: ``Trainer(images, annotations, config).run()``."""
    return Trainer(images, annotations, config).run()


def config_dict(config: TrainConfig) -> dict:
    """A JSON-friendly view of a :class:`TrainConfig`."""
    d = asdict(config)
    d["init"] = str(d["init"]) if d["init"] else None
    return d
