"""The DALI pretraining pipeline: decoding on the GPU (``mixed``) when CUDA is there, on the CPU otherwise,
with the same code.

Sample selection is the torch path's (:class:`PretrainStream` positions): a Python source reads each sample's
bytes and its image header, draws the crop box, flip and segment order from (seed, epoch, index) exactly as the
torch path does, and hands DALI the encoded bytes plus the box. DALI decodes only the box (ROI decoding), resizes
it to each view's size (student, teacher) and flips it. So the DALI and torch paths select the same samples with
the same boxes, and differ only by their decoders and resampling filters (measured in tests/test_dali.py).
With ``py_workers`` > 0 that source is DALI's parallel external source: the samples of each batch are prepared in
worker processes (fork on the CPU, spawn once CUDA is initialised), not in the training thread, with the same
output (a bad sample's reason travels in the pipeline's output).

Bad data never stops the run, and decode failures fall back per sample: samples whose header does not parse,
that are empty, too large, or (JPEG) lack their end-of-image marker are replaced by a placeholder and marked
invalid (with the reason) before DALI sees them; images in a format DALI does not decode (GIF, also named .jpg)
and samples DALI was once seen to fail on are decoded by Pillow, as the torch path does, and handed to DALI as
raw pixels (PPM, lossless), so they keep their crop and train as on the torch path. If DALI still fails on a
batch, each sample of it is decoded alone to find the ones it refuses; those go the Pillow way from then on and
the batch is redone. A failure no sample explains is not bad data: that batch comes from the torch path, and
five such failures in a row are an error.

Stream mode (:class:`DaliStreamLoader`): the torch DataLoader over :class:`megadigpt.data.streaming.StreamDataset`
reads the shards and, in its workers, runs the same header check and draws the same boxes, flips and segment
orders as the stream's torch path (``encoded=True``: bytes and boxes, nothing decoded). Its batches feed the same
DALI graph through a batch external source. DALI asks its source ahead of the batch it returns, so the read
cursors are noted when a batch is handed to the trainer, not when DALI takes it. If DALI fails on a batch, every
batch it had taken and not returned is decoded by Pillow with its boxes (the torch path's output) and the
pipeline is rebuilt; five failures in a row are an error.
"""

import io
import logging
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image

from ..distributed.engine import resolve_device
from .images import MAX_PIXELS, examine_image  # noqa: F401 - re-exported
from .pretrain_loader import PretrainStream, collate, decode_problem, decode_rgb, random_resized_crop_box, sample_rng

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _placeholder_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    return buf.getvalue()


PLACEHOLDER = _placeholder_jpeg()  # an 8x8 black JPEG fed in place of a sample that cannot be read


# what DALI's decoders (nvImageCodec) read; anything else Pillow reads goes the Pillow way. MPO is how Pillow
# names a JPEG with extra pictures (camera files).
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "PPM", "TIFF", "WEBP", "JPEG2000"})


def inspect_image(data: bytes):
    """Cheap pre-decode check: (width, height) if the bytes look decodable, else None."""
    problem, w, h, _ = examine_image(data)
    return None if problem else (w, h)


def pillow_to_dali(data: bytes) -> bytes:
    """Decode with Pillow (the torch path's decoder) and re-encode losslessly in a format DALI reads: raw RGB as
    binary PPM, no compression to pay for. Raises where Pillow cannot decode."""
    img = decode_rgb(data)
    return b"P6\n%d %d\n255\n" % img.size + img.tobytes()


def prepare(data: bytes, pillow: bool) -> Tuple[Optional[bytes], Optional[str], int, int]:
    """What to hand DALI for one sample: (bytes or None if bad, reason if bad, width, height). ``pillow``: this
    sample goes the Pillow way whatever its format (DALI was seen to fail on it)."""
    problem, w, h, fmt = examine_image(data)
    if problem:
        return None, problem, w, h
    if pillow or fmt not in DALI_FORMATS:
        try:
            return pillow_to_dali(data), None, w, h
        except Exception as e:  # noqa: BLE001
            return None, decode_problem(data, e), w, h
    return data, None, w, h


