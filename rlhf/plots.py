"""Figures as PNG bytes, without pyplot or a display: what `rlhf report` and `rlhf study` draw on."""

from __future__ import annotations

import io


def new_figure(panels: int, columns: int = 4, size: tuple[float, float] = (3.4, 2.4)):
    """A matplotlib Figure with a grid of `panels` axes; Figure() needs no pyplot and no display."""
    from matplotlib.figure import Figure

    columns = min(columns, panels)
    rows = -(-panels // columns)
    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return figure, list(axes[:panels])


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()
