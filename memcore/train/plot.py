"""A small line-plot PNG writer (zlib + struct only), so results need no matplotlib.

:func:`plot_curves` draws stacked panels, each with axes, grid lines, min/max tick labels
and one polyline per series (legend text in the series' colour), in a 3x5 pixel font.
:func:`write_png` writes an (H, W, 3) uint8 image as an 8-bit RGB PNG.
"""

from __future__ import annotations

import itertools
import math
import pathlib
import struct
import zlib
from collections.abc import Sequence

import attrs
import numpy as np

__all__ = ["Panel", "Series", "plot_curves", "write_png"]

# 3x5 glyphs: five rows of three pixels, top to bottom ("#" = ink).
_GLYPHS = {
    k: v.replace(" ", "")
    for k, v in {
        "0": "### #.# #.# #.# ###",
        "1": ".#. ##. .#. .#. ###",
        "2": "### ..# ### #.. ###",
        "3": "### ..# .## ..# ###",
        "4": "#.# #.# ### ..# ..#",
        "5": "### #.. ### ..# ###",
        "6": "### #.. ### #.# ###",
        "7": "### ..# ..# .#. .#.",
        "8": "### #.# ### #.# ###",
        "9": "### #.# ### ..# ###",
        "A": ".#. #.# ### #.# #.#",
        "B": "##. #.# ##. #.# ##.",
        "C": "### #.. #.. #.. ###",
        "D": "##. #.# #.# #.# ##.",
        "E": "### #.. ##. #.. ###",
        "F": "### #.. ##. #.. #..",
        "G": "### #.. #.# #.# ###",
        "H": "#.# #.# ### #.# #.#",
        "I": "### .#. .#. .#. ###",
        "J": "..# ..# ..# #.# ###",
        "K": "#.# #.# ##. #.# #.#",
        "L": "#.. #.. #.. #.. ###",
        "M": "#.# ### ### #.# #.#",
        "N": "##. #.# #.# #.# #.#",
        "O": "### #.# #.# #.# ###",
        "P": "### #.# ### #.. #..",
        "Q": "### #.# #.# ### ..#",
        "R": "##. #.# ##. #.# #.#",
        "S": "### #.. ### ..# ###",
        "T": "### .#. .#. .#. .#.",
        "U": "#.# #.# #.# #.# ###",
        "V": "#.# #.# #.# #.# .#.",
        "W": "#.# #.# ### ### #.#",
        "X": "#.# #.# .#. #.# #.#",
        "Y": "#.# #.# .#. .#. .#.",
        "Z": "### ..# .#. #.. ###",
        ".": "... ... ... ... .#.",
        "-": "... ... ### ... ...",
        "%": "#.# ..# .#. #.. #.#",
        ":": "... .#. ... .#. ...",
        "(": "..# .#. .#. .#. ..#",
        ")": "#.. .#. .#. .#. #..",
        "/": "..# ..# .#. #.. #..",
        "=": "... ### ... ### ...",
        "+": "... .#. ### .#. ...",
        "_": "... ... ... ... ###",
        ",": "... ... ... .#. #..",
        " ": "... ... ... ... ...",
    }.items()
}
_W, _H, _ROW = 900, 300, 3  # image width, panel height, glyph scale


@attrs.frozen
class Series:
    """One curve: x and y values (NaNs are skipped), a label and an RGB colour."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: tuple[int, int, int]


@attrs.frozen
class Panel:
    """One plot: a title and its series; ``y_range`` fixes the axis (else from the data)."""

    title: str
    series: Sequence[Series]
    y_range: tuple[float, float] | None = None


def write_png(path: str | pathlib.Path, pixels: np.ndarray) -> None:
    """Write ``pixels`` (H, W, 3) uint8 as an RGB PNG (filter 0 on every row)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must be (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}")
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
    pathlib.Path(path).write_bytes(png + chunk(b"IEND", b""))


def _text(img: np.ndarray, x: int, y: int, text: str, color: tuple[int, int, int]) -> None:
    for i, ch in enumerate(text.upper()):
        glyph = _GLYPHS.get(ch, _GLYPHS[" "])
        for k, bit in enumerate(glyph):
            if bit == "#":
                r, c = divmod(k, 3)
                y0, x0 = y + r * _ROW, x + (4 * i + c) * _ROW
                img[max(y0, 0) : y0 + _ROW, max(x0, 0) : x0 + _ROW] = color


def _line(
    img: np.ndarray, p: tuple[float, float], q: tuple[float, float], color: tuple[int, int, int]
) -> None:
    n = int(max(abs(q[0] - p[0]), abs(q[1] - p[1]))) + 2
    xs = np.rint(np.linspace(p[0], q[0], n)).astype(int)
    ys = np.rint(np.linspace(p[1], q[1], n)).astype(int)
    h, w, _ = img.shape
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2 px thick
        ok = (xs + dx < w) & (ys + dy < h) & (xs >= 0) & (ys >= 0)
        img[ys[ok] + dy, xs[ok] + dx] = color


def _fmt(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.2e}"


def _panel(img: np.ndarray, top: int, panel: Panel) -> None:
    left, right, y0, y1 = 100, _W - 20, top + 40, top + _H - 35
    pts = [(float(a), float(b)) for s in panel.series for a, b in zip(s.x, s.y) if math.isfinite(b)]
    if not pts:
        _text(img, left, top + 10, panel.title + " (NO DATA)", (0, 0, 0))
        return
    xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts)
    ymin, ymax = panel.y_range or (min(p[1] for p in pts), max(p[1] for p in pts))
    xmax, ymax = (
        (xmax if xmax > xmin else xmin + 1),
        (ymax if ymax > ymin else ymin + 1e-9 + abs(ymin) * 0.1),
    )
    img[y0:y1, left] = img[y1, left:right] = (0, 0, 0)
    for k in range(1, 5):  # horizontal grid
        img[y0 + (y1 - y0) * k // 4 - 1, left + 1 : right] = (225, 225, 225)

    def at(a: float, b: float) -> tuple[float, float]:
        return left + (a - xmin) / (xmax - xmin) * (right - left), y1 - (b - ymin) / (
            ymax - ymin
        ) * (y1 - y0)

    _text(img, 5, y0, _fmt(ymax), (0, 0, 0))
    _text(img, 5, y1 - 15, _fmt(ymin), (0, 0, 0))
    _text(img, left, y1 + 8, _fmt(xmin), (0, 0, 0))
    _text(img, right - 12 * len(_fmt(xmax)), y1 + 8, _fmt(xmax), (0, 0, 0))
    _text(img, left, top + 8, panel.title, (0, 0, 0))
    x_label = left + 12 * (len(panel.title) + 2)
    for s in panel.series:
        _text(img, x_label, top + 8, s.label, s.color)
        x_label += 12 * (len(s.label) + 2)
        keep = [(a, min(max(b, ymin), ymax)) for a, b in zip(s.x, s.y) if math.isfinite(b)]
        for p, q in itertools.pairwise(keep):
            _line(img, at(*p), at(*q), s.color)
        if len(keep) <= 60:  # sparse series (evaluations): mark every point
            for p in keep:
                cx, cy = (round(v) for v in at(*p))
                img[max(cy - 3, 0) : cy + 4, max(cx - 3, 0) : cx + 4] = s.color


def plot_curves(path: str | pathlib.Path, panels: Sequence[Panel]) -> None:
    """Draw ``panels`` stacked vertically (x = training step) and write them as a PNG."""
    img = np.full((_H * len(panels), _W, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        _panel(img, i * _H, panel)
    write_png(path, img)
