"""Test-wide settings.

* Tiny models run fastest on one thread (and parallel runs do not fight for cores).
* Without a GPU, Triton kernels run on triton's CPU interpreter. ``TRITON_INTERPRET`` must be set
  before any kernel module is imported (``triton.jit`` reads it when decorating), and tests outside
  ``tests/targets/triton`` import them too, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)

# The pipeline's invariant checks (gates at 1 == original, sliced == gated, declared state types)
# run between passes in every test that runs a pipeline.
os.environ.setdefault("PRUNEGRAPH_CHECKS", "1")
