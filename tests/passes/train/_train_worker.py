"""One rank of the two-process training tests (started by torchrun from test_fsdp_training.py).

Each ``--job NAME:FAMILY[:STEP]`` (FAMILY ``ddp``, ``hard_concrete``, ``prunepath``,
``ddp+checkpointing``, or ``ddp+polish``: a polish under ``round_to: latency`` with a different
fake GEMM timer on each rank) trains a tiny model on the corpus with the run folder
``OUT/NAME`` (rank 0) and, on rank 0, saves what it trained to ``OUT/NAME.pt``; with ``STEP``,
rank 1 exits hard during that step (a killed launch). Jobs run one after the other in one launch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tests' helper modules

import torch  # noqa: E402

torch.set_num_threads(1)

from _gate_fixtures import gated_state  # noqa: E402
from _pruning_fixtures import fresh, groups_of  # noqa: E402
from _tiny_tokenizer import make_tokenizer  # noqa: E402

from prunegraph.pipeline import distributed  # noqa: E402
from prunegraph.pipeline.contract import State  # noqa: E402

#: The settings of every job; the single-process reference uses them with twice the batch.
TRAIN = dict(steps=6, block_len=32, warmup=2, checkpoint_every=2, plots=False)
#: No load-balance term: it squares each rank's mean routing probability, a statistic of the
#: rank's own batch (as in any data-parallel MoE training), so it is not the one-process value.
PRUNEPATH = dict(warmup_steps=2, lr=1e-3, router_lr=1e-2, load_balance=0.0)


def gate_run(family: str, run_dir, corpus: str, batch_size: int, **extra) -> State:
    from prunegraph.passes.train import Train

    state = gated_state("llama", family=family)
    state.run_dir = run_dir
    Train(**TRAIN, batch_size=batch_size, source=corpus, **extra)(state)
    return state


class StepTimer:
    """A fake GEMM timer: a GEMM costs its output's ``step``-column tiles times its tokens."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, fn, device) -> float:
        y = fn()
        return 1e-6 * -(-y.shape[1] // self.step) * y.shape[0]


def polish_run(run_dir, corpus: str, batch_size: int, step: int) -> State:
    """DDP with a polish under ``round_to: latency``, GEMMs timed by ``StepTimer(step)``
    (``PRUNEGRAPH_CACHE`` must name a folder of this process's own)."""
    from prunegraph.plan import latency

    before, latency.default_timer = latency.default_timer, StepTimer(step)
    try:
        return gate_run("ddp", run_dir, corpus, batch_size=batch_size, polish_steps=2,
                        round_to="latency")
    finally:
        latency.default_timer = before


def prunepath_run(run_dir, corpus: str, batch_size: int) -> State:
    from prunegraph.passes.prunepath.moefy import MoEfy
    from prunegraph.passes.prunepath.training import PrunePath

    state = State(model=fresh("llama"), groups=list(groups_of("llama")),
                  tokenizer=make_tokenizer())
    state = MoEfy(group_size=12, iters=5)(state).state
    state.run_dir = run_dir
    train = dict(steps=4, batch_size=batch_size, block_len=16, checkpoint_every=2,
                 source=corpus)
    PrunePath(**PRUNEPATH, train=train)(state)
    return state


def result(state: State, family: str) -> dict:
    """What the tests compare, and whether the model came back as a plain module."""
    from torch.distributed.tensor import DTensor

    params = dict(state.model.named_parameters())
    plain = all(not isinstance(p, DTensor) for p in params.values()) and not any(
        type(m).__name__.startswith("FSDP") for m in state.model.modules())
    out = {"plain": plain}
    if family == "prunepath":
        out["params"] = {n: p.detach().clone() for n, p in params.items()}
    else:
        out["gates"] = {n: v.detach().clone() for n, v in state.trained_gates.items()}
        out["duals"] = [getattr(state.gate_family, k).detach().clone() for k in ("l1", "l2", "l3")]
        out["weights"] = {n: p.detach().clone() for n, p in params.items()}
    metrics = Path(state.run_dir or ".") / ("prunepath" if family == "prunepath" else "train")
    out["metrics"] = (metrics / "metrics.jsonl").read_text() if state.run_dir else None
    return out


def _die_in_step(die_at: int) -> None:
    """Exit this process hard at the end of step ``die_at`` (before its checkpoint)."""
    from prunegraph.passes.train.gate_objective import GateObjective

    post_step = GateObjective.post_step

    def dying(self, step, total):
        if step + 1 == die_at:
            os._exit(9)
        return post_step(self, step, total)

    GateObjective.post_step = dying


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--job", action="append", default=[])
    args = parser.parse_args()
    distributed.init()
    for job in args.job:
        name, family, *die_at = job.split(":")
        if die_at and distributed.rank() == 1:
            _die_in_step(int(die_at[0]))
        run_dir = Path(args.out) / name if distributed.is_main() else None
        if family == "prunepath":
            state = prunepath_run(run_dir, args.corpus, batch_size=1)
        elif family.endswith("+polish"):  # each rank times its own "GPU": 32 and 48 wide tiles
            os.environ["PRUNEGRAPH_CACHE"] = str(Path(args.out) / f"cache-{distributed.rank()}")
            family = family.split("+")[0]
            state = polish_run(run_dir, args.corpus, batch_size=1,
                               step=32 if distributed.rank() == 0 else 48)
        elif family.endswith("+checkpointing"):  # activation checkpointing under FSDP
            family = family.split("+")[0]
            state = gate_run(family, run_dir, args.corpus, batch_size=1,
                             activation_checkpointing=True)
        else:
            state = gate_run(family, run_dir, args.corpus, batch_size=1)
        if distributed.is_main():
            torch.save(result(state, family), Path(args.out) / f"{name}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main()
