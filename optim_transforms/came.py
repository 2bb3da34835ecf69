"""CAME (placeholder until issue 7 lands)."""

__all__ = ["scale_by_came", "came"]


def scale_by_came(*, b1=0.9, b2=0.999, b3=0.9999, eps=(1e-30, 1e-16), clip_threshold=1.0):
    raise NotImplementedError("issue 7")


def came(learning_rate, *, weight_decay=0.0, cautious=False):
    raise NotImplementedError("issue 7")
