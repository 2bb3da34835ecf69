"""A LLaMA decoder in Flax NNX: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

The architecture is the one of `transformers`' ``LlamaForCausalLM`` (the model
the GaLore / APOLLO papers pre-train), so weights copied from it give the same
logits (``tests/test_llama.py``):

* pre-norm blocks ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, RMSNorm
  computed in float32 (``x * rsqrt(mean(x**2, axis=-1) + eps) * scale``);
* rotary embeddings in the "rotate half" convention: the head dimension is
  split into two halves ``(x1, x2)`` rotated as ``(x1 cos - x2 sin,
  x2 cos + x1 sin)`` with frequencies ``theta ** (-2i / head_dim)``;
* grouped-query attention: ``num_heads`` query heads share ``num_kv_heads``
  key/value heads (query head ``h`` reads kv head ``h // (num_heads //
  num_kv_heads)``), causal mask, softmax in float32;
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``; no biases anywhere.

Every kernel is a 2-D ``(in, out)`` ``nnx.Linear`` kernel (Flax layout; a
PyTorch ``Linear.weight`` is its transpose). Every parameter carries logical
axis names in its ``out_sharding`` metadata; `models.sharding` maps them to
mesh axes. A model built outside a mesh context is unsharded (the metadata is
kept), so ``Llama(config, rngs=nnx.Rngs(0))`` works on one device.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["LlamaConfig", "CONFIGS", "get_config", "Llama", "Block", "param_count"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and options of a LLaMA.

    ``dtype`` is the activation / compute dtype, ``param_dtype`` the storage
    dtype of the parameters. ``scan_layers`` stacks the blocks with
    `nnx.vmap` (every block parameter gets a leading layer axis) and runs them
    with `nnx.scan`; ``remat`` recomputes each block in the backward pass.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    scan_layers: bool = False
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig: {name}={getattr(self, name)!r} must be >= 1")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(
                f"LlamaConfig: num_heads={self.num_heads!r} must divide "
                f"hidden_size={self.hidden_size!r}"
            )
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_kv_heads={self.num_kv_heads!r} must divide "
                f"num_heads={self.num_heads!r}"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _paper(hidden: int, inter: int, heads: int, layers: int) -> LlamaConfig:
    # GaLore / APOLLO C4 configs: T5 tokenizer (vocab 32000), untied, MHA.
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
    )


CONFIGS: dict[str, LlamaConfig] = {
    "llama-1m": LlamaConfig(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=352,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=256,
    ),
    "llama-60m": _paper(512, 1376, 8, 8),
    "llama-130m": _paper(768, 2048, 12, 12),
    "llama-350m": _paper(1024, 2736, 16, 24),
    "llama-1b": _paper(2048, 5461, 32, 24),
    "llama-7b": _paper(4096, 11008, 32, 32),
}


def get_config(name: str, **overrides) -> LlamaConfig:
    """The config registered as ``name`` with ``overrides`` applied.

    Raises:
      ValueError: unknown name (listing the valid ones) or unknown field.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown LLaMA config {name!r}; valid names: {', '.join(CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown LlamaConfig field(s) {unknown}; valid ones: {sorted(fields)}")
    return dataclasses.replace(CONFIGS[name], **overrides)


def _init(stddev: float = 0.02):
    # HF LlamaPreTrainedModel: normal(0, initializer_range=0.02) for every matrix.
    return jax.nn.initializers.normal(stddev)


def _linear(cfg: LlamaConfig, din: int, dout: int, names: tuple, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=_init(),
        kernel_metadata={"out_sharding": names},
        rngs=rngs,
    )


def _constrain(x: jax.Array, names: tuple) -> jax.Array:
    from models.sharding import constrain  # models.sharding imports this module

    return constrain(x, names)


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x**2, axis=-1) + eps) * scale`` in float32 (last axis)."""

    def __init__(self, cfg: LlamaConfig):
        self.eps = cfg.rms_norm_eps
        self.scale = nnx.Param(
            jnp.ones((cfg.hidden_size,), jnp.dtype(cfg.param_dtype)), out_sharding=("norm",)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (y * scale).astype(x.dtype)


def rope_tables(cfg: LlamaConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of shape ``(seq_len, head_dim)`` in HF's rotate-half layout."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` of shape ``(B, T, heads, head_dim)`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (x32 * c + rotated * s).astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(cfg, d, cfg.num_heads * hd, ("embed", "heads"), rngs)
        self.k_proj = _linear(cfg, d, cfg.num_kv_heads * hd, ("embed", "kv"), rngs)
        self.v_proj = _linear(cfg, d, cfg.num_kv_heads * hd, ("embed", "kv"), rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * hd, d, ("heads", "embed"), rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, t, _ = x.shape
        hd, kv = cfg.head_dim, cfg.num_kv_heads
        group = cfg.num_heads // kv
        q = apply_rope(self.q_proj(x).reshape(b, t, cfg.num_heads, hd), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, kv, hd), cos, sin)
        v = self.v_proj(x).reshape(b, t, kv, hd)
        # query head h = j * group + g reads kv head j (HF repeat_kv order).
        q = q.reshape(b, t, kv, group, hd)
        scores = jnp.einsum("bqjgd,bkjd->bjgqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((1, 1, 1, t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bjgqk,bkjd->bqjgd", probs, v).reshape(b, t, cfg.num_heads * hd)
        return self.o_proj(out)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), rngs)
        self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), rngs)
        self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)


class Block(nnx.Module):
    """One pre-norm decoder block."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.mlp(self.mlp_norm(x))
        return _constrain(x, ("batch", "length", "act_embed"))


