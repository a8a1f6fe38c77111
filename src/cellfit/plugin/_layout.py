"""Controls that fit a narrow dock: napari's first window is 1089 x 630 pixels, its
own layer controls take 320 of them, and the image must keep most of the rest.

* :class:`FlowLayout` lays widgets out in rows, starting a new row when the next one
  does not fit (and stretches each row to the full width).
* :class:`TabStrip` is the tab bar of a ``QTabWidget`` on as many rows as it needs:
  Qt's own tab bar never wraps, so five tabs in a 300-pixel dock would hide behind
  scroll arrows. The ``QTabWidget`` stays (``setCurrentIndex``, ``currentChanged``,
  ``tabText`` keep working); only its bar is replaced.
* :class:`WrapCheckBox` and :class:`WrapButton` wrap their text onto several lines
  instead of widening the dock (Qt's check boxes and buttons never wrap).
* :func:`fit_forms` lets the forms of a widget put a label above its field when both
  do not fit side by side; :func:`reveal` scrolls the dock to show a widget.

No napari here (Qt only).
"""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QPoint, QRect, QSize, Qt
from qtpy.QtGui import QPainter
from qtpy.QtWidgets import (
    QAbstractSpinBox,
    QButtonGroup,
    QCheckBox,
    QFormLayout,
    QLabel,
    QLayout,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QStyle,
    QStyleOptionButton,
    QTabWidget,
    QWidget,
)

__all__ = [
    "FlowLayout",
    "TabStrip",
    "WrapButton",
    "WrapCheckBox",
    "breakable",
    "fit_forms",
    "flow_row",
    "reveal",
]

_WRAP = Qt.TextFlag.TextWordWrap


class FlowLayout(QLayout):
    """Widgets in rows, as many per row as fit; each row is stretched to the width."""

    def __init__(self, parent: QWidget | None = None, spacing: int = 3) -> None:
        super().__init__(parent)
        self._items: list = []
        self.setSpacing(spacing)
        self.setContentsMargins(0, 0, 0, 0)

    # the QLayout interface
    def addItem(self, item) -> None:
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int):
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int):
        return self._items.pop(index) if 0 <= index < len(self._items) else None

    def expandingDirections(self) -> Qt.Orientation:
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._arrange(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect: QRect) -> None:
        super().setGeometry(rect)
        self._arrange(rect, move=True)

    def sizeHint(self) -> QSize:
        items = self._visible()
        m = self.contentsMargins()
        w = sum(i.sizeHint().width() for i in items) + self.spacing() * max(len(items) - 1, 0)
        h = max((i.sizeHint().height() for i in items), default=0)
        return QSize(w + m.left() + m.right(), h + m.top() + m.bottom())

    def minimumSize(self) -> QSize:
        m = self.contentsMargins()
        w = max((i.minimumSize().width() for i in self._visible()), default=0)
        h = max((i.minimumSize().height() for i in self._visible()), default=0)
        return QSize(w + m.left() + m.right(), h + m.top() + m.bottom())

    @staticmethod
    def _width(item, room: int) -> int:
        """An item's width: its preferred one, down to its minimum in a narrow row."""
        return max(min(item.sizeHint().width(), room), item.minimumSize().width())

    def _visible(self) -> list:
        return [i for i in self._items if i.widget() is None or not i.widget().isHidden()]

    def _arrange(self, rect: QRect, move: bool) -> int:
        """Lay the items out in ``rect`` (when ``move``); the height they take."""
        m = self.contentsMargins()
        area = rect.adjusted(m.left(), m.top(), -m.right(), -m.bottom())
        gap = self.spacing()
        rows: list[list] = [[]]
        used = 0
        for item in self._visible():
            w = self._width(item, area.width())
            if rows[-1] and used + gap + w > area.width():
                rows.append([])
                used = 0
            used += (gap if rows[-1] else 0) + w
            rows[-1].append(item)
        y = area.y()
        for row in rows:
            if not row:
                continue
            height = max(i.sizeHint().height() for i in row)
            if move:
                widths = [self._width(i, area.width()) for i in row]
                spare = max(area.width() - sum(widths) - gap * (len(row) - 1), 0)
                x = area.x()
                for k, item in enumerate(row):
                    extra = spare // len(row) + (1 if k < spare % len(row) else 0)
                    item.setGeometry(QRect(QPoint(x, y), QSize(widths[k] + extra, height)))
                    x += widths[k] + extra + gap
            y += height + gap
        return y - gap - area.y() + m.top() + m.bottom() if rows[0] else 0


