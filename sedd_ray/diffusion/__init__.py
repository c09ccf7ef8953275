"""The SEDD math, pure torch: graphs, noise schedules, the loss and ELBO, samplers.

Nothing here imports Ray or :mod:`sedd_ray.config`. Graphs, noises and predictors are
looked up by name in registries (:data:`GRAPHS`, :data:`NOISES`, :data:`PREDICTORS`); an
unknown name raises ``ValueError`` listing the valid ones. A graph or noise registered from
outside the package is a first-class citizen: its constructor's typed keywords are its
parameters (:class:`Param`), and everything the code does differently for a graph is a
:class:`Graph` method (see ``docs/extending.md``).
"""

from sedd_ray.diffusion.graphs import (
    GRAPHS,
    MASK_LOG_SCORE,
    Absorbing,
    Graph,
    Uniform,
    get_graph,
    sample_categorical,
)
from sedd_ray.diffusion.loss import elbo_nll, sample_times, score_entropy_loss
from sedd_ray.diffusion.noise import (
    NOISES,
    Geometric,
    LogLinear,
    MaskConditioned,
    Noise,
    get_noise,
)
from sedd_ray.diffusion.params import Param
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
    "MASK_LOG_SCORE",
    "NOISES",
    "PREDICTORS",
    "Absorbing",
    "DenoiserScore",
    "Geometric",
    "Graph",
    "LogLinear",
    "MaskConditioned",
    "Noise",
    "Param",
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
