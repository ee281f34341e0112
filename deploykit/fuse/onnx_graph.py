"""Re-parameterization on an ONNX graph: the fold and merge of ``deploykit.fuse`` for users who
bring an ``.onnx`` file instead of the PyTorch model.

A user's own export of a RepVGG-style model as trained (``torch.onnx.export`` of the train form)
keeps every block's 3x3 conv + BN, 1x1 conv + BN and identity BN, summed: every target then runs
three branches where one convolution would do (1.1-2.8x slower on every CPU target, measured in
``reports/advise-onnx-vs-checkpoint.md``). ``fuse_onnx`` rewrites such a graph with the same
kernel algebra as the module-graph fuser (``deploykit.fuse.kernels``):

- a BatchNormalization (inference mode) whose input is a Conv used by nothing else folds into it;
- an Add of two affine branches of the same tensor (a Conv, a BatchNormalization of the tensor
  itself, the tensor itself, or an earlier such sum) becomes one Conv, kernels centre-padded to the
  largest, when the branches agree in stride, channels and alignment and one kernel costs no more
  than the branches (a depthwise 3x3 beside a dense 1x1 stays apart);
- a BatchNormalization after such a sum (QARepVGG's block) folds into the merged Conv.

Nothing else in the graph changes. ``fuse_onnx_file`` runs both graphs (on ONNX Runtime, in a build): on random inputs,
and again after giving every BatchNormalization random statistics (fused by the same code), since
the statistics of an untrained export are the identity and would hide a wrong fold.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import DeployError, FusionError

__all__ = ["OnnxFusion", "fuse_onnx", "fuse_onnx_file"]


@dataclass(eq=False)
class _Tensor:
    """One ONNX value as the input of kernel terms (terms merge only when their inputs are the same object)."""

    name: str


@dataclass
class _Rewrite:
    model: Any  # onnx.ModelProto
    convs_with_bn: int = 0  # BatchNormalization nodes folded into a Conv
    branch_sums: int = 0  # Add nodes of parallel branches replaced by one Conv
    kept_apart: list[str] = field(default_factory=list)  # Add nodes whose branches could merge but would cost more


@dataclass(frozen=True)
class OnnxFusion:
    """What ``fuse_onnx_file`` changed and how close the fused graph stays to the original."""

    convs_with_bn: int
    branch_sums: int
    nodes_before: int
    nodes_after: int
    random_inputs: Any  # ErrorFigures: the graphs as given, on random inputs
    random_bn: Any  # ErrorFigures: both with random BN statistics
    tolerance_rel: float
    kept_apart: list[str]

    @property
    def equivalent(self) -> bool:
        return max(self.random_inputs.max_rel_error, self.random_bn.max_rel_error) <= self.tolerance_rel

    def summary(self) -> str:
        return (f"ONNX graph re-parameterized: {self.branch_sums} sums of parallel branches and "
                f"{self.convs_with_bn} Conv+BatchNormalization pairs -> Conv ({self.nodes_before} -> "
                f"{self.nodes_after} nodes); max rel error {self.random_inputs.max_rel_error:.1e} on random "
                f"inputs, {self.random_bn.max_rel_error:.1e} with random BN statistics "
                f"(tolerance {self.tolerance_rel:.0e})")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"graph": "onnx", **asdict(self), "equivalent": self.equivalent}


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _consumers(graph: Any) -> dict[str, int]:
    """How many node inputs (subgraphs included) and graph outputs read each tensor."""
    counts: dict[str, int] = {}

    def visit(g: Any) -> None:
        for node in g.node:
            for name in node.input:
                counts[name] = counts.get(name, 0) + 1
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(sub)
        for out in g.output:
            counts[out.name] = counts.get(out.name, 0) + 1

    visit(graph)
    return counts


def _constants(graph: Any) -> dict[str, Any]:
    """Constant tensors by name: initializers, Constant nodes' values, and Identity nodes of either (the
    TorchScript exporter shares equal initializers, e.g. an untrained model's zero biases, through Identity)."""
    import onnx

    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
        elif node.op_type == "Identity" and node.input and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return {name: t for name, t in constants.items() if t.data_location != onnx.TensorProto.EXTERNAL or t.raw_data}


