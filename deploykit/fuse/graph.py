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
from torch.nn import functional as F

from deploykit.fuse import kernels
from deploykit.fuse.kernels import ConvTerm

log = logging.getLogger(__name__)

_ADD_OPS = {operator.add, operator.iadd, torch.add}
_SUB_OPS = {operator.sub, operator.isub, torch.sub}
_MUL_OPS = {operator.mul, operator.imul, torch.mul}
_IN_PLACE_OPS = {operator.iadd, operator.isub, operator.imul}
_BN_FUNCTION_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


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
    """A structure left as it was. ``kind``: "batchnorm" and "branches" are fusible structure the
    engine could not fold (they fail the certificate's gate); "residual" is a sum around a
    non-linear op, which no re-parameterization removes; "kept": branches that would merge into a
    kernel costlier than the branches together (a fused model must not be slower)."""

    node: str
    reason: str
    kind: str = "residual"


@dataclass
class RewritePlan:
    blocks: list[FusedBlock]
    unfused: list[Unfused]

    @property
    def left(self) -> list[Unfused]:
        """Fusible structure still in the graph: BatchNorm not folded, parallel branches not merged."""
        return [u for u in self.unfused if u.kind not in ("residual", "kept")]


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


def _describe(node: object, modules: dict[str, nn.Module]) -> str:
    """What produced ``node``, for a reason a user reads."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{node.name} (module {node.target}: {type(modules[node.target]).__name__})"
    if node.op == "placeholder":
        return f"{node.name} (the model input)"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


def _kind(sources: list[str]) -> str:
    """A readable label: "conv+bn", or the number of parallel branches merged."""
    convs = [s for s in sources if not s.startswith(("bn:", "scale:", "shift:", "identity"))]
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
        self.bn_reasons: dict[str, str] = {}  # BN module name -> why it was not folded

    def _sole_user(self, node: object, user: fx.Node) -> bool:
        return isinstance(node, fx.Node) and node in self.terms and set(node.users) == {user}

    def _value(self, node: object) -> torch.Tensor | None:
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            return None
        value = self.gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None

    def _batch_norm(self, node: fx.Node) -> tuple[object, torch.Tensor, torch.Tensor, str, int] | None:
        """(input, scale, shift, BN name, rank) for a BatchNorm module call or ``F.batch_norm`` in eval."""
        if node.op == "call_module":
            module = self.modules[node.target]
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or node.kwargs or len(node.args) != 1:
                return None
            if module.training or not module.track_running_stats or module.running_var is None:
                self.bn_reasons[node.target] = "BatchNorm in training mode or without running statistics"
                return None
            rank = 4 if isinstance(module, nn.BatchNorm2d) else 0
            return (node.args[0], *kernels.bn_scale_shift(module), node.target, rank)
        if node.op != "call_function" or node.target is not F.batch_norm:
            return None
        args = dict(zip(_BN_FUNCTION_ARGS, node.args)) | dict(node.kwargs)
        mean, var = self._value(args.get("running_mean")), self._value(args.get("running_var"))
        name = args["running_var"].target.rsplit(".", 1)[0] if isinstance(args.get("running_var"), fx.Node) else node.name
        if mean is None or var is None or args.get("training", False) is not False:
            self.bn_reasons[name] = "functional batch_norm without constant running statistics (training mode)"
            return None
        weight, bias = self._value(args.get("weight")), self._value(args.get("bias"))
        if (args.get("weight") is not None and weight is None) or (args.get("bias") is not None and bias is None):
            self.bn_reasons[name] = "functional batch_norm whose weight or bias is computed at run time"
            return None
        scale, shift = kernels.affine_scale_shift(mean, var, weight, bias, float(args.get("eps", 1e-5)))
        meta = node.meta.get("tensor_meta")
        return args["input"], scale, shift, name, len(meta.shape) if meta is not None else 0

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
        bn = self._batch_norm(node)
        if bn is not None:
            return self._fold_batch_norm(node, *bn)
        if node.op != "call_function":
            return None
        if node.target in _IN_PLACE_OPS and isinstance(node.args[0], fx.Node) and set(node.args[0].users) != {node}:
            return None  # the in-place op also changes what the other users of its operand read
        if node.target in _MUL_OPS and len(node.args) == 2 and not node.kwargs:
            for this, other in (node.args, node.args[::-1]):
                if self._sole_user(this, node) and not (self.terms[this].linear and isinstance(other, fx.Node)):
                    constant = _constant(self.gm, other, self.terms[this].out_channels)
                    if constant is not None:
                        name = other.target if isinstance(other, fx.Node) else repr(other)
                        return kernels.scale_term(self._absorb(this), constant, None, f"scale:{name}")
            for this, other in (node.args, node.args[::-1]):  # a scaled identity branch: g * x
                meta = this.meta.get("tensor_meta") if isinstance(this, fx.Node) and this.op != "get_attr" else None
                if meta is not None and len(meta.shape) == 4 and isinstance(other, fx.Node):
                    constant = _constant(self.gm, other, int(meta.shape[1]))
                    if constant is not None:
                        return kernels.channelwise_term(this, constant, torch.zeros_like(constant), f"scale:{other.target}")
            return None
        if (node.target in _ADD_OPS or node.target in _SUB_OPS) and len(node.args) == 2 and not node.kwargs:
            return self._sum(node, *node.args, negate=node.target in _SUB_OPS)
        return None

    def _fold_batch_norm(self, node: fx.Node, src: object, scale: torch.Tensor, shift: torch.Tensor, name: str,
                         rank: int) -> ConvTerm | None:
        source = f"bn:{name}"
        if self._sole_user(src, node):
            return kernels.scale_term(self._absorb(src), scale, shift, source)
        if isinstance(src, fx.Node) and src in self.terms:
            others = ", ".join(sorted(u.name for u in src.users if u is not node))
            self.bn_reasons[name] = (
                f"its input {_describe(src, self.modules)} is also read by {others}: folding would compute the conv twice"
            )
        else:
            self.bn_reasons[name] = f"it reads {_describe(src, self.modules)}, not a conv or linear output: nothing to fold it into"
        if rank == 4 and isinstance(src, fx.Node):
            return kernels.channelwise_term(src, scale, shift, source)  # may still merge as a branch (RepVGG identity)
        return None

    def _sum(self, node: fx.Node, a: object, b: object, *, negate: bool) -> ConvTerm | None:
        # term ± per-channel constant (a frozen BN's shift, a bias added by hand)
        for this, other, this_sign, other_sign in ((a, b, 1.0, -1.0 if negate else 1.0), (b, a, -1.0 if negate else 1.0, 1.0)):
            if self._sole_user(this, node) and not self.terms[this].linear:
                constant = _constant(self.gm, other, self.terms[this].out_channels)
                if constant is not None:
                    name = other.target if isinstance(other, fx.Node) else repr(other)
                    scale = torch.full_like(constant, this_sign)
                    return kernels.scale_term(self._absorb(this), scale, constant * other_sign, f"shift:{name}")
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or not (a in self.terms or b in self.terms):
            return None
        # Decide before absorbing, so a failed merge leaves both operands intact.
        term_a = self.terms[a] if self._sole_user(a, node) else self._identity(a)
        term_b = self.terms[b] if self._sole_user(b, node) else self._identity(b)
        if term_a is None or term_b is None:
            return None
        if term_a.input is not term_b.input:
            self.unfused.append(Unfused(node.name, (
                f"residual sum of {_describe(term_a.input, self.modules)} and {_describe(term_b.input, self.modules)}: "
                "the branches start from different tensors (a non-linear op between them), so they cannot be one conv"
            )))
            return None
        if negate:
            term_b = kernels.negated(term_b)
        reason = kernels.merge_reason(term_a, term_b)
        if reason is not None:
            self.unfused.append(Unfused(node.name, f"parallel branches of {term_a.input.name} not merged: {reason}", "branches"))
            return None
        if kernels.merged_cost(term_a, term_b) > kernels.cost(term_a) + kernels.cost(term_b):
            # e.g. depthwise 3x3 + dense 1x1 would become a dense 3x3: exact, but slower than both branches
            self.unfused.append(Unfused(node.name, (
                f"parallel branches of {term_a.input.name} kept apart on purpose: one kernel would cost "
                f"{kernels.merged_cost(term_a, term_b)} multiply-adds per pixel, the branches {kernels.cost(term_a) + kernels.cost(term_b)}"
            ), "kept"))
            return None
        for operand in (a, b):
            if self._sole_user(operand, node):
                self.absorbed.add(operand)
        return kernels.merge_terms(term_a, term_b)

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


def _batchnorms_read(gm: fx.GraphModule, batchnorms: set[str], provenance: dict[str, set[str]]) -> dict[str, str]:
    """BatchNorm module name -> a node of ``gm`` that still calls it or reads its tensors."""
    read: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in batchnorms:
            read.setdefault(node.target, node.name)
        elif node.op == "get_attr":
            for origin in provenance.get(node.target, {node.target}):
                module = origin.rsplit(".", 1)[0]
                if module in batchnorms:
                    read.setdefault(module, node.name)
    return read


def _batchnorm_left(gm: fx.GraphModule, planner: _Planner, batchnorms: set[str], provenance: dict[str, set[str]],
                    read_before: dict[str, str]) -> list[Unfused]:
    """The BatchNorms the rewritten graph still holds (or that the tracer never opened), with the reason."""
    left = [
        Unfused(name, f"BatchNorm {name} not folded: " + planner.bn_reasons.get(
            name, "its per-channel map is applied to a tensor that is not a conv or linear output"), "batchnorm")
        for name in _batchnorms_read(gm, batchnorms, provenance)
    ]
    leaves = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for name in sorted(batchnorms - set(read_before)):
        holder = next((t for t in leaves if name.startswith(f"{t}.")), None)
        if holder is not None:
            kind = type(planner.modules[holder]).__name__
            left.append(Unfused(name, f"BatchNorm {name} not folded: it is inside {holder} ({kind}), "
                                      "a module torch.fx keeps whole (a leaf), so its graph is not visible", "batchnorm"))
    return left


def rewrite(gm: fx.GraphModule, batchnorms: set[str] | None = None,
            provenance: dict[str, set[str]] | None = None) -> RewritePlan:
    """Re-parameterize ``gm`` in place (it must carry ShapeProp tensor metadata).

    ``batchnorms`` names the BatchNorm modules of the model before tracing (and ``provenance``
    which of them the normalized graph's constants came from), so that what is left is reported.
    """
    batchnorms, provenance = batchnorms or set(), provenance or {}
    read_before = _batchnorms_read(gm, batchnorms, provenance)
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
    bn_left = _batchnorm_left(gm, planner, batchnorms, provenance, read_before)
    return RewritePlan(blocks, planner.unfused + bn_left)
