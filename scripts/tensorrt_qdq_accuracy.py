"""Measure TensorRT Q/DQ (explicit INT8) models on CIFAR-10 with ONNX Runtime (no GPU needed).

    python scripts/tensorrt_qdq_accuracy.py ../shared/data/cifar10-jpeg.tar.gz OUT_DIR

The project has no trained CIFAR checkpoint, so two networks are measured (one thread,
fixed seeds; about 10 minutes on a shared 2-core machine):

- ``small_cnn``: five Conv-BN-ReLU blocks and a linear classifier, *trained* here for 312
  SGD steps (batch 128, 20,000 training images); fused by deploykit.fuse. What INT8 does to a
  trained network.
- ``repvgg_a0``: the zoo model (CIFAR form) with random convolution weights and a linear
  probe (softmax regression on its pooled features of 5,000 training images), so that top-1
  is above chance. Plus a diagnostic quantizing only the first k weighted layers.

For each: the --emit-only bundle (calibration: 512 training images), and ONNX Runtime figures
of the Q/DQ model against the FP32 model on 2,000 test images. Prints JSON.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

TEST_IMAGES = 2000


def small_cnn(train_x: np.ndarray, train_y: np.ndarray) -> torch.nn.Module:
    nn = torch.nn

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    torch.manual_seed(0)
    net = nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2),
                        *block(128, 128, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    steps = 2 * len(x) // 128
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,))
        batch = x[idx]
        flip = torch.rand(128) < 0.5
        batch[flip] = batch[flip].flip(3)
        loss = nn.functional.cross_entropy(net(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return net.eval()


def probed_repvgg(train_x: np.ndarray, train_y: np.ndarray) -> torch.nn.Module:
    """Fused RepVGG-A0, random conv weights, classifier fitted on its pooled features."""
    from deploykit.fuse import reparameterize
    from deploykit.models import create_model
    from deploykit.quant.fakequant import observe_inputs

    torch.manual_seed(0)
    model = reparameterize(create_model("repvgg_a0", num_classes=10, cifar=True).eval(),
                           input_shape=(1, 3, 32, 32), check=False).model
    captured = []
    observe_inputs(model, {"linear": model.linear}, lambda name: lambda m, args: captured.append(args[0]),
                   train_x, 250)
    feats = torch.cat(captured).double()
    # One scale for all features, not one per feature: per-feature standardization multiplies
    # near-dead channels by ~1e4 and makes the classifier hinge on values no 8-bit keeps.
    scale = feats.std()
    w = torch.zeros(feats.shape[1], 10, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")
    labels = torch.from_numpy(train_y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(feats / scale @ w + b, labels) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        model.linear.weight.copy_((w / scale).T.float())
        model.linear.bias.copy_(b.float())
    return model


def first_layers(onnx_path: Path, calib: np.ndarray, x: np.ndarray, counts: tuple[int, ...]) -> dict[str, float]:
    """Mean cosine vs FP32 when only the first k weighted ops get Q/DQ (how error compounds)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from deploykit.backends.qdq import TRT_EXTRA_OPTIONS, WEIGHTED_OPS, CalibrationReader, run_onnxruntime
    from deploykit.verify import compare

    prepared, out = onnx_path.with_suffix(".pre.onnx"), onnx_path.with_suffix(".partial.onnx")
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    names = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in WEIGHTED_OPS]
    reference = run_onnxruntime(onnx_path, x)
    figures = {}
    for k in counts:
        quantize_static(str(prepared), str(out), CalibrationReader("input", calib, 32), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(WEIGHTED_OPS), per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_quantize=names[:k], extra_options=dict(TRT_EXTRA_OPTIONS))
        figures[f"first {k} of {len(names)}"] = round(compare(reference, run_onnxruntime(out, x)).cosine_mean, 4)
    return figures


def main(data: str, out: Path) -> None:
    from deploykit.backends.tensorrt import emit_tensorrt_bundle
    from deploykit.calib import load_calibration, open_source
    from deploykit.calib.recipes import default_recipe
    from deploykit.export import export_onnx
    from deploykit.fuse import reparameterize

    torch.set_num_threads(1)
    started = time.perf_counter()
    train = load_calibration(data, input_size=32, num_samples=20000, num_verify=0, seed=1)
    calib = load_calibration(data, input_size=32, num_samples=512, num_verify=0, seed=0)
    test = open_source(data, "test")
    order = np.random.default_rng(0).permutation(len(test))[:TEST_IMAGES]
    calib = type(calib)(**{**calib.__dict__, "held_out": test.load(order, default_recipe(32).preprocessing),
                           "held_out_labels": test.labels()[order]})
    nets = {
        "small_cnn": reparameterize(small_cnn(train.inputs, train.labels), input_shape=(1, 3, 32, 32),
                                    check=False).model,
        "repvgg_a0": probed_repvgg(train.inputs[:5000], train.labels[:5000]),
    }
    results: dict = {"calibration": calib.summary(), "held_out": f"{TEST_IMAGES} CIFAR-10 test images (seed 0)"}
    for name, net in nets.items():
        (out / name / "bundle").mkdir(parents=True, exist_ok=True)
        export_onnx(net, out / name / "model.onnx", input_size=32, batch="dynamic", force=True)
        facts = emit_tensorrt_bundle(out / name / "model.onnx", out / name / "bundle", "int8", calib, threads=2)
        results[name] = {"qdq": {k: facts["qdq"][k] for k in ("weighted_nodes", "quantized_nodes", "ok")},
                         "onnxruntime_check": facts["onnxruntime_check"], "trtexec": facts["trtexec"]}
    results["repvgg_a0"]["first_layers_cosine"] = first_layers(
        out / "repvgg_a0" / "model.onnx", calib.inputs[:128], calib.held_out[:200], (1, 2, 5, 10, 23))
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