def fuse_onnx(model: Any) -> _Rewrite:
    """The re-parameterized copy of an ``onnx.ModelProto`` (unchecked: ``fuse_onnx_file`` certifies)."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from deploykit.fuse import kernels

    model = copy.deepcopy(model)
    graph = model.graph
    init = _constants(graph)
    consumers = _consumers(graph)
    tensors: dict[str, _Tensor] = {}
    terms: dict[str, kernels.ConvTerm] = {}  # tensor -> the affine map of one source tensor it is
    producer: dict[str, Any] = {}
    merged = 0
    kept_apart: list[str] = []

    def tensor(name: str) -> _Tensor:
        return tensors.setdefault(name, _Tensor(name))

    def float_init(name: str) -> torch.Tensor | None:
        if name not in init or init[name].data_type != onnx.TensorProto.FLOAT:
            return None
        return torch.from_numpy(np.array(numpy_helper.to_array(init[name]), dtype=np.float64))

    def sole(name: str) -> bool:
        return consumers.get(name, 0) == 1

    def conv(node: Any) -> kernels.ConvTerm | None:
        a = _attrs(node)
        weight = float_init(node.input[1]) if len(node.input) > 1 else None
        if weight is None or weight.dim() != 4 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            return None
        bias = float_init(node.input[2]) if len(node.input) > 2 and node.input[2] else torch.zeros(weight.shape[0],
                                                                                                   dtype=torch.float64)
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if bias is None or pads[:2] != pads[2:] or list(a.get("kernel_shape", weight.shape[2:])) != list(weight.shape[2:]):
            return None
        return kernels.ConvTerm(input=tensor(node.input[0]), weight=weight, bias=bias,
                                stride=tuple(a.get("strides", [1, 1])), padding=tuple(pads[:2]),
                                dilation=tuple(a.get("dilations", [1, 1])), groups=int(a.get("group", 1)),
                                sources=[node.name or node.output[0]])

    def batchnorm(node: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        a = _attrs(node)
        stats = [float_init(n) for n in node.input[1:5]]
        if any(s is None for s in stats) or a.get("training_mode", 0) or a.get("spatial", 1) != 1:
            return None
        if any(out for out in node.output[1:]):
            return None
        scale, bias, mean, var = stats
        return kernels.affine_scale_shift(mean, var, scale, bias, float(a.get("epsilon", 1e-5)))

    def branch(name: str) -> kernels.ConvTerm | None:
        """The term an Add operand contributes: its own term when the Add is its only reader, else the tensor itself."""
        if name in terms and sole(name):
            return terms[name]
        if name in init:
            return None
        ones = torch.ones(1, dtype=torch.float64)  # channel count unknown here: fixed against the other branch
        return kernels.channelwise_term(tensor(name), ones, torch.zeros_like(ones), "identity")

    for node in graph.node:
        out = node.output[0] if node.output else ""
        producer[out] = node
        if node.op_type == "Conv" and node.domain in ("", "ai.onnx"):
            term = conv(node)
            if term is not None:
                terms[out] = term
        elif node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
            affine = batchnorm(node)
            if affine is None:
                continue
            scale, shift = affine
            source = node.input[0]
            if source in terms and sole(source):
                terms[out] = kernels.scale_term(terms[source], scale, shift, node.name or out)
            else:  # a BN of the tensor itself: a depthwise 1x1 term, kept as it is unless it merges into a sum
                terms[out] = kernels.channelwise_term(tensor(source), scale, shift, node.name or out)
        elif node.op_type == "Add" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            a, b = branch(node.input[0]), branch(node.input[1])
            if a is None or b is None or a.input is not b.input or "identity" in a.sources and "identity" in b.sources:
                continue
            a, b = (_sized_identity(t, other) for t, other in ((a, b), (b, a)))
            if a is None or b is None or kernels.merge_reason(a, b) is not None:
                continue
            if kernels.merged_cost(a, b) > kernels.cost(a) + kernels.cost(b):
                kept_apart.append(node.name or out)
                continue
            terms[out] = kernels.merge_terms(a, b)
            merged += 1

    # Which terms become nodes: those read by a node outside the rewritten chains, or by the graph.
    rewritten = {name for name, t in terms.items() if len(t.sources) > 1}
    folded_bn = sum(1 for name in rewritten if producer[name].op_type == "BatchNormalization")
    new_nodes, extra_init = [], []
    for node in graph.node:
        out = node.output[0] if node.output else ""
        if out in rewritten:
            term = terms[out]
            weight_name, bias_name = f"{out}.fused_weight", f"{out}.fused_bias"
            extra_init += [numpy_helper.from_array(term.weight.float().numpy(), weight_name),
                           numpy_helper.from_array(term.bias.float().numpy(), bias_name)]
            kh, kw = term.weight.shape[2:]
            new_nodes.append(onnx.helper.make_node(
                "Conv", [term.input.name, weight_name, bias_name], [out], name=f"{node.name or out}.fused",
                kernel_shape=[kh, kw], pads=[*term.padding, *term.padding], strides=list(term.stride),
                dilations=list(term.dilation), group=term.groups))
        else:
            new_nodes.append(node)
    # Drop what only the rewritten nodes read: walk back from the graph's outputs.
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(new_nodes):
        touched = node.output and (node.output[0] in terms or node.output[0] in init)  # init: Identity/Constant
        reads_sub = any(attr.HasField("g") or len(attr.graphs) for attr in node.attribute)
        if touched and not reads_sub and not any(o in live for o in node.output):
            continue
        kept.append(node)
        live.update(node.input)
        if reads_sub:
            live.update(_consumers(onnx.helper.make_graph([node], "sub", [], [])).keys())
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(extra_init)
    unused = [t for t in graph.initializer if t.name not in live]
    for t in unused:
        graph.initializer.remove(t)
    unused_names = {t.name for t in unused}
    for value in [v for v in graph.input if v.name in unused_names]:
        graph.input.remove(value)
    produced = {o for n in graph.node for o in n.output}
    for value in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(value)
    return _Rewrite(model, folded_bn, merged, kept_apart)


def _sized_identity(term: Any, other: Any) -> Any:
    """An identity / channelwise term with the channel count of the branch it is summed with."""
    from deploykit.fuse import kernels

    if term.sources != ["identity"]:
        return term
    channels = other.out_channels
    if other.in_channels != channels:
        return None
    ones = term.weight.new_ones(channels)
    return kernels.channelwise_term(term.input, ones, term.bias.new_zeros(channels), "identity")


def _randomize_bn(model: Any, seed: int) -> Any:
    """A copy with random BN scales, shifts, means and (positive) variances: the statistics of a real model."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    init = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for i, name in enumerate(node.input[1:5]):
            t = init.get(name)
            if t is None or t.data_type != onnx.TensorProto.FLOAT:
                continue
            shape = numpy_helper.to_array(t).shape
            value = (rng.uniform(0.5, 2.0, shape) if i in (0, 3) else rng.normal(0.0, 0.5, shape)).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(value, name))
    return model


