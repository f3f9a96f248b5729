"""Image grids and figures written with matplotlib (Agg backend, files only)."""
from __future__ import annotations

import json
import math
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from sim.core import jsonio


def image_grid(images: np.ndarray, ncol: int, pad: int = 1, fill: int = 255) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one (rows*H, ncol*W, 3) array with ``pad`` px gaps."""
    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def save_image_grid(images: np.ndarray, path: str | Path, ncol: int = 8, scale: int = 4) -> Path:
    """Save a grid PNG, upscaled ``scale`` x with nearest neighbour so small images stay readable."""
    plt = _plt()
    grid = image_grid(np.asarray(images), ncol)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid)
    return path


def save_rows_grid(rows: dict[str, np.ndarray], path: str | Path, scale: int = 4, title: str | None = None) -> Path:
    """One labelled row per entry (e.g. condition | generated | target), same number of images each."""
    plt = _plt()
    names = list(rows)
    ncol = min(len(v) for v in rows.values())
    label_w = 0.3 + 0.07 * max(len(n) for n in names)  # the row labels' column, inches at 8 pt
    width = max(ncol * 0.6 + label_w + 0.3, 4.2 if title else 0.0)  # never narrower than its title needs
    if title:
        title = textwrap.fill(title, max(24, int(width / 0.075)))
    fig, axes = plt.subplots(len(names), 1, figsize=(width, len(names) * 0.75 + 0.4 + 0.15 * (title or "").count("\n")),
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ax.imshow(image_grid(np.asarray(rows[name][:ncol]), ncol), interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    return _finish(plt, fig, path, title, dpi=120)


def _finish(plt, fig, path: str | Path, title: str | None, dpi: int) -> Path:
    """Title, tight layout, save (creating the folder), close; returns the path."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- run figures
SCHEME_COLOURS = {"fedavg": "#1f77b4", "vanilla": "#ff7f0e", "nograd": "#2ca02c", "splitfed": "#9467bd"}


def _plt():
    """pyplot on the headless backend, chosen only when a figure is drawn; a session that already
    imported pyplot (a notebook, an interactive shell) keeps its own backend (every figure drawn
    here is saved and closed, so none shows up there)."""
    import matplotlib  # lazy: importing this module must not switch an interactive session's backend

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    return plt


def _moving_average(x: list[float], window: int) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    window = max(1, min(window, len(x)))
    return np.convolve(x, np.ones(window) / window, mode="valid")


MANY_SERIES = 4  # more curves than this: a wider figure with the legend outside the axes


def _series_axes(plt, n: int):
    """Figure and axes for ``n`` line series (wider when the legend goes outside)."""
    return plt.subplots(figsize=(6 + 2.2 * (n > MANY_SERIES), 3.5))


def _series_legend(ax, n: int, **kw) -> None:
    """The legend of ``n`` line series: inside the axes for a few, small and to the right of them for many."""
    if n > MANY_SERIES:
        kw = {"fontsize": 7, **kw, "loc": "center left", "bbox_to_anchor": (1.01, 0.5)}
    ax.legend(**kw)


