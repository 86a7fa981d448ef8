"""Load OpenRLHF 0.11's real ``openrlhf/models/loss.py`` on a CPU machine without its package ``__init__``.

``openrlhf.models`` imports the actor (flash-attn) and ``openrlhf.models.utils`` imports deepspeed, neither
installable here. This registers a bare ``openrlhf.models`` package pointing at the installed directory and an
``openrlhf.models.utils`` holding only the installed ``masked_mean`` (its source, unchanged, taken from the
file with ``ast``), then imports the installed ``loss.py`` as is. Returns the module, or None when openrlhf is
not installed.
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
    utils_path = os.path.join(root, "models", "utils.py")
    tree = ast.parse(open(utils_path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "masked_mean")
    utils = types.ModuleType("openrlhf.models.utils")
    utils.__file__ = utils_path
    import torch

    exec(compile(ast.Module(body=[fn], type_ignores=[]), utils_path, "exec"),
         {"torch": torch, "Optional": Optional, "__name__": utils.__name__}, utils.__dict__)
    sys.modules["openrlhf.models.utils"] = utils
    pkg.utils = utils
    loss = importlib.import_module("openrlhf.models.loss")
    pkg.loss = loss
    pkg.PolicyLoss, pkg.ValueLoss, pkg.aggregate_loss = loss.PolicyLoss, loss.ValueLoss, loss.aggregate_loss
    return loss
