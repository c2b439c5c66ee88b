"""The whole test session runs the real Triton kernels on the CPU through the
interpreter: TRITON_INTERPRET must be set before anything imports triton."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes  # noqa: E402

from isreshape_triton.dev import interpreter  # noqa: E402

interpreter.install()  # whole-level custom reductions, the GPU's fp32 → bf16 rounding

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # bounded: no shrinking
settings.load_profile("ci")
torch.set_num_threads(2)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer the fused op allocates starts as NaN, so an unwritten element shows."""
    from isreshape_triton import launch

    def nan_empty(shape, dtype, device):
        with _disable_current_modes():  # the poison fill is the test's work, not the op's
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(launch, "empty_buffer", nan_empty)


EXERCISED_SPECIALIZATIONS = {}  # every kernel specialization launched in this session (see test_zz_aot)


@pytest.fixture(autouse=True, scope="session")
def record_specializations():
    """Record the specialization of every launch of the fused op, for the sm_90 AOT check."""
    from isreshape_triton import launch
    from isreshape_triton.dev import aot

    original = launch.Launch.__call__

    def recording_call(self):
        spec = aot.launch_spec(self)
        EXERCISED_SPECIALIZATIONS[aot.spec_key(spec)] = spec
        return original(self)

    launch.Launch.__call__ = recording_call
    yield EXERCISED_SPECIALIZATIONS
    launch.Launch.__call__ = original
