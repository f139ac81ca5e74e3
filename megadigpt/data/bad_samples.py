"""``bad_samples.jsonl`` in the run directory: every bad sample by identity, once.

One JSON object a line, a sample list (``path``, ``key``, ``offset``, ``size``) plus ``kind``, ``reason`` and,
for what the loaders found, ``step`` (the optimizer step the sample was drawn for), ``epoch`` and ``rank``:

- ``"kind": "index"``: found while listing the source (a damaged shard, ``key`` empty; a sample without an image
  member; an unparsable label). Written by rank 0 at the start of the run.
- ``"kind": "decode"``: a sample the loader could not decode, each time it is drawn (once per epoch).
- Stream mode (:mod:`megadigpt.data.streaming`) has no listing: ``"kind": "decode"`` records name the shard URL
  and the key (``offset`` and ``size`` are -1), and ``"kind": "shard"`` records a shard skipped after its retries
  or found damaged (``path`` the URL, ``key`` empty), once each time a reader meets it.

Under several ranks each rank finds its own samples (ranks read disjoint slices, DataLoader workers hand their
findings to the rank's main process inside the batch); :meth:`BadSampleLog.flush` gathers them to rank 0, the
only writer (appends from several nodes to one file on a shared file system are not atomic). It is a
collective: every rank calls it at the same points (the log lines and every checkpoint). Exactly once across
resumes: a resumed run keeps the records of the steps its checkpoint covers and drops the later ones (their
steps run again and find them again); the index records are rewritten from the current listing.
"""

import json
import logging
import os
from pathlib import Path
from typing import Iterable, List, Sequence

from ..safe_fs import open_append, read_regular, write_atomic
from .sources import Problem, Sample

log = logging.getLogger(__name__)

FILENAME = "bad_samples.jsonl"


class BadSampleLog:
    def __init__(self, run_dir, samples: Sequence[Sample], rank: int, start_step: int,
                 index_problems: Iterable[Problem] = (), device=None):
        self.path = Path(run_dir) / FILENAME
        self.samples, self.rank = samples, rank
        self.device = device  # where a tensor for the process group's backend lives (cuda under NCCL)
        self.pending: List[dict] = []
        self.written = 0
        if rank == 0:
            self._restart(start_step, list(index_problems))

    def _restart(self, start_step: int, problems: List[Problem]) -> None:
        kept = []
        raw = read_regular(self.path, limit=1 << 30, what="bad-sample log")  # never read through a planted link
        if raw:
            for line in raw.decode(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line torn by a kill
                    continue
                step = rec.get("step", 0) if isinstance(rec, dict) else None
                if isinstance(rec, dict) and rec.get("kind") in ("decode", "shard") and \
                        type(step) is int and 0 <= step <= start_step:  # a tampered record is dropped, not trusted
                    kept.append(rec)
        recs = [{"kind": "index", "path": p.path, "key": p.key, "reason": p.reason} for p in problems] + kept
        try:  # a fresh temporary renamed into place: a planted link at either name is replaced, not written through
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in recs), what="bad-sample log")
        except OSError as e:  # a record of the data, not worth a run: say so and go on
            log.warning("cannot write %s: %s", self.path, e.strerror or e)
            return
        self.written = len(recs)

    def add(self, batch: dict, step: int) -> None:
        """Note the bad samples of a micro-batch drawn for optimizer step ``step``."""
        for index, epoch, reason in batch.get("bad", ()):
            s = self.samples[index]
            self.pending.append({"kind": "decode", "path": s.path, "key": s.key, "offset": s.offset,
                                 "size": s.size, "reason": reason, "step": int(step), "epoch": int(epoch),
                                 "rank": self.rank})
        for url, key, epoch, reason in batch.get("bad_stream", ()):  # stream mode: the shard URL and the key
            self.pending.append({"kind": "decode", "path": url, "key": key, "offset": -1, "size": -1,
                                 "reason": reason, "step": int(step), "epoch": int(epoch), "rank": self.rank})
        for url, reason, epoch in batch.get("shard_problems", ()):
            self.pending.append({"kind": "shard", "path": url, "key": "", "offset": -1, "size": -1,
                                 "reason": reason, "step": int(step), "epoch": int(epoch), "rank": self.rank})

    def flush(self) -> None:
        """Write what every rank has noted (rank 0 writes). A collective under a process group."""
        import torch.distributed as dist

        recs, self.pending = self.pending, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            n = torch.tensor([float(len(recs))], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            if n.item() == 0:  # the usual case: one scalar reduction, nothing gathered
                return
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, recs)
            recs = [r for part in gathered for r in part]
        if self.rank != 0 or not recs:
            return
        recs.sort(key=lambda r: (r["step"], r["rank"]))
        try:
            with open_append(self.path, what="bad-sample log") as f:  # no link; a torn last line is ended first
                f.write("".join(json.dumps(r) + "\n" for r in recs))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # e.g. a full disk: keep them for the next flush; the run goes on
            log.warning("cannot write %d bad-sample records to %s: %s", len(recs), self.path, e.strerror or e)
            self.pending = recs + self.pending
            return
        self.written += len(recs)


def read_bad_samples(run_dir) -> List[dict]:
    raw = read_regular(Path(run_dir) / FILENAME, limit=1 << 30, what="bad-sample log")
    if not raw:
        return []
    out = []
    for line in raw.decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line torn by a kill or a full disk
            continue
    return out