def _run_block(block: Block, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return block(x, cos, sin)


class Llama(nnx.Module):
    """LLaMA causal language model.

    Param paths: ``embed/embedding`` ``(vocab, d)``; per layer
    ``attn/{q,k,v,o}_proj/kernel``, ``mlp/{gate,up,down}_proj/kernel``,
    ``attn_norm/scale``, ``mlp_norm/scale``; ``norm/scale``; ``lm_head/kernel``
    ``(d, vocab)`` unless ``tie_embeddings``. Layers are ``layers/<i>/...``
    (an `nnx.List`) or, with ``scan_layers``, ``layers/...`` with a leading
    layer axis of logical name ``'layers'``.

    Args:
      config: a `LlamaConfig`.
      rngs: `nnx.Rngs` for the initializers.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        # Outside a mesh context, keep the logical names but do not shard.
        with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
            self._build(config, rngs)

    def _build(self, cfg: LlamaConfig, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=_init(),
            embedding_metadata={"out_sharding": ("vocab", "embed")},
            rngs=rngs,
        )
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stack(r: nnx.Rngs) -> Block:
                return Block(cfg, rngs=r)

            self.layers = stack(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``float32[B, T, vocab]`` for ``int32[B, T]`` tokens (causal)."""
        cfg = self.config
        t = tokens.shape[1]
        if t > cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={cfg.max_seq_len}")
        cos, sin = rope_tables(cfg, t)
        # Gather from the full table (an FSDP all-gather, like every weight):
        # XLA cannot gather from a vocab-sharded table into batch-sharded rows.
        table = _constrain(self.embed.embedding[...], (None, None))
        x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(cfg.dtype))
        x = _constrain(x, ("batch", "length", "act_embed"))
        run = nnx.remat(_run_block) if cfg.remat else _run_block
        if cfg.scan_layers:

            @nnx.scan(
                in_axes=(0, nnx.Carry),
                out_axes=nnx.Carry,
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            def scan_fn(block: Block, h: jax.Array) -> jax.Array:
                return run(block, h, cos, sin)

            x = scan_fn(self.layers, x)
        else:
            for block in self.layers:
                x = run(block, x, cos, sin)
        x = self.norm(x)
        if cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        return _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def param_count(config: LlamaConfig) -> int:
    """Number of parameters of ``Llama(config)``, from `nnx.eval_shape` (no allocation)."""
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
