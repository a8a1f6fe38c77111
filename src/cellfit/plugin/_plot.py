"""A small live plot of the training loss and validation scores, drawn with QPainter
(no plotting library needed)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["TrainingPlot"]

LOSS_COLOR = QColor(170, 170, 170)
F1_COLOR = QColor(80, 200, 120)
AP_COLOR = QColor(255, 170, 40)


class TrainingPlot(QWidget):
    """Loss (left axis) and validation F1 / AP50 (right axis, 0–1) against the step."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip(
            "Grey: training loss (lower is better). Green: F1 and orange: AP50 on the "
            "held-back cells (higher is better, 1 is perfect)."
        )
        self.clear()

    def clear(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.val_steps: list[int] = []
        self.f1: list[float] = []
        self.ap50: list[float] = []
        self.update()

    def add_loss(self, step: int, loss: float, redraw: bool = True) -> None:
        if math.isfinite(loss):
            self.steps.append(step)
            self.losses.append(loss)
            if redraw:
                self.update()

    def add_validation(self, step: int, f1: float | None, ap50: float | None) -> None:
        self.val_steps.append(step)
        self.f1.append(float("nan") if f1 is None else f1)
        self.ap50.append(float("nan") if ap50 is None else ap50)
        self.update()

    # ------------------------------------------------------------------ drawing
    def _smoothed(self) -> list[float]:
        out, acc = [], None
        alpha = 0.2 if len(self.losses) > 20 else 0.5
        for v in self.losses:
            acc = v if acc is None else (1 - alpha) * acc + alpha * v
            out.append(acc)
        return out

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        text_color = self.palette().color(self.foregroundRole())
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        p.setFont(font)
        fm = p.fontMetrics()
        left, right, top, bottom = 40, 34, fm.height() + 6, fm.height() + 6
        area = QRectF(left, top, max(10, self.width() - left - right),
                      max(10, self.height() - top - bottom))
        grid = QColor(text_color)
        grid.setAlpha(60)
        p.setPen(QPen(grid, 1))
        p.drawRect(area)
        for frac in (0.25, 0.5, 0.75):
            y = area.bottom() - frac * area.height()
            p.drawLine(QPointF(area.left(), y), QPointF(area.right(), y))

        # legend
        x = area.left()
        for name, color in (("loss", LOSS_COLOR), ("F1", F1_COLOR), ("AP50", AP_COLOR)):
            p.setPen(QPen(color, 3))
            p.drawLine(QPointF(x, fm.height() / 2 + 2), QPointF(x + 14, fm.height() / 2 + 2))
            p.setPen(text_color)
            p.drawText(QPointF(x + 18, fm.ascent() + 1), name)
            x += 18 + fm.horizontalAdvance(name) + 14

        if not self.steps:
            p.setPen(text_color)
            # wrapped: the plot may be narrower than the sentence
            p.drawText(area, Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                       "The curves appear when training starts.")
            p.end()
            return
        x_max = max(max(self.steps), max(self.val_steps, default=0), 1)
        loss_max = max(self.losses) * 1.05 or 1.0

        def px(step: float) -> float:
            return area.left() + step / x_max * area.width()

        def py(value: float, vmax: float) -> float:
            return area.bottom() - min(max(value / vmax, 0.0), 1.0) * area.height()

        # axes labels
        p.setPen(text_color)
        p.drawText(QRectF(0, area.top() - fm.height() / 2, left - 4, fm.height()),
                   Qt.AlignmentFlag.AlignRight, f"{loss_max:.2g}")
        p.drawText(QRectF(0, area.bottom() - fm.height() / 2, left - 4, fm.height()),
                   Qt.AlignmentFlag.AlignRight, "0")
        for v in (0.0, 0.5, 1.0):
            p.drawText(QPointF(area.right() + 4, py(v, 1.0) + fm.ascent() / 2 - 1), f"{v:g}")
        p.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), fm.height()),
                   Qt.AlignmentFlag.AlignRight, f"step {x_max}")
        p.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), fm.height()),
                   Qt.AlignmentFlag.AlignLeft, "0")

        # loss: faint raw values, solid smoothed line
        faint = QColor(LOSS_COLOR)
        faint.setAlpha(70)
        self._polyline(p, [(px(s), py(v, loss_max)) for s, v in zip(self.steps, self.losses)],
                       QPen(faint, 1))
        self._polyline(p, [(px(s), py(v, loss_max)) for s, v in zip(self.steps, self._smoothed())],
                       QPen(LOSS_COLOR, 2))
        for values, color in ((self.f1, F1_COLOR), (self.ap50, AP_COLOR)):
            pts = [(px(s), py(v, 1.0)) for s, v in zip(self.val_steps, values) if math.isfinite(v)]
            self._polyline(p, pts, QPen(color, 2))
            p.setBrush(color)
            p.setPen(Qt.PenStyle.NoPen)
            for x0, y0 in pts:
                p.drawEllipse(QPointF(x0, y0), 2.5, 2.5)
        p.end()

    @staticmethod
    def _polyline(p: QPainter, pts: list[tuple[float, float]], pen: QPen) -> None:
        if len(pts) < 2:
            return
        path = QPainterPath(QPointF(*pts[0]))
        for pt in pts[1:]:
            path.lineTo(QPointF(*pt))
        p.setPen(pen)
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawPath(path)
