"""SWAN (placeholder until issue 4 lands)."""

__all__ = ["grad_norm", "whiten", "swan"]


def grad_norm(*, eps=1e-8):
    raise NotImplementedError("grad_norm: issue 4")


def whiten(*, method="newton_schulz", ns_steps=10):
    raise NotImplementedError("whiten: issue 4")


def swan(learning_rate, *, cautious=False):
    raise NotImplementedError("swan: issue 4")
