"""Adapters that plug fastpo's fused ops into other trainers.

Each submodule imports its trainer; this package imports none of them, so ``import fastpo`` never
imports verl or TRL. ``fastpo.integrations.verl`` registers the ``fastpo_<name>`` policy losses with
verl (use it as ``actor_rollout_ref.model.external_lib=fastpo.integrations.verl``).
"""
