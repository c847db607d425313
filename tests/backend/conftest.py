import pytest

from tests.backend.vnni_emulation import vnni_kernels as _vnni_kernels


@pytest.fixture
def vnni_kernels():
    """The VNNI convs for the host target, emulated where it has no VNNI (vnni_emulation.py)."""
    with _vnni_kernels():
        yield
