"""Metrics of representation learning: how a student's embeddings match a teacher's.

Distillation is tracked by metrics rather than tasks: :func:`mse`, :func:`normalized_mse`
and :func:`cosine` of the student's embeddings against the teacher's, also over the rows a
mask selects (:func:`distill_metrics` logs them all); :func:`cca` and :class:`WindowedCCA`,
the canonical correlations of projected embeddings at one step or over a sliding window of
steps; and :class:`SoftCCALoss` (with the functional :func:`sdl_loss`), the Soft CCA loss
that trains two views to be correlated.
"""
from fastlab.metrics.cca import WindowedCCA, cca, cca_from_covariances
from fastlab.metrics.distill import cosine, distill_metrics, mask_mean, mse, normalized_mse
from fastlab.metrics.soft_cca import SoftCCALoss, SoftCCAOutput, sdl_loss

__all__ = ["SoftCCALoss", "SoftCCAOutput", "WindowedCCA", "cca", "cca_from_covariances",
           "cosine", "distill_metrics", "mask_mean", "mse", "normalized_mse", "sdl_loss"]
