"""Bring a traced graph to the plain form the re-parameterizer reads.

Real models (timm, torchvision) hold more than ``conv -> BatchNorm2d``: ``nn.Identity`` and
eval-mode dropout placeholders, ``x + 0`` left by ``out = 0; out += branch`` loops,
``torch._assert(x.ndim == 4)`` inside norm wrappers (an extra user of the conv output), and
per-channel constants computed from buffers at run time (``FrozenBatchNorm2d``,
``gamma.view(1, -1, 1, 1)``). Each pass here removes one of these exactly; none changes
what the graph computes for inputs of the traced rank.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.fx.node import map_arg

CONST_PREFIX = "_deploykit_const"
_NO_OP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
_RANK_ATTRS = {"ndim"}
_RANK_METHODS = {"dim", "ndimension"}
_RANDOM_WORDS = ("rand", "dropout", "bernoulli", "normal", "multinomial", "poisson")


def bn_like_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every BatchNorm in ``model``: ``_BatchNorm`` subclasses and frozen BNs (running stats as buffers)."""
    found = {}
    for name, module in model.named_modules():
        buffers = dict(module.named_buffers(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) or {"running_mean", "running_var"} <= set(buffers):
            found[name] = module
    return found


def _substitute(node: fx.Node, value: Any) -> None:
    """Replace every use of ``node`` by the Python constant ``value``."""
    for user in list(node.users):
        user.args = map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = map_arg(user.kwargs, lambda n: value if n is node else n)


def _fold_rank(gm: fx.GraphModule) -> int:
    """``x.ndim`` / ``x.dim()`` become the traced rank: a fused graph keeps its input rank."""
    count = 0
    for node in list(gm.graph.nodes):
        meta = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            continue
        is_attr = node.op == "call_function" and node.target is getattr and node.args[1] in _RANK_ATTRS
        is_method = node.op == "call_method" and node.target in _RANK_METHODS and len(node.args) == 1
        if is_attr or is_method:
            _substitute(node, len(meta.shape))
            gm.graph.erase_node(node)
            count += 1
    return count


def _drop_true_asserts(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch._assert and node.args and node.args[0] is True:
            gm.graph.erase_node(node)
            count += 1
    return count


def _is_zero(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _is_one(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1


def _passthrough(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The input that ``node`` returns unchanged, or None."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        module = gm.get_submodule(node.target)
        if isinstance(module, _NO_OP_MODULES) and (isinstance(module, nn.Identity) or not module.training):
            return node.args[0] if isinstance(node.args[0], fx.Node) else None
        return None
    if node.op != "call_function":
        return None
    if node.target in _DROPOUT_FUNCTIONS and isinstance(node.args[0], fx.Node):
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return node.args[0] if training is False else None
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if node.target in (operator.add, torch.add, operator.sub, torch.sub) and _is_zero(b) and isinstance(a, fx.Node):
        return a
    if node.target in (operator.add, torch.add) and _is_zero(a) and isinstance(b, fx.Node):
        return b
    if node.target in (operator.mul, torch.mul) and isinstance(a, fx.Node) and _is_one(b):
        return a
    if node.target in (operator.mul, torch.mul) and isinstance(b, fx.Node) and _is_one(a):
        return b
    return None


def _drop_passthroughs(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        source = _passthrough(gm, node)
        if source is not None:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            count += 1
    return count


def _attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _free_name(gm: fx.GraphModule) -> str:
    i = 0
    while hasattr(gm, f"{CONST_PREFIX}{i}"):
        i += 1
    return f"{CONST_PREFIX}{i}"


def _foldable(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    name = getattr(node.target, "__name__", str(node.target))
    return not any(word in name.lower() for word in _RANDOM_WORDS)


def _fold_constants(gm: fx.GraphModule) -> dict[str, set[str]]:
    """Evaluate ops whose inputs are all parameters/buffers/literals; returns new buffer -> sources."""
    values: dict[fx.Node, Any] = {}
    sources: dict[fx.Node, set[str]] = {}
    provenance: dict[str, set[str]] = {}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            values[node], sources[node] = _attr(gm, node.target), {node.target}
            continue
        inputs = node.all_input_nodes
        literal_op = not inputs and getattr(node.target, "__module__", None) == "_operator"
        if not (inputs or literal_op) or not _foldable(node) or not all(n in values for n in inputs):
            continue
        args = map_arg(node.args, lambda n: values[n])
        kwargs = map_arg(node.kwargs, lambda n: values[n])
        with torch.no_grad():
            if node.op == "call_function":
                value = node.target(*args, **kwargs)
            else:
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
        origin = set().union(*(sources[n] for n in inputs))
        if isinstance(value, torch.Tensor):
            name = _free_name(gm)
            gm.register_buffer(name, value.detach().clone().contiguous())
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(name)
            const.meta = dict(node.meta)
            node.replace_all_uses_with(const)
            values[const], sources[const] = getattr(gm, name), origin
            provenance[name] = {s for s in origin if not s.startswith(CONST_PREFIX)} | set().union(
                *(provenance.get(s, set()) for s in origin)
            )
        elif isinstance(value, (bool, int, float)):
            _substitute(node, value)
        else:
            continue
        gm.graph.erase_node(node)
    return provenance


def normalize(gm: fx.GraphModule) -> dict[str, set[str]]:
    """Apply every pass in place (``gm`` must carry ShapeProp metadata); returns constant provenance."""
    _fold_rank(gm)
    provenance = _fold_constants(gm)
    _drop_true_asserts(gm)
    _drop_passthroughs(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return provenance
