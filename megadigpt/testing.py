"""Fault injection for the test suite: ``MEGADIGPT_FAULTS="kill_in_save=4,nan=6:1,nan=7"`` makes the process die
during the save of step 4, and makes the loss non-finite at step 6 on rank 1 and at step 7 on every rank
(``nan=6:1:0``: only micro-batch 0 of step 6, on rank 1);
``sleep=3`` makes step 3 take 3 s longer, before its end (a window for a test's signal, which the ranks agree on at
the step's end); ``term=5`` makes the process send itself SIGTERM just before the end of step 5 (a preemption at a
known step: step 5 is checkpointed); ``crash=2`` raises an error in step 2 (a failing job); ``enospc_in_save=4`` makes every checkpoint
write of step 4 fail with ENOSPC (a full disk, where a test may not mount a small tmpfs; checked in
``megadigpt.checkpoint.ds_checkpoint``).
Never set outside tests; the names are the ones above."""

import os
import signal
import time


def _parse():
    out = {}
    for item in filter(None, os.environ.get("MEGADIGPT_FAULTS", "").split(",")):
        name, _, arg = item.partition("=")
        out.setdefault(name.strip(), []).append(arg.strip())
    return out


_PARSED = {}  # MEGADIGPT_FAULTS text -> its parse: read at each check, so a process that runs several commands
# (tests/config_matrix_runner.py) arms each with its own value


def _faults() -> dict:
    text = os.environ.get("MEGADIGPT_FAULTS", "")
    if text not in _PARSED:
        _PARSED[text] = _parse()
    return _PARSED[text]


def active(name: str, step: int, rank: int = 0, micro: int = None) -> bool:
    """``STEP``, ``STEP:RANK`` or ``STEP:RANK:MICRO`` (an empty RANK: every rank; MICRO: the micro-batch of the
    step, from 0, where the caller passes ``micro``; without it every micro-batch)."""
    for arg in _faults().get(name, []):
        s, _, rest = arg.partition(":")
        r, _, m = rest.partition(":")
        if int(s) == step and (r == "" or int(r) == rank) and (m == "" or micro is None or int(m) == micro):
            return True
    return False


def fault(name: str, step: int, rank: int = None):
    """Act out the fault ``name`` if it is armed for this step (and rank)."""
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    if name == "kill_in_save" and active(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "sleep" and active(name, step, rank):
        time.sleep(3)
    if name == "term" and active(name, step, rank):
        os.kill(os.getpid(), signal.SIGTERM)
    if name == "crash" and active(name, step, rank):
        raise RuntimeError(f"injected crash at step {step} (MEGADIGPT_FAULTS)")


def record_trained(batch, step: int, rank: int) -> None:
    """Tests of stream-mode resume: with ``MEGADIGPT_TRAINED_LOG=<path>``, append one JSON line per micro-batch the
    trainer consumes (``{"step", "rank", "ids": [[shard, key], ...]}``) to ``<path>.rank<rank>``, flushed at once
    so that a kill -9 keeps what was written. Nothing is done without the variable."""
    path = os.environ.get("MEGADIGPT_TRAINED_LOG")
    if not path or "ids" not in batch:
        return
    import json

    with open(f"{path}.rank{rank}", "a") as f:
        f.write(json.dumps({"step": int(step), "rank": int(rank), "ids": [list(i) for i in batch["ids"]]}) + "\n")