class _Source:
    """Batch-mode external source: iteration i (offset by ``start``) -> micro-batch i of the plan.
    ``pillow_only``: dataset indices DALI failed on; ``reasons``: (epoch, index) -> why a sample is bad, read by
    the loader when it yields the batch (both shared with the loader, across pipeline rebuilds)."""

    def __init__(self, stream: PretrainStream, batches: Sequence[List[int]], start: int,
                 pillow_only: Optional[Set[int]] = None, reasons: Optional[Dict[Tuple[int, int], str]] = None):
        self.stream, self.batches, self.start = stream, batches, start
        self.pillow_only = pillow_only if pillow_only is not None else set()
        self.reasons = reasons if reasons is not None else {}
        self.handles = {}

    def __getstate__(self):
        # spawned source workers get a copy: no open file handles (reopened there); reasons travel in the output
        return {**self.__dict__, "handles": {}, "reasons": {}}

    def sample(self, position: int):
        st = self.stream
        epoch, index = st.locate(position)
        s = st.samples[index]
        rng = sample_rng(st.seed, epoch, index)
        try:
            data, reason, w, h = prepare(s.read(self.handles), index in self.pillow_only)
        except OSError as e:
            data, reason = None, f"unreadable: {e.strerror or e}"
        if data is None:
            data, box, flip, valid = PLACEHOLDER, (0, 0, 8, 8), False, False
        else:
            box = random_resized_crop_box(rng, h, w, st.scale, st.ratio)
            flip, valid = bool(st.hflip and rng.random() < 0.5), True
        order = np.random.default_rng([st.seed, epoch, index, 1]).permutation(st.num_segments)
        return (np.frombuffer(data, dtype=np.uint8), np.array(box[:2], dtype=np.int32),
                np.array(box[2:], dtype=np.int32), np.array(flip, dtype=np.int32), order.astype(np.int64),
                np.array(valid, dtype=np.int32), np.array(s.label, dtype=np.int64), np.array(index, dtype=np.int64),
                np.array(epoch, dtype=np.int64),
                # why it is bad, carried by the pipeline: a parallel source runs in other processes
                np.frombuffer((reason or "-").encode(), dtype=np.uint8))

    def positions(self, iteration: int) -> List[int]:
        i = self.start + iteration
        return self.batches[min(i, len(self.batches) - 1)]  # DALI prefetches past the end: repeat the last

    def __call__(self, iteration: int):
        cols = list(zip(*(self.sample(p) for p in self.positions(iteration))))
        return [list(c) for c in cols]


class _ParallelSource(_Source):
    """The same samples one at a time, for DALI's parallel external source (sample mode: DALI spreads the
    samples of each batch over its Python worker processes, outside the training process's GIL)."""

    def __call__(self, info):
        return self.sample(self.positions(info.iteration)[info.idx_in_batch])


OUTPUTS = ("encoded", "crop_start", "crop_shape", "flip", "order", "valid", "label", "index", "epoch", "reason")


def py_start_method(device_type: str) -> str:
    """How DALI starts its Python source workers: fork is cheap but unsafe once CUDA is initialised in the
    parent (the trainer's process always is, on a GPU), so spawn there."""
    return "spawn" if device_type == "cuda" else "fork"


def build_pipeline(source: _Source, sizes: Sequence[int], batch_size: int, device_id, num_threads: int,
                   interpolation: str = "bicubic", prefetch: int = 2, py_workers: int = 0):
    return _pipeline_graph(source, sizes, batch_size, device_id, num_threads, interpolation, prefetch, py_workers)


def _pipeline_graph(source, sizes, batch_size, device_id, num_threads, interpolation="bicubic", prefetch=2,
                    py_workers=0):
    """``py_workers`` > 0: ``source`` is a :class:`_ParallelSource` run by that many DALI worker processes
    (parallel external source); 0: a batch source run by ``pipe.run()`` in the calling thread."""
    from nvidia.dali import fn, pipeline_def, types

    interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[interpolation]
    gpu = device_id is not None
    parallel = py_workers > 0
    extra = dict(py_num_workers=py_workers, py_start_method=py_start_method("cuda" if gpu else "cpu")) \
        if parallel else {}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch,
                  exec_dynamic=True, **extra)
    def pipe():
        src = dict(parallel=True, batch=False, prefetch_queue_depth=prefetch) if parallel else dict(batch=True)
        enc, start, shape, flip, order, valid, label, index, epoch, reason = fn.external_source(
            source=source, num_outputs=len(OUTPUTS), **src)
        img = fn.decoders.image_slice(enc, start, shape, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                      axis_names="HW", normalized_anchor=False, normalized_shape=False)
        views = []
        for s in sizes:
            v = fn.resize(img, resize_x=s, resize_y=s, interp_type=interp, antialias=True)
            views.append(fn.crop_mirror_normalize(v, mirror=flip, dtype=types.UINT8, output_layout="CHW",
                                                  mean=[0.0], std=[1.0]))
        return (*views, order, valid, label, index, epoch, reason)

    return pipe()