class TabStrip(QWidget):
    """The tabs of ``tabs`` as a row of buttons that wraps onto a second row when the
    dock is narrow; ``tabs``'s own tab bar is hidden. Build it after adding the tabs."""

    STYLE = "QPushButton { padding: 3px 7px; } QPushButton:checked { font-weight: bold; }"

    def __init__(self, tabs: QTabWidget, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.tabs = tabs
        self.group = QButtonGroup(self)
        self.group.setExclusive(True)
        self.buttons: list[QPushButton] = []
        flow = FlowLayout(self)
        for i in range(tabs.count()):
            button = QPushButton(tabs.tabText(i))
            button.setCheckable(True)
            button.setStyleSheet(self.STYLE)
            tip = tabs.tabToolTip(i)
            if tip:
                button.setToolTip(tip)
            self.group.addButton(button, i)
            flow.addWidget(button)
            self.buttons.append(button)
        self.group.idClicked.connect(tabs.setCurrentIndex)
        tabs.currentChanged.connect(self._show_current)
        tabs.tabBar().hide()
        self._show_current(tabs.currentIndex())
        policy = QSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        policy.setHeightForWidth(True)
        self.setSizePolicy(policy)

    def _show_current(self, index: int) -> None:
        if 0 <= index < len(self.buttons):
            self.buttons[index].setChecked(True)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self.layout().heightForWidth(width)

    def minimumSizeHint(self) -> QSize:
        return self.layout().minimumSize()


def _wrapping_policy() -> QSizePolicy:
    """Narrower than its one-line text (which then wraps), as tall as the text needs."""
    policy = QSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
    policy.setHeightForWidth(True)
    return policy


#: where a long name may break besides spaces: after these characters
_BREAK_AFTER = "_-./\\"
_ZWSP = "\u200b"  # zero-width space: a place to break a line, invisible


def breakable(text: str) -> str:
    """``text`` with invisible break points after ``_ - . / \\`` so that a long file or
    layer name ("2024-03-14_plate1_wellB3_DAPI") wraps in a narrow dock instead of
    widening it or being cut off. For display only (the text copied is unchanged
    where it matters: the notification, the file name)."""
    for ch in _BREAK_AFTER:
        text = text.replace(ch, ch + _ZWSP)
    return text


def _text_height(widget: QWidget, text: str, width: int) -> int:
    rect = widget.fontMetrics().boundingRect(
        QRect(0, 0, max(width, 1), 100_000), _WRAP, breakable(text)
    )
    return rect.height()


def _longest_word(widget: QWidget, text: str) -> int:
    fm = widget.fontMetrics()
    words = breakable(text).replace(_ZWSP, " ").split()
    return max((fm.horizontalAdvance(w) for w in words), default=0)


class WrapCheckBox(QCheckBox):
    """A check box whose text wraps onto more lines when the dock is narrow; the text,
    the box and the whole area toggle it."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(text, parent)
        self.setSizePolicy(_wrapping_policy())

    def _text_left(self) -> int:
        """Where the text starts: after the box and the style's spacing."""
        opt = QStyleOptionButton()
        self.initStyleOption(opt)
        style = self.style()
        return style.subElementRect(QStyle.SubElement.SE_CheckBoxContents, opt, self).left()

    def _contents_left(self) -> int:
        # the style's contents rect without text can be empty: box width + spacing
        left = self._text_left()
        if left <= 0:
            style = self.style()
            left = style.pixelMetric(QStyle.PixelMetric.PM_IndicatorWidth) + style.pixelMetric(
                QStyle.PixelMetric.PM_CheckBoxLabelSpacing
            )
        return left + 2

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        box = super().sizeHint().height() - self.fontMetrics().height()
        return max(super().sizeHint().height(),
                   _text_height(self, self.text(), width - self._contents_left()) + max(box, 2))

    def sizeHint(self) -> QSize:
        return super().sizeHint()

    def minimumSizeHint(self) -> QSize:
        width = self._contents_left() + min(_longest_word(self, self.text()), 100) + 4
        return QSize(width, super().minimumSizeHint().height())

    def hitButton(self, pos: QPoint) -> bool:
        return self.rect().contains(pos)

    def paintEvent(self, event) -> None:
        opt = QStyleOptionButton()
        self.initStyleOption(opt)
        text = opt.text
        one_line = self.fontMetrics().horizontalAdvance(text) + self._contents_left() + 4
        if one_line <= self.width():  # fits: Qt draws it as ever
            super().paintEvent(event)
            return
        painter = QPainter(self)
        opt.text = ""
        box = self.style().subElementRect(QStyle.SubElement.SE_CheckBoxIndicator, opt, self)
        box.moveTop(max((self.fontMetrics().height() - box.height()) // 2 + 1, 0))
        opt.rect = QRect(0, 0, self.width(), box.bottom() + 2)
        self.style().drawControl(QStyle.ControlElement.CE_CheckBox, opt, painter, self)
        left = self._contents_left()
        area = QRect(left, 0, self.width() - left, self.height())
        self.style().drawItemText(
            painter, area, int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop) | int(_WRAP),
            self.palette(), self.isEnabled(), breakable(text), self.foregroundRole(),
        )
        painter.end()


class WrapButton(QPushButton):
    """A push button whose text wraps onto more lines when the dock is narrow (a
    button naming a layer can be long)."""

    PAD = 12  # the style's padding and frame around the text, both sides together

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(text, parent)
        self.setSizePolicy(_wrapping_policy())

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        one = super().sizeHint().height()
        lines = _text_height(self, self.text(), width - self.PAD)
        return max(one, one - self.fontMetrics().height() + lines)

    def minimumSizeHint(self) -> QSize:
        width = min(_longest_word(self, self.text()), 100) + self.PAD + 4
        return QSize(min(width, super().minimumSizeHint().width()), super().minimumSizeHint().height())

    def paintEvent(self, event) -> None:
        opt = QStyleOptionButton()
        self.initStyleOption(opt)
        if self.fontMetrics().horizontalAdvance(opt.text) + self.PAD <= self.width():
            super().paintEvent(event)
            return
        text = opt.text
        opt.text = ""
        painter = QPainter(self)
        self.style().drawControl(QStyle.ControlElement.CE_PushButton, opt, painter, self)
        area = self.rect().adjusted(self.PAD // 2, 2, -self.PAD // 2, -2)
        self.style().drawItemText(
            painter, area, int(Qt.AlignmentFlag.AlignCenter) | int(_WRAP),
            self.palette(), self.isEnabled(), breakable(text), self.foregroundRole(),
        )
        painter.end()


class _WholeText(QObject):
    """Keeps a spin box at least as wide as its words ("estimate when segmenting"),
    measured once napari's style sheet (its font) applies: when it is shown."""

    def eventFilter(self, obj, event) -> bool:
        if event.type() in (QEvent.Type.Show, QEvent.Type.StyleChange, QEvent.Type.FontChange):
            fm = obj.fontMetrics()
            words = fm.horizontalAdvance(obj.specialValueText())
            number = fm.horizontalAdvance(
                obj.prefix() + obj.textFromValue(obj.maximum()) + obj.suffix()
            )
            # Qt sizes a spin box for its longest text: keep that only for the words
            width = obj.sizeHint().width() if words >= number else 0
            if obj.minimumWidth() != width:
                obj.setMinimumWidth(width)
        return False


def fit_forms(widget: QWidget) -> None:
    """Every form of ``widget`` puts a row's label above its field when both do not
    fit side by side (a narrow dock), instead of widening the dock; and no spin box
    is squeezed below its text (the form wraps the row instead)."""
    keeper = _WholeText(widget)
    for spin in widget.findChildren(QAbstractSpinBox):
        if spin.specialValueText():  # words, not a number: must not be cut short
            spin.installEventFilter(keeper)
    for form in widget.findChildren(QFormLayout):
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    for label in widget.findChildren(QLabel):
        if label.wordWrap():  # a long name in a sentence must not widen the dock
            label.setMinimumWidth(1)


def reveal(widget: QWidget) -> None:
    """Scroll the scroll area ``widget`` is in (the dock) so that it is on screen."""
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QScrollArea):
        parent = parent.parentWidget()
    if isinstance(parent, QScrollArea):
        parent.ensureWidgetVisible(widget, 0, 0)


def flow_row(*widgets: QWidget, spacing: int = 4) -> QWidget:
    """A row of ``widgets`` (buttons) that goes on as many lines as the width needs."""
    row = QWidget()
    flow = FlowLayout(row, spacing=spacing)
    for w in widgets:
        flow.addWidget(w)
    policy = QSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
    policy.setHeightForWidth(True)
    row.setSizePolicy(policy)
    return row
