"""Subprocess entry for MNN's converter and quantizer (``python -m deploykit.backends._mnn_worker``).

They live in the ``_tools`` C extension of the MNN wheel and can crash the process (abort,
segfault); running them here lets the parent turn a crash into one clean error. ``MNN.tools``
is never imported: its wrappers install and call a logging SDK that uploads usage data.

    convert ARG...            _tools.mnnconvert(["mnnconvert", ARG...])
    quant SRC DST CONFIG      _tools.mnnquant(["mnnquant", SRC, DST, CONFIG])
"""
from __future__ import annotations

import sys

from deploykit.procs import die_with_parent  # importing deploykit also turns runtime telemetry off


def main(argv: list[str]) -> int:
    die_with_parent()
    if not argv or argv[0] not in ("convert", "quant") or (argv[0] == "quant" and len(argv) != 4):
        print(__doc__, file=sys.stderr)
        return 2
    import _tools  # the MNN wheel's C extension; prints a CPU-feature line on import

    if argv[0] == "convert":
        ok = _tools.mnnconvert(["mnnconvert", *argv[1:]])
    else:
        # MNN >= 3.x takes an argv list here (three plain strings abort with std::length_error).
        ok = _tools.mnnquant(["mnnquant", *argv[1:]])
    sys.stdout.flush()
    return 0 if ok in (True, None, 0) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
