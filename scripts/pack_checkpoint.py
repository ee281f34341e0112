"""Shrink a deploykit safetensors checkpoint for the repository: conv/linear weights in fp16.

    python scripts/pack_checkpoint.py runs/train-three/train/repvgg/model.safetensors \
        checkpoints/repvgg_a0-cifar10-w0.5.safetensors

Tensors of two or more dimensions (conv and linear weights) are stored as fp16; every vector (BN
scale, shift, running mean and variance, biases) stays fp32, so a BN variance near zero (the
dead channels issue 13 is about) keeps its value. Loading casts back to fp32 (load_state_dict
copies into the model's fp32 parameters). The metadata is kept; the script prints the largest
absolute change it made, and the FP32 accuracy must be re-checked with `deploykit eval`.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()

    import json

    import torch
    from safetensors.torch import save_file

    from deploykit.checkpoint import META_KEY, read_checkpoint
    from deploykit.files import atomic_file

    tensors, meta = read_checkpoint(args.source)
    packed, worst = {}, 0.0
    for name, t in tensors.items():
        if t.is_floating_point() and t.ndim >= 2:
            half = t.to(torch.float16)
            worst = max(worst, float((half.float() - t.float()).abs().max()))
            packed[name] = half.contiguous()
        else:
            packed[name] = t.contiguous()
    with atomic_file(args.out, force=True) as tmp:
        save_file(packed, str(tmp), metadata={META_KEY: json.dumps(meta)} if meta else None)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.2f} MB (from {args.source.stat().st_size / 1e6:.2f} MB), "
          f"largest weight change {worst:.2e}")


if __name__ == "__main__":
    main()
