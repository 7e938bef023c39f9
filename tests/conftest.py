import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels run through the interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    # The backend warns once per message and process (backend._warned): cleared so that a test's
    # "no fallback" check sees its own fallback even when an earlier test already warned the same.
    backend = sys.modules.get("lcsm_compile.backend")  # one not imported yet has warned nothing
    if backend is not None:
        backend._warned.clear()
