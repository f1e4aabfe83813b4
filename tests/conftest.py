"""pytest configuration: offline Hub, and fixtures built on tests/helpers.py."""

from __future__ import annotations

import os

import pytest

# Hub tests must never reach the network; huggingface_hub reads this when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# pytest-xdist (`make test-fast` runs on every core) gives its workers COLUMNS=80, which the serial run has not:
# a worker's CLI output would wrap where the serial run's does not. The CLI's own page width (cli/_output.py)
# applies to both, as it does to a user's pipe.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("COLUMNS") == "80":
    del os.environ["COLUMNS"]
# No GPU in CI: Triton kernels run in the interpreter, which must be chosen before any kernel module is imported.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

from helpers import write_adapter  # noqa: E402


@pytest.fixture
def adapter_writer(tmp_path):
    def make(tensors, config=None, name="adapter", **kw):
        return write_adapter(tmp_path / name, tensors, config, **kw)

    return make


def pytest_collection_modifyitems(session, config, items):
    """The GGUF proof (marked `gguf`) runs last: `make test` builds llama.cpp in the background beside the suite
    (tests/gguf_proof/llama_cpp_build.py), so by the end the build has had the whole suite's time to finish."""
    items.sort(key=lambda item: item.get_closest_marker("gguf") is not None)
