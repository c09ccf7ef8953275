"""The SEDD math, pure torch: graphs, noise schedules, the loss and ELBO, samplers.

Nothing here imports Ray or :mod:`sedd_ray.config`. Graphs, noises and predictors are
looked up by name in registries (:data:`GRAPHS`, :data:`NOISES`, :data:`PREDICTORS`); an
unknown name raises ``ValueError`` listing the valid ones.
"""

from sedd_ray.diffusion.graphs import (
    GRAPHS,
    Absorbing,
    Graph,
    Uniform,
    get_graph,
    sample_categorical,
)
from sedd_ray.diffusion.loss import elbo_nll, sample_times, score_entropy_loss
from sedd_ray.diffusion.noise import NOISES, Geometric, LogLinear, Noise, get_noise
from sedd_ray.diffusion.sampling import (
    PREDICTORS,
    DenoiserScore,
    analytic_step,
    conditioning_from_prefix_suffix,
    denoise_step,
    euler_step,
    get_predictor,
    model_score_fn,
    sample,
)

__all__ = [
    "GRAPHS",
    "NOISES",
    "PREDICTORS",
    "Absorbing",
    "DenoiserScore",
    "Geometric",
    "Graph",
    "LogLinear",
    "Noise",
    "Uniform",
    "analytic_step",
    "conditioning_from_prefix_suffix",
    "denoise_step",
    "elbo_nll",
    "euler_step",
    "get_graph",
    "get_noise",
    "get_predictor",
    "model_score_fn",
    "sample",
    "sample_categorical",
    "sample_times",
    "score_entropy_loss",
]
