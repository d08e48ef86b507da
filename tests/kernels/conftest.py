"""Run the Triton kernels under the interpreter on CPU when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it must be set before
``prosparse.kernels.triton`` is first imported; conftest runs before the tests import it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
