"""APOLLO (placeholder until issue 5 lands)."""

__all__ = ["random_proj_scale", "norm_growth_limiter", "apollo", "apollo_mini"]


def random_proj_scale(*, rank, scale_type="channel", update_proj_gap=200):
    raise NotImplementedError("issue 5")


def norm_growth_limiter(gamma=1.01):
    raise NotImplementedError("issue 5")


def apollo(learning_rate, *, rank=256, cautious=False):
    raise NotImplementedError("issue 5")


def apollo_mini(learning_rate, *, cautious=False):
    raise NotImplementedError("issue 5")
