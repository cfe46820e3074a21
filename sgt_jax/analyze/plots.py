"""matplotlib figures in the paper's layouts (Fig. 7: one t-SNE panel per checkpoint, points
coloured by class; Fig. 8a: per-layer change of attention to visual tokens relative to the base,
one line per checkpoint; Fig. 8b: attention share per word category, grouped bars per checkpoint)."""
from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tsne_panels(path: str, panels: list[tuple[str, np.ndarray]], labels, *, title: str = ""):
    """``panels``: [(checkpoint name, (N, 2) embedding)]; one panel each, a shared legend."""
    plt = _plt()
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, xy) in zip(axes[0], panels):
        for j, c in enumerate(classes):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=9, color=cmap(j % cmap.N), label=str(c), alpha=0.8, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def layer_lines(path: str, series: dict[str, np.ndarray], *, ylabel: str, title: str = ""):
    """One line per checkpoint over layers (Fig. 8a: differences from the base)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, ys in series.items():
        ax.plot(np.arange(len(ys)), ys, marker="o", ms=3, label=name)
    n = max(len(ys) for ys in series.values())
    ax.set_xticks(np.arange(0, n, max(1, n // 14)))
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def category_bars(path: str, shares: dict[str, dict[str, float]], categories, *, title: str = ""):
    """Grouped bars: attention share (%) per category, one bar per checkpoint (Fig. 8b)."""
    plt = _plt()
    names = list(shares)
    x = np.arange(len(categories))
    wd = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(1.3 * len(categories) + 2, 3.4))
    for i, n in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * wd, [shares[n].get(c, 0.0) for c in categories], wd, label=n)
    ax.set_xticks(x)
    ax.set_xticklabels(categories)
    ax.set_ylabel("attention share (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
