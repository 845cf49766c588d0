"""Per-layer error plots on a log scale, the graphs people draw by hand when hunting port bugs.

One plot per run (implementation pair and dtype): relative L2 distance of every canonical point
in forward order, with the noise floor drawn as a band (floor to floor x threshold). matplotlib
is imported here only, with the non-interactive Agg backend.
"""

from __future__ import annotations

import io
import math


def _finite_positive(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _gradient(name: str) -> bool:
    """A `--grad` run's loss or gradient (`llmdiff/grad.py`), not a forward point."""
    return name == "loss" or name.startswith("grad:")


def _png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _layer_ticks(ax, names: list[str]) -> None:
    """x ticks at the embedding, each layer's first point (labelled by its layer), the final
    norm and the logits."""
    ticks = [i for i, n in enumerate(names) if n in ("embed", "final_norm", "logits") or n.endswith(".attn_norm")]
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[i].replace(".attn_norm", "") for i in ticks], rotation=45, fontsize=7)


def run_plot_png(run: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in run["points"] if "rel_l2" in p]
    xs = list(range(len(points)))
    tiny = min([p["noise_floor"] for p in points if _finite_positive(p.get("noise_floor"))] or [1e-12]) / 10
    err = [p["rel_l2"] if _finite_positive(p["rel_l2"]) else tiny for p in points]
    floor = [p["noise_floor"] for p in points]
    band_top = [p["noise_floor"] * p.get("threshold", 8.0) for p in points]
    fig, ax = plt.subplots(figsize=(10, 3.6), dpi=100)
    ax.fill_between(xs, floor, band_top, color="#9ecae1", alpha=0.45, step="mid",
                    label="noise floor .. threshold")
    ax.plot(xs, err, marker="o", markersize=3, linewidth=1.2, color="#08306b", label="rel L2 vs reference")
    bad = [i for i, p in enumerate(points) if p["verdict"] == "divergence"]
    if bad:
        ax.scatter(bad, [err[i] for i in bad], color="#cb181d", zorder=3, s=18, label="divergent")
    ax.set_yscale("log")
    _layer_ticks(ax, [p["name"] for p in points])
    ax.set_ylabel("relative L2")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def heatmap_png(run: dict, title: str) -> bytes | None:
    """Layer x position: each block output's relative L2 per position (log colour), the embedding
    on top and the logits at the bottom, a line where the first divergence starts. Errors that
    grow with position (RoPE precision, windows, scaling) show as a gradient to the right; a bug
    on one kind of layer as stripes. None without per-position errors (sketched captures)."""
    rows = [p for p in run["points"] if p.get("by_position") and
            (p["name"] in ("embed", "logits") or (p["name"].endswith(".out") and not _gradient(p["name"])))]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    width = max(len(p["by_position"]) for p in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, p in enumerate(rows):
        grid[i, :len(p["by_position"])] = [v if _finite_positive(v) else np.nan for v in p["by_position"]]
    good = grid[np.isfinite(grid)]
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(rows) + 1.6), dpi=100)
    if good.size:
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma",
                          norm=LogNorm(vmin=max(good.min(), 1e-12), vmax=max(good.max(), good.min() * 10)))
        fig.colorbar(image, ax=ax, label="relative L2", pad=0.01)
    first = next((p for p in run["points"] if p["name"] == run.get("first_divergence")), {})
    if first.get("diverges_from") is not None:
        ax.axvline(first["diverges_from"] - 0.5, color="#4daf4a", linewidth=1.5,
                   label=f"{first['name']} diverges from position {first['diverges_from']}")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([p["name"].replace(".out", "") for p in rows], fontsize=7)
    ax.set_xlabel("position")
    ax.set_title(f"{title}: error per layer and position", fontsize=10)
    return _png(fig)


def finding_png(run: dict, finding: dict) -> bytes | None:
    """A confirmed finding's evidence on the per-layer axes: the candidate against the oracle,
    and against the oracle with the bug's knob on (`evidence.curve`)."""
    curve = finding.get("evidence", {}).get("curve")
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = curve["points"]
    xs = list(range(len(names)))
    floors = [f if _finite_positive(f) else None for f in curve.get("floor", [])]
    values = [v for series in (curve["before"], curve["after"], floors) for v in series if _finite_positive(v)]
    tiny = min(values or [1e-12]) / 10
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
    for key, label, color in (("before", "vs oracle", "#cb181d"), ("after", "vs oracle with the knob", "#08306b")):
        ax.plot(xs, [v if _finite_positive(v) else tiny for v in curve[key]], marker="o", markersize=3,
                linewidth=1.2, color=color, label=label)
    if floors:
        ax.plot(xs, [f if f else tiny for f in floors], linestyle=":", color="#636363", label="noise floor")
    ax.set_yscale("log")
    _layer_ticks(ax, names)
    knob = ", ".join(f"{k}={v!r}" for k, v in finding["evidence"].get("knob", {}).items())
    ax.set_title(f"{finding['code']} {finding['name']} [{finding['dtype']}]: {knob}", fontsize=10)
    ax.set_ylabel("relative L2")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


_BARS = "▁▂▃▄▅▆▇█"


def layer_sparkline(run: dict) -> str:
    """The block outputs' relative L2 as a one-line log-scale bar chart, for the terminal."""
    values = [p["rel_l2"] for p in run["points"]
              if p["name"].endswith(".out") and not _gradient(p["name"]) and "rel_l2" in p]
    good = [v for v in values if _finite_positive(v)]
    if not good:
        return ""
    lo, hi = math.log10(min(good)), math.log10(max(good))
    span = max(hi - lo, 1e-9)
    bars = "".join("!" if not _finite_positive(v) and v not in (0, 0.0) else " " if not _finite_positive(v)
                   else _BARS[min(len(_BARS) - 1, int((math.log10(v) - lo) / span * (len(_BARS) - 1) + 0.5))]
                   for v in values)
    return f"{bars}  ({min(good):.1e} .. {max(good):.1e}, log scale, layer 0 .. {len(values) - 1})"