def plot_run(run_dir: str | Path, colour=None) -> list[Path]:
    """Figures of a results folder, drawn from its files alone: loss.png, bytes.png, client_cost.png, samples.png.

    ``colour`` maps a row's scheme label to a colour (default: the scheme colours, grey otherwise)."""
    run = Path(run_dir)
    summary_path = run / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{run} has no summary.json: is it a results folder of `splitcontrol compare/run`?")
    summary = jsonio.read(summary_path)
    rows = [r for r in summary["rows"] if r["scheme"] in SCHEME_COLOURS or "bytes_up_per_step" in r]
    schemes = [r["scheme"] for r in rows]
    colour_of = colour or (lambda s: SCHEME_COLOURS.get(s, "grey"))
    colour = [colour_of(s) for s in schemes]
    plt = _plt()
    written = []

    # loss per scheme
    losses = {}
    if (run / "losses.jsonl").exists():
        for line in (run / "losses.jsonl").read_text().splitlines():
            d = json.loads(line)
            losses[d["scheme"]] = d["losses"]
    if losses:
        fig, ax = _series_axes(plt, len(losses))
        for i, (s, ls) in enumerate(losses.items()):
            w = max(1, len(ls) // (10 if len(losses) > MANY_SERIES else 40))  # many curves: smooth more
            ma = _moving_average(ls, w)
            ax.plot(np.arange(len(ma)) + w, ma, ["-", "--", ":", "-."][i % 4], label=s, color=colour_of(s))
        ax.set_xlabel("training step (all clients)")
        ax.set_ylabel("loss (moving average)")
        ax.set_yscale("log")
        ax.set_title("Training loss per scheme (same data, seeds and steps)", fontsize=10)
        _series_legend(ax, len(losses))
        fig.tight_layout()
        written.append(run / "loss.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # bytes per step each way
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.8))
    x = np.arange(len(rows))
    tick = {"rotation": 30, "ha": "right", "fontsize": 8} if len(rows) > 3 else {}
    up = [max(r["bytes_up_per_step"], 1e-1) for r in rows]
    down = [max(r["bytes_down_per_step"], 1e-1) for r in rows]
    b1 = ax.bar(x - 0.2, up, 0.4, label="client -> server", color=colour)
    b2 = ax.bar(x + 0.2, down, 0.4, label="server -> client", color=colour, alpha=0.45, hatch="//")
    many = len(rows) > 5
    for bars, vals in ((b1, up), (b2, down)):
        for bar, v in zip(bars, vals):
            ax.annotate(_human_bytes(v), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                        fontsize=6 if many else 7, rotation=90 if many else 0)
    ax.set_xticks(x, schemes, **tick)
    ax.set_yscale("log")
    ax.set_ylim(top=max(up + down) * (60 if many else 8))  # room for the value labels
    ax.set_ylabel("bytes per training step (log; lower is better)")
    ax.set_title("Communication per step (log scale; solid: up, hatched: down)", fontsize=10)
    from matplotlib.patches import Patch  # lazy: after the backend is chosen

    ax.legend([Patch(facecolor="0.45"), Patch(facecolor="0.45", alpha=0.45, hatch="//")],
              ["client -> server", "server -> client"], fontsize=8)
    fig.tight_layout()
    written.append(run / "bytes.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # client time and memory, trainable parameters
    if len(rows) > 4:  # many variants: one panel per row
        fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.8 * len(rows)), 9))
    else:
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    panels = [("client_s_per_step", "client compute, seconds per training step"),
              ("client_model_mb", "client model + optimizer state, MiB"),
              ("client_trainable_params", "client trainable parameters (count)")]
    for ax, (key, label) in zip(axes, panels):
        vals = [float(r.get(key, 0) or 0) for r in rows]
        pos = [v for v in vals if v > 0]
        log = bool(pos) and max(pos) / min(pos) >= 20  # a linear axis would flatten the small ones to nothing
        ax.bar(x, vals, color=colour)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(pos) / 4, max(pos) * (12 if len(rows) > 5 else 4))
            label += " (log scale)"
        else:
            ax.set_ylim(0, max(vals + [1e-9]) * 1.18)
        bottom = ax.get_ylim()[0]
        for xi, v in zip(x, vals):
            text = f"{v:,.0f}" if key == "client_trainable_params" else f"{v:.3g}"
            ax.annotate(text if v > 0 else "0 (none)", (xi, max(v, bottom)), ha="center", va="bottom",
                        fontsize=6.5 if len(rows) > 5 else 7, xytext=(0, 1), textcoords="offset points")
        ax.set_xticks(x, schemes, **tick)
        ax.set_title(label, fontsize=9)
    fig.suptitle("What the client device pays per scheme (lower is better)", fontsize=10)
    fig.tight_layout()
    written.append(run / "client_cost.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # samples: condition | every scheme | target
    if (run / "samples.npz").exists():
        data = np.load(run / "samples.npz")
        order = ["condition"] + [k for k in data.files if k not in ("condition", "target")] + ["target"]
        written.append(save_rows_grid({k: data[k][:16] for k in order}, run / "samples.png",
                                      title="condition | generated per scheme | target"))
    return written


def _human_bytes(v: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(v) < 1000:
            return f"{v:.3g} {unit}"
        v /= 1000
    return f"{v:.3g} TB"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when lower x (leakage) and higher y (utility) are better."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


SCHEME_MARKERS = {"fedavg": "s", "vanilla": "D", "nograd": "o", "splitfed": "^"}
UTILITY_NAMES = {"outline_iou": "outline IoU", "colour_acc": "prompt-colour accuracy", "edge_ssim": "edge SSIM",
                 "clip_score": "CLIP score"}
LABEL_GID = "point-label"  # the gid of every numbered point label (tests find them by it)


def _num(v) -> bool:
    """A finite number (not a bool, not "N/A", not None)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scheme_of(label: str) -> str:
    """The scheme a row's scheme label names (``nograd``, ``vanilla (8 clients)``, ...), or the label."""
    return next((s for s in SCHEME_COLOURS if s in label), label)


def leakage(row: dict, target: str) -> tuple[float | None, float | None, str | None]:
    """(score, standard error, attack) of the strongest attack on ``target`` (``image`` or ``hint``:
    mean SSIM; ``attack``: the best score a row recorded per attack, image or hint, for rows without
    the parts) of a sweep row; Nones when no attack scored it."""
    if target != "attack" and _num(row.get(f"best_{target}")):
        se = row.get(f"best_{target}_se")
        return row[f"best_{target}"], se if _num(se) else None, row.get(f"best_{target}_attack")
    prefix = f"{target}:"
    scores = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix) and _num(v) and "prompt" not in k}
    if not scores:
        return None, None, None
    attack = max(scores, key=scores.get)
    se = row.get(f"{target}_se:{attack}")
    return scores[attack], se if _num(se) else None, attack


