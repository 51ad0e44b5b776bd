"""Weight refit after unit removal, from forward statistics only (docs/refit.md).

``refit(model, masks, calibration, method="lstsq")`` repairs the output projections (``o_proj``,
``down_proj``) of the surviving units so that each pruned layer reproduces the dense layer's output
on calibration text, layer by layer with the statistics of the already pruned model; call it on the
unpruned model before removal (``prune_model(model, masks, refit="lstsq", calibration=blocks)`` does
both). Methods: ``none``, ``bias`` (FLAP's mean compensation), ``lstsq`` (least squares).
"""

from .lstsq import SingularSystemError, lstsq_weights, relative_error
from .sequential import REFIT_METHODS, REFIT_TARGETS, ProjectionRefit, RefitReport, refit
from .statistics import InputStatistics, LayerStream, NonFiniteActivationError

__all__ = [
    "REFIT_METHODS",
    "REFIT_TARGETS",
    "InputStatistics",
    "LayerStream",
    "NonFiniteActivationError",
    "ProjectionRefit",
    "RefitReport",
    "SingularSystemError",
    "lstsq_weights",
    "refit",
    "relative_error",
]
