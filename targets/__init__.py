"""Lowerings of pruned models: Hugging Face checkpoints, ONNX and Triton. Importing this package
registers each target, which gives it a pass and a ``prunegraph export`` subcommand
(:mod:`prunegraph.pipeline.targets`)::

    from prunegraph.targets import ExportONNX, ExportTriton, Save
"""

from prunegraph.targets.hf import Save
from prunegraph.targets.onnx import ExportONNX
from prunegraph.targets.triton.export import ExportTriton

__all__ = ["ExportONNX", "ExportTriton", "Save"]