def _no_score_reason(row: dict, target: str) -> str:
    """Why a row has no score on ``target``: the attacks were not applicable, none ran, or none reconstructs it."""
    attacks = [v for k, v in row.items() if k.startswith("attack:")]
    if not attacks:
        return "no attack ran"
    if not any(_num(v) for v in attacks):
        return "attacks N/A"
    return f"no {target} reconstructed"


def _segment_hits_box(p0, p1, box, step: float = 2.0) -> bool:
    """Whether the segment p0-p1 (pixels) passes through ``box`` (x0, y0, x1, y1), sampled every ``step`` px."""
    (x0, y0), (x1, y1) = p0, p1
    if max(x0, x1) < box[0] or min(x0, x1) > box[2] or max(y0, y1) < box[1] or min(y0, y1) > box[3]:
        return False
    n = max(2, int(math.hypot(x1 - x0, y1 - y0) / step) + 1)
    return any(box[0] <= x0 + (x1 - x0) * k / (n - 1) <= box[2] and box[1] <= y0 + (y1 - y0) * k / (n - 1) <= box[3]
               for k in range(n))


def _segments_cross(a, b) -> bool:
    """Whether the segments a and b (pixels) cross (touching ends do not count)."""
    def side(p, q, r):
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
    d1, d2 = side(a[0], a[1], b[0]), side(a[0], a[1], b[1])
    d3, d4 = side(b[0], b[1], a[0]), side(b[0], b[1], a[1])
    return d1 * d2 < 0 and d3 * d4 < 0


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_point_labels(fig, ax, points: list[tuple[float, float, str]], segments=(), fontsize: float = 7.5,
                       marker_px: float = 6.0) -> list:
    """Label each (x, y, text) point of ``ax`` with its text placed where it overlaps no other label,
    no marker and none of ``segments`` ([((x0, y0), (x1, y1)), ...] in data coordinates: front,
    guide and error-bar lines), inside the axes. A cluster of three or more touching markers gets its
    labels in a column beside it, in the points' vertical order, each joined to its point by a leader
    line (lines do not cross); other points get the nearest free spot on rings of growing radius (a
    leader line when away from the point). Call after the axes' limits and position are final.
    Returns the annotations (gid :data:`LABEL_GID`)."""
    if not points:
        return []
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tr = ax.transData
    inv = tr.inverted()
    frame = ax.get_window_extent(renderer)
    frame = (frame.x0 + 2, frame.y0 + 2, frame.x1 - 2, frame.y1 - 2)
    px = [tuple(tr.transform((x, y))) for x, y, _ in points]
    markers = [(u - marker_px, v - marker_px, u + marker_px, v + marker_px) for u, v in px]
    segs = [tuple(map(tuple, tr.transform(np.asarray(s, dtype=float)))) for s in segments]
    sizes = []
    for _, _, text in points:
        t = ax.text(0, 0, text, fontsize=fontsize)
        bb = t.get_window_extent(renderer)
        t.remove()
        sizes.append((bb.width + 4, bb.height + 2))
    placed, leaders, chosen = [], [], {}

    def collisions(i, box, leader) -> int:
        return (sum(_boxes_overlap(box, b) for b in placed)
                + sum(_boxes_overlap(box, m) for j, m in enumerate(markers) if j != i or leader)
                + sum(_segment_hits_box(*sg, box) for sg in segs)
                + sum(_segment_hits_box(*ld, box) for ld in leaders)
                + (sum(_segment_hits_box(*leader, b) for b in placed)
                   + sum(_segments_cross(leader, ld) for ld in leaders) if leader else 0))

    def inside(box) -> bool:
        return box[0] >= frame[0] and box[1] >= frame[1] and box[2] <= frame[2] and box[3] <= frame[3]

    # clusters of touching markers (single linkage)
    cluster = list(range(len(px)))
    def root(i):
        while cluster[i] != i:
            i = cluster[i]
        return i
    for i in range(len(px)):
        for j in range(i):
            if math.hypot(px[i][0] - px[j][0], px[i][1] - px[j][1]) < 3.5 * marker_px:
                cluster[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(px)):
        groups.setdefault(root(i), []).append(i)
    for members in sorted((g for g in groups.values() if len(g) >= 3), key=len, reverse=True):
        members.sort(key=lambda i: (px[i][1], px[i][0]))  # bottom to top
        h = max(sizes[i][1] for i in members)
        w = max(sizes[i][0] for i in members)
        total = h * len(members)
        mid = sum(px[i][1] for i in members) / len(members)
        y0 = min(max(mid - total / 2, frame[1]), frame[3] - total)
        lo, hi = min(px[i][0] for i in members), max(px[i][0] for i in members)
        best = None
        for dist in (28, 40, 55, 75, 100, 130):
            for side in ((-1, 1) if (lo + hi) / 2 > (frame[0] + frame[2]) / 2 else (1, -1)):
                cx = (lo - dist - w / 2) if side < 0 else (hi + dist + w / 2)
                boxes = [(cx - w / 2, y0 + k * h, cx + w / 2, y0 + (k + 1) * h) for k in range(len(members))]
                if not all(inside(b) for b in boxes):
                    continue
                lines = [((px[i][0], px[i][1]), (b[2] if side < 0 else b[0], (b[1] + b[3]) / 2))
                         for i, b in zip(members, boxes)]
                hits = sum(collisions(i, b, ln) for i, b, ln in zip(members, boxes, lines))
                if best is None or hits < best[0]:
                    best = (hits, boxes, lines)
            if best is not None and best[0] == 0:
                break
        if best is None:
            continue  # no room for a column: the ring search below
        for i, b, ln in zip(members, best[1], best[2]):
            placed.append(b)
            leaders.append(ln)
            chosen[i] = (b, ln)

    crowd = [sum(math.hypot(u - u2, v - v2) < 40 for u2, v2 in px) for u, v in px]
    close = [sum(math.hypot(u - u2, v - v2) < 2.2 * marker_px for u2, v2 in px) > 1 for u, v in px]
    order = sorted((i for i in range(len(points)) if i not in chosen), key=lambda i: (-crowd[i], -px[i][1], px[i][0]))
    angles = [0, 180, 90, 270, 30, 150, 210, 330, 60, 120, 240, 300, 15, 165, 195, 345, 45, 135, 225, 315]
    radii = [2, 6, 12, 20, 30, 42, 56, 72, 90, 110, 135, 165, 200, 240]
    for i in order:
        (u, v), (w, h) = px[i], sizes[i]
        best = None
        for r in radii:
            if close[i] and r < 12:  # a marker touching another: always a leader line to it
                continue
            for a in angles:
                c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
                cx, cy = u + c * (r + w / 2), v + s * (r + h / 2)
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                if not inside(box):
                    continue
                leader = ((u, v), (cx - c * w / 2, cy - s * h / 2)) if r > 6 else None
                hits = collisions(i, box, leader)
                if best is None or hits < best[0]:
                    best = (hits, box, leader)
                if hits == 0:
                    break
            if best is not None and best[0] == 0:
                break
        if best is None:  # no room inside the axes at all: on the point
            best = (0, (u - w / 2, v - h / 2, u + w / 2, v + h / 2), None)
        placed.append(best[1])
        if best[2]:
            leaders.append(best[2])
        chosen[i] = best[1:]
    annotations = []
    for i, (box, leader) in sorted(chosen.items()):
        xt, yt = inv.transform(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
        annotations.append(ax.annotate(
            points[i][2], (points[i][0], points[i][1]), xytext=(xt, yt), textcoords="data", fontsize=fontsize,
            ha="center", va="center", zorder=6, gid=LABEL_GID,
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.35", "shrinkA": 1, "shrinkB": 0} if leader else None))
    return annotations


def _marker_style(scheme: str) -> dict:
    """Scatter keywords of a scheme's marker: its shape, a translucent fill and a full-colour edge, so
    markers at (nearly) the same place stay visible through each other."""
    from matplotlib.colors import to_rgba  # lazy: matplotlib only when drawing

    colour = SCHEME_COLOURS.get(scheme, "grey")
    return {"marker": SCHEME_MARKERS.get(scheme, "o"), "s": 36, "facecolors": [to_rgba(colour, 0.3)],
            "edgecolors": [to_rgba(colour, 1.0)], "linewidths": 1.2}


def _row_name(row: dict) -> str:
    """A sweep row's key-table name: its variant, with the scheme when the variant does not name it."""
    v, sc = str(row.get("variant", "?")), str(row.get("scheme", "?"))
    return v if sc in v else f"{v} ({sc})"


def privacy_figure(rows: list[dict], utility: str = "outline_iou", targets=None, blind: dict | None = None,
                   title: str = "", dpi: int = 130):
    """Leakage against utility, one panel per target (``image``, ``hint``; ``attack`` for rows
    recording only a best score per attack): x the strongest attack's mean SSIM on the private target
    (lower = more private), y ``utility`` (higher = more useful), both with standard-error bars where
    the rows carry them (``best_<target>_se``, ``<utility>_se``). Every row gets a numbered marker
    (colour and shape: scheme) and an entry in the key below; rows without a score on a target sit in
    a strip beside its panel, so none is dropped. Per panel: the Pareto front, the blind guess of that
    target (``blind[target]`` or the rows' ``blind_<target>``; shaded: no better than it) and the
    base model without control. Returns the figure (not saved)."""
    plt = _plt()
    from matplotlib.lines import Line2D  # lazy: after the backend is chosen
    from matplotlib.patches import Patch

    rows = [r for r in rows if isinstance(r, dict)]
    if targets is None:
        targets = [t for t in ("image", "hint") if any(leakage(r, t)[0] is not None for r in rows)] or ["attack"]
    blind = dict(blind or {})
    for t in targets:
        if t not in blind:
            blind[t] = next((r[f"blind_{t}"] for r in rows if _num(r.get(f"blind_{t}"))), None)
    uname = UTILITY_NAMES.get(utility, utility)
    numbers = {id(r): k + 1 for k, r in enumerate(rows)}
    lines_legend: dict[str, object] = {}

    split = {}  # per target: the rows with a score on it and those without (a strip beside the panel)
    for t in targets:
        split[t] = ([], [])
        for r in rows:
            if _num(r.get(utility)):
                x, xse, _ = leakage(r, t)
                split[t][x is None].append((r, x, xse))
    n_key = len(rows) + 4
    ncol = 1 if len(targets) == 1 and len(rows) <= 8 else 2 if len(targets) == 1 else 4
    key_h = 0.18 * math.ceil(n_key / ncol) + 0.15
    main_w, strip_w, gap, left, right, top, panel_h, below = 5.2, 1.05, 0.75, 0.75, 0.25, 0.85, 4.0, 0.75
    widths = [main_w + ((0.12 + strip_w) if split[t][1] else 0.0) for t in targets]
    width = left + sum(widths) + (len(targets) - 1) * gap + right
    height = top + panel_h + below + key_h
    fig = plt.figure(figsize=(width, height), dpi=dpi)

    def rect(x_in, y_in, w_in, h_in):  # inches from the bottom-left corner -> figure fractions
        return [x_in / width, y_in / height, w_in / width, h_in / height]

    use = [(r[utility], r.get(f"{utility}_se") if _num(r.get(f"{utility}_se")) else 0) for r in rows
           if _num(r.get(utility))]
    base = next((r["base_outline_iou"] for r in rows if _num(r.get("base_outline_iou"))), None)
    base = base if utility == "outline_iou" else None
    y_lo = min([u - e for u, e in use] + ([base] if base is not None else []), default=0.0)
    y_hi = max([u + e for u, e in use] + ([base] if base is not None else []), default=1.0)
    y_pad = 0.08 * ((y_hi - y_lo) or 1.0)
    ylim = (y_lo - y_pad, y_hi + y_pad)

    for ti, target in enumerate(targets):
        x0 = left + sum(widths[:ti]) + ti * gap
        scored, missing = split[target]
        ax = fig.add_axes(rect(x0, below + key_h, main_w, panel_h))
        pts = [(x, r[utility]) for r, x, _ in scored]
        xlim = (min([0.0] + [x - (e or 0) for _, x, e in scored]) - 0.03,
                max([1.0] + [x + (e or 0) for _, x, e in scored]) + 0.04)
        segments = []
        b = blind.get(target)
        if _num(b):
            ax.axvspan(xlim[0], b, color="0.93", zorder=0)
            ax.axvline(b, color="tab:red", lw=1.0, ls=":", zorder=1)
            lines_legend[f"blind {target}"] = (Line2D([], [], color="tab:red", lw=1.0, ls=":"),
                                              f"blind guess of the {target}s, no transcript ({b:.2f})")
            segments.append(((b, ylim[0]), (b, ylim[1])))
        if base is not None:
            ax.axhline(base, color="0.45", lw=0.9, ls=(0, (1, 2)), zorder=1)
            lines_legend["base"] = (Line2D([], [], color="0.45", lw=0.9, ls=(0, (1, 2))),
                                    f"base model, no control ({base:.2f})")
            segments.append(((xlim[0], base), (xlim[1], base)))
        front = pareto_front(pts)
        if front:
            # the boundary of what the front dominates: up from the bottom at the most private point,
            # a step at each front point, on to the right edge (drawn even for a single point)
            fx = [pts[front[0]][0]] + [pts[i][0] for i in front] + [xlim[1]]
            fy = [ylim[0]] + [pts[i][1] for i in front] + [pts[front[-1]][1]]
            ax.step(fx, fy, color="0.25", ls="--", lw=1.0, where="post", zorder=2)
            segments += [((fx[k], fy[k]), (fx[k + 1], fy[k])) for k in range(len(fx) - 1)]
            segments += [((fx[k + 1], fy[k]), (fx[k + 1], fy[k + 1])) for k in range(len(fx) - 1)]
            lines_legend["front"] = (Line2D([], [], color="0.25", ls="--", lw=1.0),
                                     "Pareto front (nothing is both more private and more useful)")
        labels = []
        for (r, x, xse), (_, y) in zip(scored, pts):
            yse = r.get(f"{utility}_se") if _num(r.get(f"{utility}_se")) else None
            sc = _scheme_of(r["scheme"])
            if xse or yse:
                ax.errorbar(x, y, xerr=xse, yerr=yse, fmt="none", ecolor=SCHEME_COLOURS.get(sc, "grey"),
                            elinewidth=0.8, capsize=2, alpha=0.8, zorder=3)
                if xse:
                    segments.append(((x - xse, y), (x + xse, y)))
                if yse:
                    segments.append(((x, y - yse), (x, y + yse)))
            ax.scatter(x, y, zorder=4, **_marker_style(sc))
            labels.append((x, y, str(numbers[id(r)])))
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        what = {"attack": "best attack score (image or hint SSIM, as recorded)"}.get(
            target, f"strongest attack's mean SSIM on the private {target}s")
        ax.set_xlabel(f"leakage: {what}\n\u2190 more private", fontsize=8.5)
        ax.set_ylabel(f"utility: {uname}" + (", mean \u00b1 SE" if any(e for _, e in use) else "")
                      + "  (more useful \u2191)", fontsize=8.5)
        ax.set_title({"attack": "leakage (image or hint)"}.get(target, f"{target}s"), fontsize=10)
        ax.grid(alpha=0.3, zorder=0)
        place_point_labels(fig, ax, labels, segments)
        if not missing:
            continue
        # the rows without a score on this target, spread across the strip, same utility axis
        strip = fig.add_axes(rect(x0 + main_w + 0.12, below + key_h, strip_w, panel_h), sharey=ax)
        slabels = []
        for k, (r, _, _) in enumerate(missing):
            sx = (k + 0.5) / len(missing)
            sc = _scheme_of(r["scheme"])
            yse = r.get(f"{utility}_se") if _num(r.get(f"{utility}_se")) else None
            if yse:
                strip.errorbar(sx, r[utility], yerr=yse, fmt="none", ecolor=SCHEME_COLOURS.get(sc, "grey"),
                               elinewidth=0.8, capsize=2, zorder=3)
            strip.scatter(sx, r[utility], zorder=4, **_marker_style(sc))
            slabels.append((sx, r[utility], str(numbers[id(r)])))
        reasons = sorted({_no_score_reason(r, target) for r, _, _ in missing})
        strip.set_xlim(0, 1)
        strip.set_xticks([])
        strip.tick_params(labelleft=False)
        strip.set_facecolor("0.97")
        strip.set_title(f"no {target} score", fontsize=8)
        strip.set_xlabel("\n".join(reasons), fontsize=7)
        strip.grid(axis="y", alpha=0.3)
        place_point_labels(fig, strip, slabels)

    # the key: every row's number, marker and name, and the lines
    key = fig.add_axes(rect(0.1, 0.05, width - 0.2, key_h - 0.05))
    key.axis("off")
    handles, texts = [], []
    for h, t in lines_legend.values():
        handles.append(h)
        texts.append(t)
    handles.append(Patch(color="0.93"))
    texts.append("shaded: at or below a blind guess")
    if "blind image" not in lines_legend and "blind hint" not in lines_legend:
        handles.pop()
        texts.pop()
    for r in rows:
        sc = _scheme_of(str(r.get("scheme", "")))
        st = _marker_style(sc)
        handles.append(Line2D([], [], ls="none", marker=st["marker"], mfc=st["facecolors"][0], mec=st["edgecolors"][0],
                              mew=st["linewidths"], ms=6))
        texts.append(f"{numbers[id(r)]}  {_row_name(r)}" + ("" if _num(r.get(utility)) else f" (no {uname}: not drawn)"))
    key.legend(handles, texts, loc="upper left", ncol=ncol, fontsize=7.5, frameon=False, handlelength=1.6,
               columnspacing=1.2, borderaxespad=0.0, mode="expand" if ncol > 1 else None)
    head = textwrap.fill((title + ": " if title else "") + f"privacy vs {uname}, one numbered point per "
                         "variant and scheme (key below)", int(width / 0.085))
    fig.suptitle(head + "\n\u2190 more private (lower attack SSIM)      more useful \u2191",
                 fontsize=10, y=1 - 0.08 / height, va="top")
    return fig


def _save(plt, fig, out: Path, dpi: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_privacy_utility(sweep_json: str | Path, out: str | Path | None = None,
                         utility: str = "outline_iou", blind: dict | None = None) -> Path:
    """:func:`privacy_figure` of a sweep.json (both targets where the rows have both), saved as
    ``privacy_<utility>.png`` beside it (or ``out``). ``blind``: {"image": ssim, "hint": ssim} of a
    guess made without any transcript (default: the rows' ``blind_image`` / ``blind_hint``)."""
    path = Path(sweep_json)
    if blind is not None and not isinstance(blind, dict):
        raise TypeError(f"blind must map a target ('image', 'hint') to its SSIM, got {blind!r}")
    fig = privacy_figure(jsonio.read(path), utility, blind=blind, title=path.parent.name)
    return _save(_plt(), fig, Path(out) if out else path.parent / f"privacy_{utility}.png", fig.dpi)


def plot_frontier(sweep_json: str | Path, target: str = "image", out: str | Path | None = None,
                  blind: dict | None = None) -> Path:
    """The privacy/utility frontier for one target (``image`` or ``hint``): :func:`privacy_figure`
    of a sweep.json on that target against outline IoU, saved as ``frontier_<target>.png``."""
    path = Path(sweep_json)
    fig = privacy_figure(jsonio.read(path), "outline_iou", targets=[target], blind=blind, title=path.parent.name)
    return _save(_plt(), fig, Path(out) if out else path.parent / f"frontier_{target}.png", fig.dpi)


def _scheme_colour(label: str) -> str:
    """The colour of the scheme a label names (``nograd``, ``vanilla-nopeek``, ...), grey if none."""
    return next((c for s, c in SCHEME_COLOURS.items() if s in label), "grey")


def plot_sweep_curves(sweep_json: str | Path, x_label: str, blind: dict | None = None) -> list[Path]:
    """Utility and leakage against a swept number (the variants' ``x``), one line per (scheme,
    ``group``): ``sweep_utility.png`` (outline IoU, colour accuracy, FID on project features) and,
    when attacks ran, ``sweep_leakage.png``: per attack the mean SSIM of reconstructed private
    images (solid) and hints (dashed), or prompt accuracy, with ``blind`` ({"image", "hint"}: a
    transcript-free guess's SSIM) as dotted lines."""
    plt = _plt()
    path = Path(sweep_json)
    rows = [r for r in jsonio.read(path) if r.get("x") is not None]
    lines: dict[str, list[dict]] = {}
    for r in rows:
        lines.setdefault(r["scheme"] + (f" ({r['group']})" if r.get("group") else ""), []).append(r)
    styles = ["-o", "--s", ":^", "-.v"]
    groups = sorted({r.get("group", "") for r in rows})
    xs = [r["x"] for r in rows]
    log_x = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 8
    attacks = sorted({k[7:] for r in rows for k in r if k.startswith("attack:")})
    panels = {"sweep_utility.png": [(("outline_iou",), "outline IoU (higher is better \u2191)"),
                                    (("colour_acc",), "prompt-colour accuracy (higher is better \u2191)"),
                                    (("fid_project",), "FID (project features; lower is better \u2193)")],
              "sweep_leakage.png": [((f"image:{a}", f"hint:{a}", f"attack:{a}"), a + (
                  " accuracy (lower = more private \u2193)" if "prompt" in a else
                  " SSIM (lower = more private \u2193)\nimage (solid), hint (dashed)")) for a in attacks]}
    def numeric(key: str) -> bool:  # some row has a number under key (not N/A, not missing)
        return any(isinstance(r.get(key), (int, float)) for r in rows)

    written = []
    for name, keys in panels.items():
        keys = [(ks, lab) for ks, lab in keys if any(numeric(k) for k in ks)]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
        for ax, (ks, label) in zip(axes[0], keys):
            parts = [k for k in ks[:2] if numeric(k)] or [ks[-1]]
            for line, rs in sorted(lines.items()):
                for j, key in enumerate(parts):
                    pts = sorted((r["x"], r[key], r.get(f"{key}_se") if _num(r.get(f"{key}_se")) else 0.0)
                                 for r in rs if _num(r.get(key)))
                    if pts:
                        style = styles[(groups.index(rs[0].get("group", "")) + j) % len(styles)]
                        px_, py_, pe_ = zip(*pts)
                        ax.errorbar(px_, py_, yerr=pe_ if any(pe_) else None, fmt=style, color=_scheme_colour(line),
                                    ms=5.5 if j == 0 and len(parts) > 1 else 3.5, capsize=2, elinewidth=0.8,
                                    label=line if len(parts) == 1 else f"{line}: {key.split(':')[0]}")
            if name == "sweep_leakage.png":
                ax.set_ylim(-0.02, 1.02)
                for key in parts:
                    target = key.split(":")[0]
                    if blind and target in blind:
                        ax.axhline(blind[target], color="tab:red", lw=0.8, ls=":" if target == "image" else "-.")
                        ax.annotate(f"blind guess, {target} ({blind[target]:.2f})", (0.99, blind[target]), ha="right",
                                    xycoords=("axes fraction", "data"), fontsize=6.5, color="tab:red",
                                    xytext=(0, 2), textcoords="offset points")
            if ks[0] == "outline_iou" and rows and rows[0].get("base_outline_iou") is not None:
                ax.axhline(rows[0]["base_outline_iou"], color="grey", lw=0.8, ls=":", label="base, no control")
            if log_x:
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
            ax.set_xlabel(x_label, fontsize=8)
            ax.set_title(label, fontsize=8.5)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(("Utility" if "utility" in name else "Leakage") + f" against {x_label}", fontsize=10)
        fig.tight_layout()
        written.append(path.parent / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_variants(out: str | Path, names: list[str]) -> list[Path]:
    """``plot_run``'s loss, bytes and client-cost figures across a sweep's variants (one bar or
    curve per variant and scheme), written to ``out``; per-round loss curves in ``rounds.png``."""
    out = Path(out)
    rows, losses, rounds = [], [], []
    for name in names:
        run = out / name
        if not (run / "summary.json").exists():
            continue
        def label(scheme: str) -> str:  # "nograd-none" names its scheme; "none" of a nograd run does not
            return name if scheme in name else f"{scheme} {name}"

        rows += [{**r, "scheme": label(r["scheme"])} for r in jsonio.read(run / "summary.json")["rows"]
                 if "bytes_up_per_step" in r]
        losses += [{**d, "scheme": label(d["scheme"])} for d in map(json.loads, (run / "losses.jsonl").read_text().splitlines())]
        rounds += [{**d, "label": label(d["scheme"])} for d in map(json.loads, (run / "rounds.jsonl").read_text().splitlines())]
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp)
        (merged / "summary.json").write_text(json.dumps({"rows": rows}))
        (merged / "losses.jsonl").write_text("".join(json.dumps(d) + "\n" for d in losses))
        for p in plot_run(merged, colour=_scheme_colour):
            written.append(out / p.name)
            written[-1].write_bytes(p.read_bytes())
    if rounds:
        plt = _plt()
        labels = sorted({d["label"] for d in rounds})
        fig, ax = _series_axes(plt, len(labels))
        for i, lab in enumerate(labels):
            rs = [d for d in rounds if d["label"] == lab and d.get("loss") is not None]
            w = max(1, min(3, len(rs)))
            ax.plot([d["last_step"] + 1 for d in rs][w - 1:], _moving_average([d["loss"] for d in rs], w),
                    ["-", "--", ":", "-."][i % 4], color=_scheme_colour(lab), label=lab)
        ax.set_xlabel("training step at the end of the round or turn")
        ax.set_ylabel("round's mean loss (3-round avg)")
        ax.set_yscale("log")
        ax.set_title("Per-round training loss", fontsize=10)
        _series_legend(ax, len(labels), fontsize=7)
        fig.tight_layout()
        written.append(out / "rounds.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def plot_timeline(data: dict, out: str | Path, title: str = "", dashed: dict | None = None) -> Path:
    """Wall-clock per epoch against the number of clients, one panel per device/network setting
    (``data[setting][scheme] = [[clients, wall_s], ...]``, :func:`sim.commands.timeline.scaling`);
    ``dashed[setting]``: schemes drawn dashed because their client state does not fit the client's memory."""
    plt = _plt()
    dashed = dashed or {}
    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 4.4), sharey=True, squeeze=False)
    for ax, (setting, curves) in zip(axes[0], data.items()):
        for scheme, pts in curves.items():
            x, y = zip(*pts)
            unfit = scheme in dashed.get(setting, ())
            ax.plot(x, np.asarray(y) / 3600, marker="o", ms=3.5, lw=1.6, ls="--" if unfit else "-",
                    label=f"{scheme} (does not fit client memory)" if unfit else scheme,
                    color=_scheme_colour(scheme))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(setting, fontsize=10)
        ax.set_xlabel("number of clients (log)")
        ax.grid(True, which="both", alpha=0.25)
    axes[0][0].set_ylabel("wall-clock per epoch, hours (log; lower is better)")
    for ax in axes[0]:
        ax.legend(fontsize=7.5, loc="lower left")
    return _finish(plt, fig, out, title, dpi=130)