def run_pipeline(pipe, device: torch.device):
    """One batch. On a GPU its outputs are bound to torch's current stream (``run(cuda_stream)``, which needs the
    dynamic executor every pipeline here is built with): the copies into torch tensors queue behind DALI's work on
    that stream instead of the host waiting for DALI first (``run()`` alone is host-synchronous: a stall per
    batch). CPU pipelines: ``run()``."""
    if device.type == "cuda":
        return pipe.run(torch.cuda.current_stream(device))
    return pipe.run()


def view_to_torch(tl, device, dtype=torch.uint8) -> torch.Tensor:
    """An image batch: GPU outputs are copied device-to-device, CPU outputs wrapped without a copy."""
    t = tl.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=dtype, device=device)
        return feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    return torch.from_numpy(np.array(t))


def meta_to_torch(tl) -> torch.Tensor:
    """A per-sample metadata batch (labels, flags, indices) as a CPU tensor."""
    return torch.from_numpy(np.array(tl.as_tensor()))


def find_dali_failures(positions: Sequence[int], make_source, build, skip: Set[int]) -> Set[int]:
    """Which of ``positions`` DALI fails on, each decoded alone (a failure leaves a DALI pipeline unusable, so
    the probe pipeline is rebuilt after each). ``make_source(positions)`` -> a source of one-sample batches
    serving them in order, with ``.index_of(k)`` naming the dataset index of the k-th; ``build(source)`` -> a
    built batch-size-1 pipeline; indices in ``skip`` are not probed (they already go the Pillow way)."""
    todo = list(positions)
    failed: Set[int] = set()
    while todo:
        src = make_source(todo)
        pipe = build(src)
        done = 0
        try:
            for _ in range(len(todo)):
                pipe.run()
                done += 1
        except Exception:  # noqa: BLE001 - the sample at ``done`` is one DALI refuses
            idx = src.index_of(done)
            if idx not in skip:
                failed.add(idx)
            done += 1
        finally:
            pipe._shutdown()
            del pipe
        todo = todo[done:] if done < len(todo) else []
    return failed


def explain_failure(positions: Sequence[int], make_source, build, skip: Set[int], device_id) -> Set[int]:
    """:func:`find_dali_failures`, but nothing when DALI fails on every sample and on a known-good JPEG too."""
    failed = find_dali_failures(positions, make_source, build, skip)
    probed = {make_source(list(positions)).index_of(k) for k in range(len(positions))} - skip
    if failed and failed == probed and not dali_decodes_placeholder(device_id):
        return set()
    return failed


