"""Figures (matplotlib, imported lazily with the Agg backend; never imported by core modules).

Every figure is a function of data (tensors, table rows), not of a run directory, so pipelines,
notebooks and ``experiments/docs_figures.py`` draw with the same code; each writes one PNG of
``px = (width, height)`` pixels when given (else a size that fits its panels, at 100 px an inch),
in the colour-blind-safe palette of :mod:`flowmatch.viz._style` with a marker and a line style per
series, so series stay apart in greyscale.

- :mod:`flowmatch.viz.toy`: trajectories per stage over the densities; samples over the target.
- :mod:`flowmatch.viz.curves`: quality against NFE with the noise floor as a band; Pareto,
  curvature, loss per t-bin, straightness per stage; methods against NFE and against training cost
  (the few-step table's Pareto plots).
- :mod:`flowmatch.viz.images`: image grids; samples per stage and NFE beside real images.
- :mod:`flowmatch.viz.docs`: the README's figures from ``make demo`` / ``make reflow`` outputs.
"""

from flowmatch.viz.curves import (FloorBand, floor_band, plot_curvature_by_t, plot_loss_by_t,
                                  plot_method_quality_vs_cost, plot_method_quality_vs_nfe, plot_pareto,
                                  plot_quality_vs_nfe, plot_straightness_by_stage, plot_w2_vs_nfe)
from flowmatch.viz.images import (image_grid, plot_image_panels, plot_image_stage_grid, plot_image_trajectories,
                                  save_image_grid)
from flowmatch.viz.toy import plot_sample_grid, plot_samples, plot_trajectories, plot_trajectory_grid

__all__ = ["plot_samples", "plot_trajectories", "plot_w2_vs_nfe", "plot_loss_by_t", "plot_trajectory_grid",
           "plot_straightness_by_stage", "plot_pareto", "plot_curvature_by_t", "image_grid", "save_image_grid",
           "plot_image_panels", "plot_image_trajectories",
           "plot_sample_grid", "plot_quality_vs_nfe", "FloorBand", "floor_band", "plot_image_stage_grid",
           "plot_method_quality_vs_nfe", "plot_method_quality_vs_cost"]
