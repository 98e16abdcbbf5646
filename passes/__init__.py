"""Transformations over prunegraph's IR: analysis passes, gate families, training, finalize,
slicing and MoEfication. Importing this package registers its passes and CLI commands."""

from prunegraph.passes import analyze  # noqa: F401,E402  (registers the Analyze pass)
from prunegraph.passes import eval_cli  # noqa: F401,E402  (registers `prunegraph eval`)
from prunegraph.passes import prune  # noqa: F401,E402  (registers the Prune pass)
from prunegraph.passes import slicing  # noqa: F401,E402  (registers the Slice pass)
from prunegraph.passes import evaluate  # noqa: F401,E402  (registers the Evaluate pass)
from prunegraph.passes import save  # noqa: F401,E402  (registers the Save pass)
from prunegraph.passes import moefy  # noqa: F401,E402  (registers the MoEfy pass)
from prunegraph.passes import prunepath  # noqa: F401,E402  (registers PrunePath and TauSweep)
from prunegraph.passes import gate  # noqa: F401,E402  (registers the Gate pass)
from prunegraph.passes import train  # noqa: F401,E402  (registers the Train pass)
from prunegraph.passes import finalize  # noqa: F401,E402  (registers the Finalize pass)
from prunegraph.passes import fuse  # noqa: F401,E402  (registers the Fuse pass)
from prunegraph.passes import sparse_prune  # noqa: F401,E402  (registers the SparsePrune pass)
from prunegraph.passes import save_sparse  # noqa: F401,E402  (registers the SaveSparse pass)
