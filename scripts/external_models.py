"""Measure deploykit's fuser on timm models and write reports/external-models.md.

Per model (pretrained=False, BatchNorm statistics randomized so that folds are visible):
BatchNorm left and convs after deploykit vs timm's own ``reparameterize_model``, max relative
error of the fused model against the original and against timm's reparameterization, eager
PyTorch latency of the fused and timm-reparameterized models relative to the unfused one
(interleaved rounds: each round times every form in turn; median of rounds and the range),
and the ONNX export + INT8 build on ONNX Runtime from the fused ONNX.

    python scripts/external_models.py --out reports/external-models.md
    python scripts/external_models.py --models repvgg_a0 --size 64 --rounds 1 --iters 1 --out /tmp/x.md  # smoke run
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

DEFAULT_MODELS = ("repvgg_a0", "repvgg_b1g4", "mobileone_s0", "mobileone_s1", "mobileone_s4", "resnet18",
                  "ghostnet_100", "repghostnet_050", "repghostnet_100", "convnext_atto", "fastvit_t8")
DEFAULT_CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def _convs(model) -> int:
    from torch import nn

    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _rel(reference, candidate) -> float:
    return ((reference - candidate).abs().max() / reference.abs().max()).item()


def _time_ms(model, x, iters: int) -> float:
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
    return (time.perf_counter() - start) * 1e3 / iters


def _latency(forms: dict, x, rounds: int, iters: int, warmup: int) -> dict[str, list[float]]:
    import torch

    with torch.no_grad():
        for model in forms.values():
            for _ in range(warmup):
                model(x)
    times: dict[str, list[float]] = {name: [] for name in forms}
    names = list(forms)
    for r in range(rounds):  # interleaved, order rotated per round so no form always runs first
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_time_ms(forms[name], x, iters))
    return times


def _ratio(times: dict[str, list[float]], name: str) -> str:
    ratios = [t / u for t, u in zip(times[name], times["unfused"])]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f})"


def measure(name: str, args: argparse.Namespace) -> dict:
    import timm
    import torch
    from timm.utils.model import reparameterize_model

    from deploykit.build import BuildRequest, build
    from deploykit.export import export_onnx
    from deploykit.fuse import _randomize_bn, reparameterize
    from deploykit.fuse.normalize import bn_like_modules

    model = timm.create_model(name, pretrained=False).eval()
    _randomize_bn(model, args.seed)
    timm_fused = reparameterize_model(copy.deepcopy(model)).eval()
    row = {"model": name, "bn_before": len(bn_like_modules(model)), "convs_before": _convs(model),
           "timm_bn": len(bn_like_modules(timm_fused)), "timm_convs": _convs(timm_fused)}
    shape = (1, 3, args.size, args.size)
    result = reparameterize(model, input_shape=(2, 3, args.size, args.size), accept_partial=True)
    cert, fused = result.certificate, result.model
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        ref, out, timm_out = model(x), fused(x), timm_fused(x)
    row.update(bn_left=cert.batchnorm_left, convs_after=cert.convs_after, blocks=len(cert.blocks),
               verdict=cert.verdict, left=[f"{x.name}: {x.reason}" for x in cert.left],
               err_original=_rel(ref, out), err_timm=_rel(timm_out, out), timm_err_original=_rel(ref, timm_out))
    if not args.skip_timing:
        times = _latency({"unfused": model, "deploykit": fused, "timm": timm_fused}, x, args.rounds, args.iters, args.warmup)
        row.update(unfused_ms=statistics.median(times["unfused"]), ratio=_ratio(times, "deploykit"),
                   timm_ratio=_ratio(times, "timm"))
    with tempfile.TemporaryDirectory(prefix="deploykit-ext-") as tmp:
        try:
            onnx_path = export_onnx(fused, Path(tmp) / "fused.onnx", input_size=args.size).path
            row["onnx"] = "ok"
        except Exception as err:
            row["onnx"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            return row
        try:
            built = build(BuildRequest(model=str(onnx_path), target="onnxruntime", precision="int8",
                                       calib=str(args.calib) if args.calib.is_file() else None,
                                       calib_samples=args.calib_samples, verify_samples=args.verify_samples,
                                       out=Path(tmp) / "int8"))
            verification = built.meta.get("verification", {})
            row["int8"] = f"ok, cosine min {verification.get('cosine_min', float('nan')):.4f}"
        except Exception as err:
            row["int8"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return row


def render(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    import onnxruntime
    import timm
    import torch

    from deploykit.device import device_fingerprint

    device = device_fingerprint()
    lines = [
        "# External models through deploykit's fuser",
        "",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} on {device.get('cpu')} (ISA: {', '.join(device.get('isa', []))})"
        f" ({platform.platform()}); torch {torch.__version__}, timm {timm.__version__}, onnxruntime {onnxruntime.__version__},"
        f" {torch.get_num_threads()} threads.",
        "",
        f"Command: `{command}`",
        "",
        f"timm models with pretrained=False and randomized BatchNorm statistics, input 1x3x{args.size}x{args.size}. "
        "Latency: eager PyTorch, no_grad, ratio to the unfused model, median of "
        f"{args.rounds} interleaved rounds of {args.iters} iterations (range in brackets). "
        f"INT8: ONNX Runtime QDQ from the fused ONNX, calibrated on {args.calib_samples} CIFAR-10 images (upscaled).",
        "",
        "| model | BN before → left (timm) | convs before → after (timm) | fused blocks | rel err vs original | vs timm's reparam "
        "| fused/unfused | timm/unfused | unfused ms | certificate | ONNX | INT8 ORT |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['error']} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['model']} | {r['bn_before']} → {r['bn_left']} ({r['timm_bn']}) | {r['convs_before']} → {r['convs_after']} "
            f"({r['timm_convs']}) | {r['blocks']} | {r['err_original']:.1e} | {r['err_timm']:.1e} | {r.get('ratio', 'not timed')} "
            f"| {r.get('timm_ratio', 'not timed')} | {format(r['unfused_ms'], '.2f') if 'unfused_ms' in r else ''} | {r['verdict']} | {r['onnx']} "
            f"| {r.get('int8', '')} |"
        )
    left = [(r["model"], item) for r in rows for item in r.get("left", [])]
    lines += ["", "## What deploykit leaves unfused", ""]
    lines += [f"- {model}: {item}" for model, item in left] or ["- nothing: every BatchNorm folded in every model above."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--verify-samples", type=int, default=16)
    parser.add_argument("--skip-timing", action="store_true", help="Smoke test: no latency columns.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(measure(name, args))
        except Exception as err:  # one broken model must not lose the others' rows
            traceback.print_exc()
            rows.append({"model": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"})
    command = "python " + " ".join(sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(render(rows, args, command))
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
