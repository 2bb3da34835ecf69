"""Sophia (placeholder until issue 10 lands)."""

__all__ = [
    "hutchinson_diag",
    "gnb_diag",
    "hutchinson_precond",
    "clip_by_ratio",
    "sophia_h",
    "sophia_g",
]


def hutchinson_diag(loss_fn, params, batch, key):
    raise NotImplementedError("issue 10")


def gnb_diag(logits_fn, params, batch, key):
    raise NotImplementedError("issue 10")


def hutchinson_precond(*, b2=0.99, update_every=10, rho=0.01, eps=1e-12):
    raise NotImplementedError("issue 10")


def clip_by_ratio(*, threshold=1.0):
    raise NotImplementedError("issue 10")


def sophia_h(learning_rate, *, cautious=False):
    raise NotImplementedError("issue 10")


def sophia_g(learning_rate, *, cautious=False):
    raise NotImplementedError("issue 10")
