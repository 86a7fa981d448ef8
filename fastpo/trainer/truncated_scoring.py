"""``--score-truncated``: which truncation the trainer's scorers apply, from the sampling settings.

vLLM (and the HF rollout) sample from the top-p-renormalised distribution and report its log-probs
(``processed_logprobs``); scoring the old / new / reference policy under the full softmax instead puts a
gap of −log(nucleus mass) between the rollout's and the trainer's log-probs. With the flag on (the
default when ``--top-p < 1``) every :class:`fastpo.trainer.batch.TokenScorer` scores the truncated
distribution (``linear_token_logprobs(..., top_p=)``).
"""

from __future__ import annotations

from typing import Dict


def score_truncated(cfg) -> bool:
    """Whether the trainer scores under the truncated distribution: ``--score-truncated`` if given, else
    whether the rollout truncates at all."""
    truncates = cfg.top_p < 1.0 or getattr(cfg, "top_k", 0) > 0
    return truncates if cfg.score_truncated is None else bool(cfg.score_truncated) and truncates


def scoring_truncation(cfg) -> Dict[str, float]:
    """The ``TokenScorer`` keyword arguments for ``cfg``: ``{"top_p": ..., "top_k": ...}`` or ``{}``."""
    if not score_truncated(cfg):
        return {}
    return {"top_p": cfg.top_p, "top_k": getattr(cfg, "top_k", 0)}


def apply_scoring_truncation(scorer, cfg):
    """Set ``cfg``'s scoring truncation on a ``TokenScorer`` (or a DDP / FSDP wrapper's ``module``); returns it."""
    target = getattr(scorer, "module", scorer)
    kw = scoring_truncation(cfg)
    target.top_k, target.top_p = int(kw.get("top_k", 0)), float(kw.get("top_p", 1.0))
    return scorer
