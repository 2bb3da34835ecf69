"""Chain specs: ``"grad_norm,whiten,cautious_mask(scale_by_adam),scale(-1e-3)"`` → `optax.chain`.

Grammar (parsed with `ast`, never evaluated): a comma-separated list of
transforms; a transform is a registry name (`optim_transforms.registry.TRANSFORMS`)
optionally called with arguments. Arguments are Python literals
(``b1=0.9``, ``method='svd'``, ``eps=(1e-30, 1e-16)``) or transforms
(``cautious_mask(scale_by_adam(b1=0.9))``). A bare name is always a
transform; quote strings.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

import optax

from optim_transforms import registry

__all__ = ["ChainSpecError", "TransformCall", "parse_chain", "build_chain"]


class ChainSpecError(ValueError):
    """A chain spec that does not parse or names an unknown transform/argument."""


@dataclasses.dataclass(frozen=True)
class TransformCall:
    """One parsed transform: registry name and arguments (which may be `TransformCall`s)."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _fail(spec: str, node: ast.AST | None, msg: str) -> ChainSpecError:
    where = ""
    if node is not None and hasattr(node, "col_offset"):
        col = node.col_offset - 1  # the spec is parsed inside "[...]"
        where = f"\n  {spec}\n  {' ' * max(col, 0)}^"
    return ChainSpecError(f"chain spec {spec!r}: {msg}{where}")


def _transform(spec: str, node: ast.AST, *, in_argument: bool = False) -> TransformCall:
    if isinstance(node, ast.Name):
        name, args, kwargs = node.id, [], []
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        name, args, kwargs = node.func.id, node.args, node.keywords
    else:
        raise _fail(spec, node, f"expected a transform name or call, got {ast.unparse(node)!r}")
    if name not in registry.TRANSFORMS:
        hint = f" (a string argument needs quotes: '{name}')" if in_argument else ""
        raise _fail(
            spec,
            node,
            f"unknown transform {name!r}{hint}; valid transforms: "
            + ", ".join(registry.transform_names()),
        )
    pos = tuple(_argument(spec, a) for a in args)
    kw = {}
    for k in kwargs:
        if k.arg is None:
            raise _fail(spec, k.value, "** arguments are not allowed")
        kw[k.arg] = _argument(spec, k.value)
    return TransformCall(name, pos, kw)


def _argument(spec: str, node: ast.AST) -> Any:
    if isinstance(node, ast.Name | ast.Call):
        return _transform(spec, node, in_argument=True)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise _fail(
            spec, node, f"argument {ast.unparse(node)!r} is neither a literal nor a transform"
        ) from None


def parse_chain(spec: str) -> list[TransformCall]:
    """Parses ``spec`` into `TransformCall`s (nested transforms likewise).

    Raises:
      ChainSpecError: syntax error, unknown transform, or non-literal argument.
    """
    if not spec or not spec.strip():
        raise ChainSpecError("empty chain spec")
    try:
        tree = ast.parse(f"[{spec}]", mode="eval")
    except SyntaxError as e:
        col = (e.offset or 1) - 2
        raise ChainSpecError(
            f"chain spec {spec!r} does not parse: {e.msg}\n  {spec}\n  {' ' * max(col, 0)}^"
        ) from None
    assert isinstance(tree.body, ast.List)
    return [_transform(spec, node) for node in tree.body.elts]


def _build(spec: str, call: TransformCall) -> optax.GradientTransformation:
    def arg(a):
        return _build(spec, a) if isinstance(a, TransformCall) else a

    args = [arg(a) for a in call.args]
    kwargs = {k: arg(v) for k, v in call.kwargs.items()}
    try:
        return registry.build_transform(call.name, *args, **kwargs)
    except NotImplementedError as e:
        raise ChainSpecError(
            f"chain spec {spec!r}: transform {call.name!r} is not implemented yet ({e})"
        ) from e
    except (TypeError, ValueError) as e:
        raise ChainSpecError(f"chain spec {spec!r}: bad arguments for {call.name!r}: {e}") from e


def build_chain(spec: str) -> optax.GradientTransformation:
    """`optax.chain` of the transforms in ``spec`` (see the module docstring).

    Raises:
      ChainSpecError: (a `ValueError`) on any problem, naming the transform and,
        for bad arguments, the valid ones.
    """
    return optax.chain(*[_build(spec, c) for c in parse_chain(spec)])
