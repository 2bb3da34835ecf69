"""Benchmarks and the results page (``BENCHMARKS.md``).

Programs, each runnable on its own (``python -m experiments.bench.<name>``):

* `memory`: optimizer-state bytes / param bytes on LLaMA 60M ... 7B
  (`jax.eval_shape`, no allocation), next to ALGORITHMS.md §6 and the papers.
* `planner`: per-device bytes of params, grads and optimizer state for a
  model, mesh and optimizer, from the sharding rules (no allocation).
* `peak`: compiled peak memory of the full train step, ratio to AdamW.
* `speed`: jitted update + apply_updates time, ratio to ``optax.adamw``, and
  the PyTorch references.
* `convergence`: `experiments.compare` on llama-1m, 3 seeds.

``python -m experiments.bench [--quick]`` runs them all and writes the page.
Optimizers that are not implemented yet are listed as "not available".
"""
