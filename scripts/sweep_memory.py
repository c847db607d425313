#!/usr/bin/env python
"""Peak resident memory of a real EfficientNet-Lite sweep, per variant, in a child process.

    python scripts/sweep_memory.py                      # 260x260 Lite, 12 variants (the issue's sweep)
    python scripts/sweep_memory.py --variants 3         # the same with fewer variants: same peak?
    python scripts/sweep_memory.py --size 224 --fidelity-crops 48 --json mem.json --keep

The sweep is ``configs/efficientnet-lite0.yaml`` run by ``qcal.drivers.sweep.run_sweep`` (what
``qcal sweep`` calls), with its first ``--variants`` int8 variants after float32, on the shipped
EfficientNet-Lite0 ONNX file; ``--size`` other than 224 runs a copy of that file whose input is
declared SIZE x SIZE (the network is convolutional up to a global average pool, so the same
weights take any size; its ``qcal.input_size`` metadata is set to SIZE, so images are
preprocessed at that size). ``--images``, ``--fidelity-crops`` and ``--calib-crops`` replace the
config's data (20 labelled images, 240 label-free crops, 256 calibration crops): a peak that
grows with any of them is a leak of per-image data.

The child reads the kernel's peak-RSS mark (``VmHWM`` in ``/proc/self/status``) when a variant is
finished and resets it (``/proc/self/clear_refs``), so each variant's
figure is the peak while that variant ran; the first int8 variant also pays for the statistics
pass. Resetting the mark resets ``ru_maxrss`` too, so the sweep's peak is the largest of the
windows (which cover the child's whole life).
The output folder is a fresh temporary one (``--keep`` keeps it and prints where); the batch
and compile caches are the usual ones (``.qcal-cache``), so a second run compiles nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "efficientnet-lite0.yaml"
MODEL = REPO / "weights" / "efficientnet-lite0" / "efficientnet_lite0.onnx"
FLOOR_PEAK_MB = 4096.0  # the Lite sweep's peak resident memory (docs/benchmarks.md)


def resized_model(size: int, folder: Path) -> Path:
    """The shipped Lite0 file with its input declared ``size`` x ``size`` (same weights)."""
    if size == 224:
        return MODEL
    import onnx

    model = onnx.load(str(MODEL))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size
    for prop in model.metadata_props:
        if prop.key == "qcal.input_size":
            prop.value = str(size)
    path = folder / f"efficientnet_lite0_{size}.onnx"
    onnx.save(model, str(path))
    return path


# --- the child: one sweep ------------------------------------------------------------------------

def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class VariantPeaks(logging.Handler):
    """Watches the sweep driver's log: a variant starts at "running" and ends at "top-1". The
    peak mark is read and reset at each end, so a variant's window runs from the end of the one
    before (the first: from the child's start, imports included) to its own end."""

    def __init__(self, out, model: str):
        super().__init__(logging.INFO)
        self.out = out
        self.prefix = model + " "
        self.started = None
        self.resettable = _reset_peak()

    def emit(self, record):
        message = record.getMessage()
        if not message.startswith(self.prefix):
            return
        if message.endswith(": running"):
            self.started = (message[len(self.prefix):-len(": running")], time.time())
        elif ": top-1 " in message and self.started:
            label, t0 = self.started
            self.write(label, time.time() - t0)
            self.started = None

    def write(self, label, seconds):
        row = {"variant": label, "peak_mb": _vm_kb("VmHWM") / 1024.0,
               "rss_end_mb": _vm_kb("VmRSS") / 1024.0, "seconds": round(seconds, 1),
               "peak_is_per_variant": self.resettable}
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()
        self.resettable = _reset_peak()


def child(args):
    from qcal.drivers.sweep import run_sweep
    from qcal.drivers.sweep_config import load_sweep_config

    config = load_sweep_config(CONFIG)
    data = dict(config.data)
    data.update(num_images=args.images, fidelity_crops=args.fidelity_crops,
                calib_crops=args.calib_crops)
    config = dataclasses.replace(config, models=(str(args.model),), data=data,
                                 variants=tuple(config.variants[:args.variants]))
    with open(args.rows, "w") as out:
        handler = VariantPeaks(out, str(args.model))
        logging.getLogger("qcal.drivers.sweep").addHandler(handler)
        start = time.time()
        run_sweep(config, Path(args.output), quiet=True, command="scripts/sweep_memory.py")
        handler.write("(tables and plots)", time.time() - start)


# --- the parent ----------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=260, help="input height and width (224: the "
                        "shipped file itself)")
    parser.add_argument("--variants", type=int, default=12, help="int8 variants after float32")
    parser.add_argument("--images", type=int, default=20, help="labelled images evaluated")
    parser.add_argument("--fidelity-crops", type=int, default=240)
    parser.add_argument("--calib-crops", type=int, default=256)
    parser.add_argument("--keep", action="store_true", help="keep the sweep's output folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    return run(args)


def run(args) -> dict:
    from qcal.drivers.sweep_config import load_sweep_config

    available = len(load_sweep_config(CONFIG).variants)
    if not 1 <= args.variants <= available:
        raise SystemExit(f"--variants must be 1..{available} (the variants of {CONFIG.name})")
    work = Path(tempfile.mkdtemp(prefix="qcal-sweep-memory-"))
    model = resized_model(args.size, work)
    rows_path = work / "variants.jsonl"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", str(model),
               "--output", str(work / "sweep"), "--rows", str(rows_path),
               "--variants", str(args.variants), "--images", str(args.images),
               "--fidelity-crops", str(args.fidelity_crops), "--calib-crops",
               str(args.calib_crops)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    start = time.time()
    done = subprocess.run(command, cwd=REPO, env=env)
    seconds = time.time() - start
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] \
        if rows_path.is_file() else []
    # resetting the peak mark resets ru_maxrss too: the sweep's peak is the largest window's
    peak_mb = max([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0]
                  + [row["peak_mb"] for row in rows])
    print(f"EfficientNet-Lite0 at {args.size}x{args.size}: float32 + {args.variants} int8 "
          f"variants, {args.images} images + {args.fidelity_crops} label-free crops, "
          f"{args.calib_crops} calibration crops ({seconds:.0f} s)")
    print(f"{'variant':<44} {'peak MB':>9} {'RSS after':>10} {'s':>7}")
    for row in rows:
        print(f"{row['variant']:<44} {row['peak_mb']:>9.0f} {row['rss_end_mb']:>10.0f} "
              f"{row['seconds']:>7.1f}")
    verdict = "meets" if peak_mb <= FLOOR_PEAK_MB else "MISSES"
    print(f"peak resident memory of the sweep: {peak_mb:.0f} MB ({verdict} the floor of "
          f"{FLOOR_PEAK_MB:.0f} MB)")
    result = {"size": args.size, "variants": args.variants, "images": args.images,
              "fidelity_crops": args.fidelity_crops, "calib_crops": args.calib_crops,
              "peak_mb": round(peak_mb, 1), "seconds": round(seconds, 1), "per_variant": rows,
              "returncode": done.returncode}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.keep:
        print(f"kept {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    if done.returncode:
        raise SystemExit(f"the sweep failed (exit {done.returncode})")
    return result


if __name__ == "__main__":
    main()
