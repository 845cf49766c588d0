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
    ticks = [i for i, p in enumerate(points) if p["name"] in ("embed", "final_norm", "logits")
             or p["name"].endswith(".attn_norm")]
    ax.set_xticks(ticks)
    ax.set_xticklabels([points[i]["name"].replace(".attn_norm", "") for i in ticks], rotation=45, fontsize=7)
    ax.set_ylabel("relative L2")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


_BARS = "▁▂▃▄▅▆▇█"


def layer_sparkline(run: dict) -> str:
    """The block outputs' relative L2 as a one-line log-scale bar chart, for the terminal."""
    values = [p["rel_l2"] for p in run["points"] if p["name"].endswith(".out") and "rel_l2" in p]
    good = [v for v in values if _finite_positive(v)]
    if not good:
        return ""
    lo, hi = math.log10(min(good)), math.log10(max(good))
    span = max(hi - lo, 1e-9)
    bars = "".join("!" if not _finite_positive(v) and v not in (0, 0.0) else " " if not _finite_positive(v)
                   else _BARS[min(len(_BARS) - 1, int((math.log10(v) - lo) / span * (len(_BARS) - 1) + 0.5))]
                   for v in values)
    return f"{bars}  ({min(good):.1e} .. {max(good):.1e}, log scale, layer 0 .. {len(values) - 1})"
