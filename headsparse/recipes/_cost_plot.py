"""What both reports' quality-against-cost plots share: the matplotlib import, the base model's band, an arm's point
with its 95% CI, and the axes, legend and atomic save."""
from __future__ import annotations

from typing import Dict

from .._atomic import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None where matplotlib cannot be imported (no plot then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def base_band(ax, q: float, ci: Dict, label: str) -> None:
    """The untuned model: a dashed line at its quality and a grey band over its CI."""
    ax.axhline(q, color="grey", ls="--", lw=1, label=label)
    ax.axhspan(ci["low"], ci["high"], color="grey", alpha=0.15)


def point(ax, x: float, q: float, ci: Dict, fmt: str = "o", **kwargs):
    """One arm's quality with its 95% CI as an error bar at cost ``x``."""
    return ax.errorbar(x, q, yerr=[[q - ci["low"]], [ci["high"] - q]], fmt=fmt, **kwargs)


def save(plt, fig, ax, title: str, path: str,
         xlabel: str = "cost: (T_select + T_train) / T_full (log scale)") -> str:
    """Log-scale cost axis, labels, legend; written to ``path`` atomically."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out quality (95% CI)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
