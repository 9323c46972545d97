"""The picture of a divergence event: the last window of every watched series with the event marked, and the
per-layer gradient norms of the step. The guard writes one beside each event; `python -m trainer.replay` draws
one
with the norms it measured again.
"""

import math
from pathlib import Path

Series = dict[str, list[tuple[int, float]]]  # name -> (step, value) pairs, oldest first

MAX_LAYERS = 30  # the largest gradients (and every non-finite one); a transformer has hundreds of layers


def draw_event(
    path: Path,
    title: str,
    series: Series,
    step: int,
    layer_norms: dict[str, float],
    layers_title: str = "gradient norm per layer at the event",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, points in series.items() if points]
    columns = 2 if len(names) > 3 else 1
    rows = max(1, math.ceil(len(names) / columns))
    layers = _largest(layer_norms)
    fig = plt.figure(
        figsize=(
            6 * columns + 5,
            max(3.0, 1.8 * rows),
        ),
        constrained_layout=True,
    )
    grid = fig.add_gridspec(rows, columns + 1, width_ratios=[3] * columns + [2.5])
    for i, name in enumerate(names):
        _plot_series(fig.add_subplot(grid[i // columns, i % columns]), name, series[name], step)
    _plot_layers(fig.add_subplot(grid[:, columns]), layers, layers_title)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _plot_series(ax, name: str, points: list[tuple[int, float]], step: int) -> None:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    broken = [s for s, v in points if not math.isfinite(v)]
    if finite:
        steps, values = zip(*finite)
        ax.plot(steps, values, lw=0.8, color="tab:blue")
        if min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")
    for s in broken:
        ax.axvline(s, color="black", lw=0.6, ls=":")
    ax.axvline(step, color="red", lw=1.0, ls="--")
    ax.set_title(name + (" (dotted: NaN/Inf)" if broken else ""), fontsize=8)
    ax.tick_params(labelsize=7)


def _plot_layers(ax, layers: dict[str, float], title: str) -> None:
    if not layers:
        ax.set_axis_off()
        return
    finite = [v for v in layers.values() if math.isfinite(v) and v > 0]
    top = max(finite) * 10 if finite else 1.0
    names = list(layers)[::-1]  # largest at the top
    values = [layers[n] if math.isfinite(layers[n]) else top for n in names]
    colors = ["tab:red" if not math.isfinite(layers[n]) else "tab:gray" for n in names]
    ax.barh(range(len(names)), [max(v, 1e-12) for v in values], color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xscale("log")
    ax.set_title(title + " (red: NaN/Inf)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)


def _largest(norms: dict[str, float]) -> dict[str, float]:
    order = sorted(
        norms, key=lambda n: (math.isfinite(norms[n]), -norms[n] if math.isfinite(norms[n]) else 0)
    )
    return {n: norms[n] for n in order[:MAX_LAYERS]}
