"""Composable optax transforms for memory-efficient and curvature-aware LLM pretraining.

SWAN (`grad_norm`, `whiten`), Sophia (`hutchinson_precond`, `clip_by_ratio`),
APOLLO (`random_proj_scale`), Cautious (`cautious_mask`) and CAME
(`scale_by_came`), each a factory returning an `optax.GradientTransformation`,
chained into named optimizers available by name through `build`.

This package imports jax, optax and numpy only (never flax).
"""

from optim_transforms.apollo import apollo, apollo_mini, norm_growth_limiter, random_proj_scale
from optim_transforms.came import came, scale_by_came
from optim_transforms.cautious import (
    cautious_adamw,
    cautious_lion,
    cautious_mask,
    scale_by_cautious_adam,
    scale_by_cautious_lion,
)
from optim_transforms.matrix import (
    MatrixDims,
    default_matrix_dims,
    map_matrices,
    matrix_labels,
    partition_matrices,
)
from optim_transforms.registry import build, build_transform, hyperparameters, names
from optim_transforms.sophia import (
    SophiaStepFns,
    clip_by_ratio,
    gnb_diag,
    hutchinson_diag,
    hutchinson_precond,
    is_refresh_step,
    resolve_refresh_phase,
    sophia_g,
    sophia_h,
    sophia_step_fns,
)
from optim_transforms.swan import grad_norm, swan, whiten

__version__ = "0.1.0"

__all__ = [
    # transforms
    "grad_norm",
    "whiten",
    "hutchinson_precond",
    "clip_by_ratio",
    "random_proj_scale",
    "norm_growth_limiter",
    "cautious_mask",
    "scale_by_cautious_adam",
    "scale_by_cautious_lion",
    "scale_by_came",
    # Hessian-diagonal estimators for Sophia
    "hutchinson_diag",
    "gnb_diag",
    "is_refresh_step",
    "resolve_refresh_phase",
    "sophia_step_fns",
    "SophiaStepFns",
    # named optimizers
    "swan",
    "sophia_h",
    "sophia_g",
    "apollo",
    "apollo_mini",
    "came",
    "cautious_adamw",
    "cautious_lion",
    # matrix view and parameter groups
    "MatrixDims",
    "default_matrix_dims",
    "map_matrices",
    "matrix_labels",
    "partition_matrices",
    # registry
    "build",
    "build_transform",
    "names",
    "hyperparameters",
]
