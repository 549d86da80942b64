"""One benchmark plot: a single-axes figure written as a PNG (matplotlib without a display)."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def single_plot(path: Path, size: tuple[float, float] = (6, 4), dpi: int = 120):
    """Yields the axes; on leaving, lays the figure out, writes it to `path` and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
