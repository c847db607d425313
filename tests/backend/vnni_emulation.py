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

from qcal.backend.tvm import schedules, vnni

TARGET = schedules.cpu_target()
# AVX2 without VNNI (AMD Zen 3, Intel Skylake): emulate the 16 lanes of AVX-512 VNNI, the VNNI
# kernel a VNNI host runs (8 lanes on targets that switch AVX-512 VNNI off)
EMULATED_LANES = 16 if vnni.vnni_lanes(TARGET) is None and schedules.pair_lanes(TARGET) else None


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
