"""Recovery after slicing: the ``Distill`` pass (knowledge distillation from the dense model).

* :mod:`.distill_pass`: the pass and its settings;
* :mod:`.objective`: :class:`DistillObjective`, what the training loop trains;
* :mod:`.losses`: the hidden-state term (the logit KL is the loop's ``kd_loss``);
* :mod:`.teacher`: the dense teacher, reloaded from Load's source;
* :mod:`.lora`: LoRA adapters through peft, merged back.
"""

from prunegraph.passes.distill.distill_pass import Distill
from prunegraph.passes.distill.objective import DistillObjective

__all__ = ["Distill", "DistillObjective"]
