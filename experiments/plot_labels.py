"""Label placement for annotated scatter plots: each label goes to the nearby spot that overlaps the fewest drawn
things (lines, markers, error bars), other labels, the legend and the axes edge; labels pushed further out get a
thin leader line back to their point."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.figure import Figure


def _freeze_legend(fig: Figure, ax) -> None:
    """Pin a ``loc="best"`` legend where it lands now (before labels are added), so
    labels can avoid it without it jumping elsewhere afterwards."""
    leg = ax.get_legend()
    if leg is None:
        return
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    bb, ab = leg.get_window_extent(renderer), ax.get_window_extent(renderer)
    leg.set_loc(((bb.x0 - ab.x0) / ab.width, (bb.y0 - ab.y0) / ab.height))


def _densify(xy: np.ndarray, connected: bool, step_px: float = 3.0) -> np.ndarray:
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    if not connected or len(xy) < 2:
        return xy[np.isfinite(xy).all(axis=1)]
    out = [xy[:1]]
    for a, b in zip(xy[:-1], xy[1:]):
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            out.append(b[None] if np.isfinite(b).all() else np.zeros((0, 2)))
            continue
        n = max(int(np.hypot(*(b - a)) // step_px), 1)
        out.append(a + (b - a) * np.linspace(0, 1, n + 1)[1:, None])
    xy = np.concatenate(out)
    return xy[np.isfinite(xy).all(axis=1)]


def _obstacles(ax) -> np.ndarray:
    """Display-space sample points of everything drawn in ``ax`` (lines, markers, error bars)."""
    pts = [np.zeros((0, 2))]
    for line in ax.get_lines():
        xy = line.get_transform().transform(line.get_xydata())
        pts.append(_densify(xy, line.get_linestyle() not in ("None", "none", "", " ")))
    for coll in ax.collections:
        for seg in getattr(coll, "get_segments", lambda: [])():
            pts.append(_densify(coll.get_transform().transform(seg), True))
    return np.concatenate(pts)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


# Candidate label offsets (points) and alignment, nearest first.
_SPOTS = [
    (7, 5, "left", "bottom"),
    (7, -5, "left", "top"),
    (-7, 5, "right", "bottom"),
    (-7, -5, "right", "top"),
    (0, 9, "center", "bottom"),
    (0, -9, "center", "top"),
    (10, 0, "left", "center"),
    (-10, 0, "right", "center"),
]


def place_labels(fig: Figure, ax, items: Sequence[tuple[str, tuple[float, float], dict]]) -> list:
    """Annotate each (text, (x, y), text kwargs) at the nearby spot that overlaps the
    fewest drawn things, other labels, the legend and the axes edge. Labels pushed
    further out get a thin leader line back to their point."""
    if not items:
        return []
    fig.tight_layout()
    _freeze_legend(fig, ax)
    renderer = fig.canvas.get_renderer()
    obstacles = _obstacles(ax)
    ab = ax.get_window_extent(renderer)
    leg = ax.get_legend()
    blocked = [leg.get_window_extent(renderer)] if leg is not None else []
    pad = 3.0
    anns = []
    for text, xy, kw in items:
        ann = ax.annotate(text, xy, xytext=(0, 0), textcoords="offset points", **kw)
        best = None
        for ring, scale in enumerate((1.0, 2.0, 3.2)):
            for rank, (dx, dy, ha, va) in enumerate(_SPOTS):
                ann.xyann = (dx * scale, dy * scale)
                ann.set_ha(ha)
                ann.set_va(va)
                bb = ann.get_window_extent(renderer)
                area = max(bb.width * bb.height, 1.0)
                inside = (
                    (obstacles[:, 0] > bb.x0 - pad)
                    & (obstacles[:, 0] < bb.x1 + pad)
                    & (obstacles[:, 1] > bb.y0 - pad)
                    & (obstacles[:, 1] < bb.y1 + pad)
                )
                score = (
                    float(inside.sum())
                    + 1000.0 * sum(_overlap(bb, o) for o in blocked) / area
                    + 1000.0 * (1.0 - _overlap(bb, ab) / area)
                    + 4.0 * ring
                    + 0.3 * rank
                )
                if best is None or score < best[0]:
                    best = (score, ann.xyann, ha, va, ring)
        _, off, ha, va, ring = best
        ann.remove()
        arrow = dict(arrowstyle="-", color="0.55", lw=0.6, shrinkA=1, shrinkB=4) if ring else None
        ann = ax.annotate(text, xy, xytext=off, textcoords="offset points", ha=ha, va=va, arrowprops=arrow, **kw)
        blocked.append(ann.get_window_extent(renderer))
        anns.append(ann)
    return anns
