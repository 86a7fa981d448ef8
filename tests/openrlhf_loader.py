"""Load OpenRLHF 0.11's real ``openrlhf/models/loss.py`` on a CPU machine without its package ``__init__``.

``openrlhf.models`` imports the actor (flash-attn) and ``openrlhf.models.utils`` imports deepspeed, neither
installable here. This registers a bare ``openrlhf.models`` package pointing at the installed directory and an
``openrlhf.models.utils`` holding only the installed ``masked_mean`` (its source, unchanged, taken from the
file with ``ast``), then imports the installed ``loss.py`` as is. Returns the module, or None when openrlhf is
not installed.

:func:`load_openrlhf_actor` does the same for ``openrlhf/models/actor.py``: ``openrlhf.models.utils`` then also
holds the installed ``_logsumexp_by_chunk``, ``log_probs_from_logits``, ``compute_entropy`` and
``set_z3_leaf_modules`` (their source, decorators included), ``openrlhf.models.ring_attn_utils`` (flash-attn:
the packing path only) is a stand-in whose functions raise, and ``openrlhf.utils`` is a bare package (its
``__init__`` imports the math grader's pylatexenc) so that the installed ``openrlhf/utils/utils.py`` imports.
"""

import ast
import importlib
import importlib.util
import os
import sys
import types
from typing import Optional


def load_openrlhf_loss():
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or spec.origin is None:
        return None
    if "openrlhf.models.loss" in sys.modules:
        return sys.modules["openrlhf.models.loss"]
    root = os.path.dirname(spec.origin)
    try:  # the real package where its dependencies are installed (a GPU machine)
        return importlib.import_module("openrlhf.models.loss")
    except ImportError:
        for name in [n for n in sys.modules if n == "openrlhf.models" or n.startswith("openrlhf.models.")]:
            del sys.modules[name]
    pkg = types.ModuleType("openrlhf.models")
    pkg.__path__ = [os.path.join(root, "models")]
    sys.modules["openrlhf.models"] = pkg
    utils = _utils_module(os.path.join(root, "models", "utils.py"))
    sys.modules["openrlhf.models.utils"] = utils
    pkg.utils = utils
    loss = importlib.import_module("openrlhf.models.loss")
    pkg.loss = loss
    pkg.PolicyLoss, pkg.ValueLoss, pkg.aggregate_loss = loss.PolicyLoss, loss.ValueLoss, loss.aggregate_loss
    return loss


_UTILS = ("masked_mean", "_logsumexp_by_chunk", "log_probs_from_logits", "compute_entropy", "set_z3_leaf_modules")


def _utils_module(utils_path):
    """``openrlhf.models.utils`` with only the installed functions in :data:`_UTILS` (no deepspeed import)."""
    import torch

    tree = ast.parse(open(utils_path).read())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in _UTILS]
    utils = types.ModuleType("openrlhf.models.utils")
    utils.__file__ = utils_path
    utils.__dict__.update(torch=torch, F=torch.nn.functional, nn=torch.nn, os=os, Optional=Optional)
    exec(compile(ast.Module(body=fns, type_ignores=[]), utils_path, "exec"), utils.__dict__)
    return utils


def _needs_flash_attn(*args, **kwargs):
    raise ImportError("openrlhf's packing path needs flash-attn (not installed here)")


def load_openrlhf_actor():
    """The installed ``openrlhf.models.actor`` module (see the module docstring), or None without openrlhf."""
    if load_openrlhf_loss() is None:
        return None
    if "openrlhf.models.actor" in sys.modules:
        return sys.modules["openrlhf.models.actor"]
    try:
        return importlib.import_module("openrlhf.models.actor")
    except ImportError:
        pass
    root = os.path.dirname(importlib.util.find_spec("openrlhf").origin)
    ring = types.ModuleType("openrlhf.models.ring_attn_utils")
    ring.gather_and_pad_tensor = ring.unpad_and_slice_tensor = _needs_flash_attn
    sys.modules[ring.__name__] = ring
    if "openrlhf.utils" not in sys.modules:
        pkg = types.ModuleType("openrlhf.utils")
        pkg.__path__ = [os.path.join(root, "utils")]
        sys.modules["openrlhf.utils"] = pkg
    return importlib.import_module("openrlhf.models.actor")
