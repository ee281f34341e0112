"""Training-step timings behind the Zen 5 paragraph of reports/quantization-repvgg-vs-repopt.md (ad hoc, eager).

    python scripts/train_step_timing.py layout     channels_last vs NCHW, RepVGG-A0 w0.5, bf16, interleaved
    python scripts/train_step_timing.py width      widths 0.5 / 0.625 / 0.75, channels_last, bf16, interleaved
    python scripts/train_step_timing.py profile    torch.profiler table of 5 steps (w0.5, channels_last, bf16)

Batch 256 of random CIFAR-sized images, SGD Nesterov, label smoothing 0.1, 2 threads; 3 warm-up steps,
then 5 rounds of 5 steps per configuration; median of the rounds in ms per step.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

from deploykit.models.registry import create_model


def make(channels_last: bool, width: float = 0.5):
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width=width).train()
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def main(what: str) -> None:
    torch.set_num_threads(2)
    if what == "profile":
        from torch.profiler import ProfilerActivity, profile

        step = make(True)
        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
        return
    steps = ({"channels_last": make(True), "nchw": make(False)} if what == "layout"
             else {f"w{w}": make(True, w) for w in (0.5, 0.625, 0.75)})
    for step in steps.values():
        for _ in range(3):
            step()
    rounds: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(5):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(5):
                step()
            rounds[name].append((time.perf_counter() - started) / 5 * 1e3)
    for name, values in rounds.items():
        print(name, f"median {statistics.median(values):.0f} ms/step", [round(v) for v in values])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "layout")
