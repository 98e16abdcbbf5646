"""Running passes: the pass contract, pipelines, YAML specs, run folders, plugins and ``Load``.

Everything a pass author or a pipeline user needs is re-exported here::

    from prunegraph.pipeline import Pass, PassResult, Pipeline, State, register_pass
"""

from prunegraph.pipeline.contract import Pass, PassResult, State, register_pass
from prunegraph.pipeline.load import Load
from prunegraph.pipeline.pipeline import Pipeline, register_check

__all__ = ["Load", "Pass", "PassResult", "Pipeline", "State", "register_check", "register_pass"]
