"""Small PNG charts drawn with Pillow (no matplotlib in the project's environments).

``Figure(cols, rows)`` is a grid of panels; each panel is a line chart (``lines``) or a grouped
bar chart (``bars``) with ticks, labels and a legend. Enough for a loss curve and the eval plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Figure", "Panel"]

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
_W, _H = 560, 380  # one panel, pixels
_M = (70, 40, 20, 55)  # margins: left, top, right, bottom


@dataclass
class Panel:
    title: str
    xlabel: str = ""
    ylabel: str = ""
    log_y: bool = False
    lines: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    bars: dict[str, list[float]] = field(default_factory=dict)  # series -> one value per group
    groups: list[str] = field(default_factory=list)  # bar group labels
    y_range: tuple[float, float] | None = None


class Figure:
    def __init__(self, cols: int = 1, rows: int = 1, title: str = ""):
        self.cols, self.rows, self.title = cols, rows, title
        self.panels: list[Panel] = []

    def add(self, panel: Panel) -> Panel:
        self.panels.append(panel)
        return panel

    def save(self, path: str | Path) -> None:
        from PIL import Image, ImageDraw, ImageFont

        top = 36 if self.title else 0
        img = Image.new("RGB", (self.cols * _W, self.rows * _H + top), "white")
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=13)
        big = ImageFont.load_default(size=17)
        if self.title:
            draw.text((12, 8), self.title, fill="black", font=big)
        for i, panel in enumerate(self.panels):
            x0, y0 = (i % self.cols) * _W, (i // self.cols) * _H + top
            _draw_panel(draw, panel, x0, y0, font)
        img.save(path)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-2):
        return f"{v:.0e}"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _draw_panel(draw, panel: Panel, x0: int, y0: int, font) -> None:
    left, top, right, bottom = x0 + _M[0], y0 + _M[1], x0 + _W - _M[2], y0 + _H - _M[3]
    draw.text((x0 + _M[0], y0 + 10), panel.title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="#444444")
    ys = [v for _, y in panel.lines.values() for v in y] + [
        v for b in panel.bars.values() for v in b
    ]
    ys = [v for v in ys if v is not None and math.isfinite(v) and (v > 0 or not panel.log_y)]
    if not ys:
        return
    tf = (lambda v: math.log10(v)) if panel.log_y else (lambda v: v)
    lo, hi = panel.y_range or (min(ys), max(ys))
    if panel.bars and not panel.log_y:
        lo = min(lo, 0.0)
    lo, hi = tf(lo), tf(hi)
    pad = (hi - lo) * 0.05 or 0.5
    lo, hi = lo - (pad if not panel.bars else 0), hi + pad

    def py(v: float) -> float:
        return bottom - (tf(v) - lo) / (hi - lo) * (bottom - top)

    for t in _nice_ticks(lo, hi):
        yy = bottom - (t - lo) / (hi - lo) * (bottom - top)
        draw.line([left, yy, right, yy], fill="#e5e5e5")
        label = _fmt(10**t) if panel.log_y else _fmt(t)
        draw.text((left - 6, yy), label, fill="black", font=font, anchor="rm")
    draw.text((x0 + 6, top - 18), panel.ylabel, fill="#333333", font=font)
    draw.text(
        ((left + right) / 2, bottom + 34), panel.xlabel, fill="#333333", font=font, anchor="mm"
    )

    legend = []
    if panel.lines:
        xs = [v for x, _ in panel.lines.values() for v in x]
        xlo, xhi = min(xs), max(xs)
        xhi = xhi if xhi > xlo else xlo + 1

        def px(v: float) -> float:
            return left + (v - xlo) / (xhi - xlo) * (right - left)

        for t in _nice_ticks(xlo, xhi):
            draw.text((px(t), bottom + 6), _fmt(t), fill="black", font=font, anchor="mt")
        for k, (name, (x, y)) in enumerate(panel.lines.items()):
            color = _COLORS[k % len(_COLORS)]
            pts = [(px(a), py(b)) for a, b in zip(x, y, strict=True) if b is not None]
            pts = [p for p in pts if math.isfinite(p[1])]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for p in pts if len(pts) < 40 else []:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
            legend.append((name, color))
    if panel.bars:
        n_groups, n_series = len(panel.groups), len(panel.bars)
        slot = (right - left) / max(n_groups, 1)
        width = slot * 0.8 / n_series
        for g, label in enumerate(panel.groups):
            cx = left + slot * (g + 0.5)
            draw.text((cx, bottom + 6), label, fill="black", font=font, anchor="mt")
        for k, (name, values) in enumerate(panel.bars.items()):
            color = _COLORS[k % len(_COLORS)]
            for g, v in enumerate(values):
                if v is None or not math.isfinite(v):
                    continue
                bx = left + slot * g + slot * 0.1 + k * width
                base = py(10**lo) if panel.log_y else py(max(0.0, 10**lo if panel.log_y else lo))
                draw.rectangle([bx, min(py(v), base), bx + width - 2, max(py(v), base)], fill=color)
                draw.text(
                    (bx + width / 2, py(v) - 3), _fmt(v), fill="black", font=font, anchor="mb"
                )
            legend.append((name, color))
    for k, (name, color) in enumerate(legend):
        ly = top + 8 + 16 * k
        draw.rectangle([right - 150, ly, right - 138, ly + 10], fill=color)
        draw.text((right - 132, ly - 2), name, fill="black", font=font)