def dali_decodes_placeholder(device_id) -> bool:
    """Whether DALI decodes a known-good JPEG at all: when a probe blames every sample it tried, this tells a
    pipeline that fails on everything (not bad data) from a batch made only of images DALI refuses."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
    def pipe():
        enc = fn.external_source(source=lambda i: [np.frombuffer(PLACEHOLDER, dtype=np.uint8)], batch=True)
        return fn.decoders.image(enc, device="mixed" if device_id is not None else "cpu", output_type=types.RGB)

    p = None
    try:
        p = pipe()
        p.build()
        p.run()
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        if p is not None:
            p._shutdown()


class _ProbeSource(_Source):
    def index_of(self, k: int) -> int:
        return self.stream.locate(self.batches[k][0])[1]


class DaliPretrainLoader:
    """Iterates this rank's micro-batches like the torch DataLoader does, as the same dicts."""

    def __init__(self, stream: PretrainStream, batch_sampler, device: torch.device, num_threads: int = 2,
                 py_workers: int = 0):
        self.stream, self.sampler = stream, batch_sampler
        self.batches = batch_sampler  # indexable: micro-batch i -> its stream positions
        self.device = resolve_device(device)  # "cuda" without an index: the current device, not a CPU pipeline
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self.num_threads = num_threads
        self.py_workers = py_workers  # DALI source worker processes (0: the source runs in this thread)
        self.failed_batches = 0  # batches no sample explained, produced by the torch path
        self.pillow_only: Set[int] = set()  # samples DALI failed on: decoded by Pillow from then on
        self.reasons: Dict[Tuple[int, int], str] = {}
        self.max_consecutive_failures = 5

    def __len__(self):
        return len(self.batches)

    def _pipeline(self, start: int):
        cls = _ParallelSource if self.py_workers > 0 else _Source
        p = build_pipeline(cls(self.stream, self.batches, start, self.pillow_only, self.reasons),
                           self.stream.sizes, self.sampler.m, self.device_id, self.num_threads,
                           self.stream.interp_name, py_workers=self.py_workers)
        p.build()
        return p

    def _probe(self, first: int) -> Set[int]:
        """The samples of micro-batches ``first`` and ``first + 1`` (DALI may have been working on either when it
        failed) that DALI cannot decode alone."""
        positions = [p for i in range(first, min(first + 2, len(self.batches))) for p in self.batches[i]]

        def build(src):
            p = _pipeline_graph(src, self.stream.sizes, 1, self.device_id, 1, self.stream.interp_name, prefetch=1)
            p.build()
            return p

        return explain_failure(
            positions, lambda todo: _ProbeSource(self.stream, [[p] for p in todo], 0, self.pillow_only, {}), build,
            self.pillow_only, self.device_id)

    def _torch_batch(self, i: int) -> dict:
        return collate([self.stream[p] for p in self.batches[i]])

    def __iter__(self):
        i, n = 0, len(self.batches)
        consecutive, last_failed = 0, -2
        nviews = len(self.stream.sizes)
        while i < n:
            pipe = self._pipeline(i)
            try:
                while i < n:
                    out = run_pipeline(pipe, self.device)
                    views = [view_to_torch(out[k], self.device) for k in range(nviews)]
                    order, valid, label, index, epoch = [meta_to_torch(out[k]) for k in range(nviews, len(out) - 1)]
                    valid, index, epoch = valid.bool().reshape(-1), index.reshape(-1), epoch.reshape(-1)
                    reasons = out[len(out) - 1]
                    bad = [(int(index[r]), int(epoch[r]), np.array(reasons[r]).tobytes().decode(errors="replace"))
                           for r in torch.nonzero(~valid).reshape(-1).tolist()]
                    yield {"views": views, "order": order.long(), "valid": valid, "label": label.reshape(-1),
                           "index": index, "epoch": epoch, "bad": bad}
                    i += 1
            except Exception as e:  # noqa: BLE001 - a decode error invalidates the DALI pipeline, not the run
                first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
                culprits = self._probe(i)
                if culprits:  # bad data (for DALI): those samples go the Pillow way, the batch is redone
                    for idx in sorted(culprits):
                        s = self.stream.samples[idx]
                        log.warning("DALI cannot decode %s %s; Pillow decodes it from now on (a bad sample if "
                                    "Pillow cannot either)", s.path, s.key)
                    self.pillow_only |= culprits
                    consecutive = 0
                    continue
                consecutive = consecutive + 1 if last_failed == i - 1 else 1
                last_failed = i
                if consecutive >= self.max_consecutive_failures:
                    raise RuntimeError(f"the DALI pipeline failed on {consecutive} micro-batches in a row and no "
                                       f"sample explains it; this is not bad data (set data.loader=torch to "
                                       f"continue without DALI): {e}") from e
                log.warning("DALI failed on micro-batch %d (%s) and no sample of it explains that; producing it "
                            "with the torch path", i, first_line)
                self.failed_batches += 1
                yield self._torch_batch(i)
                i += 1
            finally:
                # stop DALI's worker threads now: left to interpreter shutdown, they held the exit of an
                # mpirun job for over a minute (measured)
                pipe._shutdown()
                del pipe


