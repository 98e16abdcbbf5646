"""Lowerings of pruned models: Hugging Face checkpoints, ONNX and Triton. Importing this package
registers its passes and CLI commands."""

from prunegraph.targets import (
    export_cli,  # noqa: F401,E402  (registers `prunegraph export`)
    onnx,  # noqa: F401,E402  (registers ExportONNX, `export onnx`)
)
from prunegraph.targets.triton import export  # noqa: F401,E402  (registers `export triton`)