def fuse_onnx_file(path: Path, out: Path, *, input_size: int, runner: Callable[[Path], Callable[[Any], Any]],
                   tolerance_rel: float | None = None, seed: int = 0) -> OnnxFusion | None:
    """Write the re-parameterized ``path`` to ``out`` and certify it; None (nothing written) when nothing fuses.

    ``runner(file)`` returns a function from an NCHW float32 batch to the model's first output (the build
    passes ONNX Runtime). Raises FusionError when the fused graph's outputs differ from the original's
    beyond ``tolerance_rel``.
    """
    import numpy as np
    import onnx
    import torch

    from deploykit.files import temp_dir
    from deploykit.fuse import DEFAULT_TOLERANCE_REL
    from deploykit.fuse.certificate import ErrorFigures

    tolerance_rel = DEFAULT_TOLERANCE_REL if tolerance_rel is None else tolerance_rel
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf raises its own types
        raise DeployError(f"{path}: cannot read the ONNX model ({err})") from err
    fused = fuse_onnx(model)
    if not fused.branch_sums and not fused.convs_with_bn:
        return None
    x = np.random.default_rng(seed).standard_normal((2, 3, input_size, input_size)).astype(np.float32)
    onnx.save(fused.model, str(out))
    errors = {}
    with temp_dir("fuse") as scratch:  # the random-BN pair: same structure, statistics of a trained model
        randomized = _randomize_bn(model, seed)
        pairs = {"given": (path, out),
                 "random_bn": (Path(scratch) / "original.onnx", Path(scratch) / "fused.onnx")}
        onnx.save(randomized, str(pairs["random_bn"][0]))
        onnx.save(fuse_onnx(randomized).model, str(pairs["random_bn"][1]))
        for label, (original, candidate) in pairs.items():
            reference, result = runner(original)(x), runner(candidate)(x)
            errors[label] = ErrorFigures.between(torch.from_numpy(np.asarray(reference)),
                                                 torch.from_numpy(np.asarray(result)))
    report = OnnxFusion(
        convs_with_bn=fused.convs_with_bn, branch_sums=fused.branch_sums, nodes_before=len(model.graph.node),
        nodes_after=len(fused.model.graph.node), random_inputs=errors["given"], random_bn=errors["random_bn"],
        tolerance_rel=tolerance_rel, kept_apart=fused.kept_apart,
    )
    if not report.equivalent:
        out.unlink(missing_ok=True)
        raise FusionError(f"{path.name}: re-parameterizing the ONNX graph changed its outputs ({report.summary()}); "
                          "`deploykit build --no-fuse` builds the file as given")
    return report
