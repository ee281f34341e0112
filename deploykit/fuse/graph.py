"""Generic structural re-parameterization on a torch.fx graph.

Walks the traced graph once, describing every node that is an affine convolution of some
other node as a ``ConvTerm``: convolutions and linears themselves, BatchNorm after them
(folded), per-channel constant scales (``s * conv(x)``), BatchNorm or identity branches on a
block input, and sums of parallel terms that read the same input (RepVGG's 3x3 ∥ 1x1 ∥
identity). A term whose value is needed by something that is not itself linear is then
materialized as one conv. Nothing is model-specific: the rules see only modules and ops.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from deploykit.fuse import kernels
from deploykit.fuse.kernels import ConvTerm

log = logging.getLogger(__name__)

_ADD_OPS = {operator.add, operator.iadd, torch.add}
_MUL_OPS = {operator.mul, operator.imul, torch.mul}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class FusedBlock:
    """One materialized conv: which graph node it replaces and what it absorbed."""

    node: str
    module: str
    sources: list[str]
    kind: str
    term: ConvTerm = field(repr=False)


@dataclass
class Unfused:
    node: str
    reason: str


@dataclass
class RewritePlan:
    blocks: list[FusedBlock]
    unfused: list[Unfused]


def _constant(gm: fx.GraphModule, node: object, channels: int) -> torch.Tensor | None:
    """A per-channel constant multiplier as a [channels] float64 tensor, or None."""
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return torch.full((channels,), float(node), dtype=torch.float64)
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        return None
    value = value.detach().double()
    if value.numel() == 1:
        return value.reshape(1).expand(channels).clone()
    if tuple(value.shape) in {(channels, 1, 1), (1, channels, 1, 1)}:
        # Broadcasts along the channel axis only.
        return value.reshape(channels).clone()
    return None


def _kind(sources: list[str]) -> str:
    """A readable label: "conv+bn", or the number of parallel branches merged."""
    convs = [s for s in sources if not s.startswith(("bn:", "scale:", "identity"))]
    bns = sum(s.startswith("bn:") for s in sources)
    extra = sum(s == "identity" for s in sources) + max(0, bns - len(convs))
    if len(convs) == 1 and not extra:
        return "conv+bn" if bns else "conv+scale"
    return f"{len(convs)} conv + {extra} identity/BN branches" if extra else f"{len(convs)} conv branches"


class _Planner:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.terms: dict[fx.Node, ConvTerm] = {}
        self.absorbed: set[fx.Node] = set()
        self.unfused: list[Unfused] = []

    def _sole_user(self, node: object, user: fx.Node) -> bool:
        return isinstance(node, fx.Node) and node in self.terms and set(node.users) == {user}

    def _absorb(self, node: fx.Node) -> ConvTerm:
        self.absorbed.add(node)
        return self.terms[node]

    def visit(self, node: fx.Node) -> ConvTerm | None:
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, nn.Conv2d) and not node.kwargs:
                return kernels.conv_term(node, module, node.target)
            if isinstance(module, nn.Linear) and not node.kwargs:
                return kernels.linear_term(node, module, node.target)
            if isinstance(module, _BN_TYPES) and module.track_running_stats and module.running_var is not None:
                scale, shift = kernels.bn_scale_shift(module)
                source = f"bn:{node.target}"
                (src,) = node.args
                if self._sole_user(src, node):
                    return kernels.scale_term(self._absorb(src), scale, shift, source)
                if isinstance(module, nn.BatchNorm2d):
                    return kernels.channelwise_term(src, scale, shift, source)
            return None
        if node.op != "call_function":
            return None
        if node.target in _MUL_OPS and len(node.args) == 2 and not node.kwargs:
            for this, other in (node.args, node.args[::-1]):
                if self._sole_user(this, node) and not (self.terms[this].linear and isinstance(other, fx.Node)):
                    constant = _constant(self.gm, other, self.terms[this].out_channels)
                    if constant is not None:
                        name = other.target if isinstance(other, fx.Node) else repr(other)
                        return kernels.scale_term(self._absorb(this), constant, None, f"scale:{name}")
            return None
        if node.target in _ADD_OPS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return None
            if not (a in self.terms or b in self.terms):
                return None
            # Decide before absorbing, so a failed merge leaves both operands intact.
            term_a = self.terms[a] if self._sole_user(a, node) else self._identity(a)
            term_b = self.terms[b] if self._sole_user(b, node) else self._identity(b)
            if term_a is None or term_b is None:
                return None
            reason = kernels.merge_reason(term_a, term_b)
            if reason is not None:
                self.unfused.append(Unfused(node.name, reason))
                return None
            for operand in (a, b):
                if self._sole_user(operand, node):
                    self.absorbed.add(operand)
            return kernels.merge_terms(term_a, term_b)
        return None

    def _identity(self, node: fx.Node) -> ConvTerm | None:
        meta = node.meta.get("tensor_meta")
        if meta is None or len(meta.shape) != 4:
            return None
        ones = torch.ones(int(meta.shape[1]), dtype=torch.float64)
        return kernels.channelwise_term(node, ones, torch.zeros_like(ones), "identity")

    def plan(self) -> list[fx.Node]:
        for node in self.gm.graph.nodes:
            term = self.visit(node)
            if term is not None:
                self.terms[node] = term
        # A term is materialized where its value leaves linear land and it absorbed something.
        return [n for n, t in self.terms.items() if n not in self.absorbed and len(t.sources) >= 2]


def _unique_name(gm: fx.GraphModule, sources: list[str]) -> str:
    modules = [s.split(":", 1)[-1] for s in sources if s != "identity"]
    parts = [m.split(".") for m in modules]
    prefix: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    if len(modules) == 1 or prefix == parts[0]:
        prefix = parts[0][:-1]
    base = ".".join(prefix + ["fused"]) if prefix else "fused"
    existing = dict(gm.named_modules())
    name, i = base, 1
    while name in existing:
        name, i = f"{base}{i}", i + 1
    return name


def rewrite(gm: fx.GraphModule) -> RewritePlan:
    """Re-parameterize ``gm`` in place (it must carry ShapeProp tensor metadata)."""
    planner = _Planner(gm)
    targets = planner.plan()
    dtype = next((p.dtype for p in gm.parameters()), torch.float32)
    blocks: list[FusedBlock] = []
    replaced: dict[fx.Node, fx.Node] = {}
    for node in targets:  # graph order, so a term's input is replaced before it is read
        term = planner.terms[node]
        name = _unique_name(gm, term.sources)
        gm.add_submodule(name, kernels.to_module(term, dtype))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (replaced.get(term.input, term.input),))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        replaced[node] = new
        blocks.append(FusedBlock(node.name, name, term.sources, _kind(term.sources), term))
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    for block in blocks:
        log.debug("fused %s <- %s", block.module, ", ".join(block.sources))
    return RewritePlan(blocks, planner.unfused)