class _StreamFeed:
    """Batch external source over a :class:`~megadigpt.data.streaming.StreamLoader`'s raw batches; every batch it
    hands DALI is also queued in ``pending`` (for its metadata, its cursor, and a Pillow fallback)."""

    def __init__(self, batches, pending: list):
        self.batches, self.pending, self.last = batches, pending, None
        self.error = None  # what the stream itself raised (not DALI's failure): re-raised by the loader

    def __call__(self, iteration: int):
        try:
            b = next(self.batches, None)
        except Exception as e:  # noqa: BLE001 - kept, to reach the trainer as itself and not as a DALI error
            self.error = e
            raise
        if b is None:  # DALI prefetches past the end: repeat the last batch (never handed on)
            b = self.last
        else:
            self.pending.append(b)
        self.last = b
        n = len(b["encoded"])
        rs = [(r or "-").encode() for r in b["reasons"]]
        return [[np.frombuffer(e, dtype=np.uint8) for e in b["encoded"]],
                [np.array(x[:2], dtype=np.int32) for x in b["box"]],
                [np.array(x[2:4], dtype=np.int32) for x in b["box"]],
                [np.array(bool(x[4]), dtype=np.int32) for x in b["box"]],
                [b["order"][i].numpy() for i in range(n)],
                [np.array(bool(b["valid"][i]), dtype=np.int32) for i in range(n)],
                [np.array(int(b["label"][i]), dtype=np.int64) for i in range(n)],
                [np.array(-1, dtype=np.int64)] * n,
                [np.array(int(b["epoch"][i]), dtype=np.int64) for i in range(n)],
                [np.frombuffer(r, dtype=np.uint8) for r in rs]]


class DaliStreamLoader:
    """Stream mode through DALI: the same batches (samples, boxes, flips, orders) as the stream's torch path,
    decoded and resized by DALI. Iterates like :class:`~megadigpt.data.streaming.StreamLoader` (whose cursors it
    updates as batches are handed on)."""

    def __init__(self, stream_loader, device: torch.device, num_threads: int = 2):
        self.inner = stream_loader
        self.sizes = stream_loader.dataset.sizes
        self.interp_name = stream_loader.dataset.interp_name
        self.device = resolve_device(device)  # "cuda" without an index: the current device, not a CPU pipeline
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self.num_threads = num_threads
        self.failed_batches = 0  # batches DALI failed on, decoded by Pillow instead
        self.max_consecutive_failures = 5

    def __len__(self):
        return len(self.inner)

    def _finish(self, b: dict, views) -> dict:
        self.inner.note(b)
        out = {k: v for k, v in b.items() if k not in ("encoded", "raw", "box", "reasons")}
        out["views"] = views
        return out

    def _pillow(self, b: dict):
        """The batch's views decoded by Pillow with its boxes, as the stream's torch path makes them."""
        ds = self.inner.dataset
        per_size = [[] for _ in self.sizes]
        for raw, (top, left, h, w, flip), valid in zip(b["raw"], b["box"], b["valid"].tolist()):
            try:
                if not valid:
                    raise ValueError("bad sample")
                img = decode_rgb(raw).crop((left, top, left + w, top + h))
                for k, s in enumerate(self.sizes):
                    v = img.resize((s, s), ds.interp)
                    if flip:
                        v = v.transpose(Image.FLIP_LEFT_RIGHT)
                    per_size[k].append(torch.from_numpy(np.asarray(v, dtype=np.uint8).copy()).permute(2, 0, 1))
            except Exception:  # noqa: BLE001 - a sample even Pillow cannot decode: zeros, as on the torch path
                for k, s in enumerate(self.sizes):
                    per_size[k].append(torch.zeros(3, s, s, dtype=torch.uint8))
        return [torch.stack(v).to(self.device) for v in per_size]

    def __iter__(self):
        n = len(self.inner)
        if not n:
            return
        batches = self.inner.raw()
        pending: list = []
        done, consecutive = 0, 0
        nviews = len(self.sizes)
        while done < n:
            pipe = None
            feed = _StreamFeed(batches, pending)
            try:
                pipe = _pipeline_graph(feed, self.sizes, self.inner.micro, self.device_id,
                                       self.num_threads, self.interp_name)
                pipe.build()
                while done < n:
                    out = run_pipeline(pipe, self.device)
                    views = [view_to_torch(out[k], self.device) for k in range(nviews)]
                    b = pending.pop(0)
                    yield self._finish(b, views)
                    done += 1
                    consecutive = 0
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - a DALI failure: what it held goes the Pillow way
                if feed.error is not None:
                    raise feed.error from None
                consecutive += 1
                if consecutive >= self.max_consecutive_failures:
                    raise RuntimeError(f"the DALI pipeline failed {consecutive} times in a row on stream batches "
                                       f"(set data.loader=torch to continue without DALI): {e}") from e
                first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("DALI failed on a stream batch (%s); decoding the %d batches it held with Pillow",
                            first_line, len(pending))
                while pending and done < n:
                    b = pending.pop(0)
                    self.failed_batches += 1
                    yield self._finish(b, self._pillow(b))
                    done += 1
            finally:
                if pipe is not None:
                    pipe._shutdown()
                    del pipe
