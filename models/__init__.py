"""Flax NNX LLaMA, size configs, mesh and sharding rules, and a sharded train step."""

from models.llama import CONFIGS, Llama, LlamaConfig, get_config, param_count
from models.sharding import (
    LOGICAL_AXIS_RULES,
    abstract_params,
    create_model,
    make_mesh,
    opt_state_shardings,
)
from models.train import TrainStep, logits_fn, loss_fn, make_train_step

__all__ = [
    "LlamaConfig",
    "CONFIGS",
    "get_config",
    "Llama",
    "param_count",
    "LOGICAL_AXIS_RULES",
    "make_mesh",
    "create_model",
    "abstract_params",
    "opt_state_shardings",
    "loss_fn",
    "logits_fn",
    "make_train_step",
    "TrainStep",
]
