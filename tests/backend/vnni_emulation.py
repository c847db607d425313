"""The VNNI convs under test on any AVX2 host: real ``vpdpbusd`` where the CPU has VNNI, else the
kernel with ``vpdpbusd`` emulated in plain int32 ops (``$QCAL_VNNI_EMULATE``,
``qcal.backend.tvm.vnni``), so the VNNI tests run, bit for bit against numpy, instead of skipping.

Only the backend tests that test the VNNI convs turn the emulation on (``vnni_kernels``, or the
``vnni_kernels`` fixture of tests/backend/conftest.py), for as long as they run; everything else
compiles the host's real kernels.
"""
from __future__ import annotations

import contextlib
import os

import tvm
from tvm.target import codegen

from qcal.backend.tvm import schedules, vnni

TARGET = schedules.cpu_target()
# AVX2 without VNNI (AMD Zen 3, Intel Skylake): emulate the 16 lanes of AVX-512 VNNI, the VNNI
# kernel a VNNI host runs (8 lanes on targets that switch AVX-512 VNNI off)
EMULATED_LANES = 16 if vnni.vnni_lanes(TARGET) is None and schedules.pair_lanes(TARGET) else None


def _host_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


def avx_vnni_target():
    """The host target with AVX-512 VNNI switched off: 8-lane (AVX-VNNI) ``vpdpbusd`` and 8-channel
    blocks. Where the CPU executes AVX-VNNI but LLVM's model of it leaves the feature out (a
    hypervisor's CPU model, e.g. a Xeon reported as ``rocketlake``), the feature is switched on,
    so the 8-lane kernels run for real there instead of skipping."""
    mcpu = str(TARGET.attrs["mcpu"])
    mattr = ["-avx512vnni"]
    if "avx_vnni" in _host_flags() and not codegen.llvm_cpu_has_features(
            ["avxvnni"], tvm.target.Target({"kind": "llvm", "mcpu": mcpu})):
        mattr.append("+avxvnni")
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mattr": mattr})


@contextlib.contextmanager
def vnni_kernels(on: bool = True):
    """Within: ``vnni.vnni_lanes`` answers for the host target as a VNNI CPU would, the convs
    emulated when the host has no VNNI (``on`` False: nothing changes)."""
    if not on or EMULATED_LANES is None:
        yield
        return
    before = os.environ.get(vnni.EMULATE_ENV)
    os.environ[vnni.EMULATE_ENV] = str(EMULATED_LANES)
    try:
        yield
    finally:
        if before is None:
            del os.environ[vnni.EMULATE_ENV]
        else:
            os.environ[vnni.EMULATE_ENV] = before


def assert_vnni_kernel(text: str, target=TARGET):
    """The TIR (a PrimFunc's script) of a VNNI conv calls ``vpdpbusd``, or, on a target that
    emulates it (inside ``vnni_kernels``), carries the emulation's annotation and no ``vpdpbusd``."""
    if vnni.vnni_emulated(target):
        assert vnni.EMULATED_ANNOTATION in text and "vpdpbusd" not in text
    else:
        assert "vpdpbusd" in text and vnni.EMULATED_ANNOTATION not in text
