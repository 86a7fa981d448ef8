"""One module per algorithm family; :func:`make_algorithm` picks by ``--algo``."""

from .base import Algorithm, Experience
from .dpo import DPO, RPO, OnlineDPO
from .grpo import VARIANTS, GroupPolicyGradient, ReMax
from .ppo import PPO


def make_algorithm(name: str, trainer) -> Algorithm:
    if name == "ppo":
        return PPO(trainer)
    if name == "dpo":
        return DPO(trainer)
    if name == "rpo":
        return RPO(trainer)
    if name == "online_dpo":
        return OnlineDPO(trainer)
    if name == "remax":
        return ReMax(trainer)
    if name in VARIANTS:
        return GroupPolicyGradient(trainer, name)
    raise ValueError(f"unknown algorithm {name!r}")


__all__ = ["Algorithm", "Experience", "make_algorithm"]
