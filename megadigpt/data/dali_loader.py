"""The DALI pretraining pipeline: decoding on the GPU (``mixed``) when CUDA is there, on the CPU otherwise,
with the same code.

Sample selection is the torch path's (:class:`PretrainStream` positions): a Python source reads each sample's
bytes and its image header, draws the crop box, flip and segment order from (seed, epoch, index) exactly as the
torch path does, and hands DALI the encoded bytes plus the box. DALI decodes only the box (ROI decoding), resizes
it to each view's size (student, teacher) and flips it. So the DALI and torch paths select the same samples with
the same boxes, and differ only by their decoders and resampling filters (measured in tests/test_dali.py).

Bad data never stops the run: samples whose header does not parse, that are empty, too large, or (JPEG) lack
their end-of-image marker are replaced by a placeholder and marked invalid before DALI sees them; if DALI still
fails on a batch, that batch is produced by the torch path (which masks what it cannot decode) and the pipeline
is rebuilt from the next batch.
"""

import io
import logging
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image

from .pretrain_loader import PretrainStream, collate, random_resized_crop_box, sample_rng

log = logging.getLogger(__name__)

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit, applied to both paths


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


_PLACEHOLDER = _placeholder_jpeg()


def inspect_image(data: bytes):
    """Cheap pre-decode check: (width, height) if the bytes look decodable, else None."""
    if len(data) < 8:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            fmt = img.format
    except Exception:  # noqa: BLE001
        return None
    if w * h > MAX_PIXELS or w < 1 or h < 1:
        return None
    if fmt == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None  # truncated: no end-of-image marker
    return w, h


class _Source:
    """Batch-mode external source: iteration i (offset by ``start``) -> micro-batch i of the plan."""

    def __init__(self, stream: PretrainStream, batches: Sequence[List[int]], start: int):
        self.stream, self.batches, self.start = stream, batches, start
        self.handles = {}

    def sample(self, position: int):
        st = self.stream
        epoch, index = st.locate(position)
        s = st.samples[index]
        rng = sample_rng(st.seed, epoch, index)
        try:
            data = s.read(self.handles)
        except OSError:
            data = b""
        size = inspect_image(data)
        if size is None:
            data, box, flip, valid = _PLACEHOLDER, (0, 0, 8, 8), False, False
        else:
            w, h = size
            box = random_resized_crop_box(rng, h, w, st.scale, st.ratio)
            flip, valid = bool(st.hflip and rng.random() < 0.5), True
        order = np.random.default_rng([st.seed, epoch, index, 1]).permutation(st.num_segments)
        return (np.frombuffer(data, dtype=np.uint8), np.array(box[:2], dtype=np.int32),
                np.array(box[2:], dtype=np.int32), np.array(flip, dtype=np.int32), order.astype(np.int64),
                np.array(valid, dtype=np.int32), np.array(s.label, dtype=np.int64), np.array(index, dtype=np.int64),
                np.array(epoch, dtype=np.int64))

    def __call__(self, iteration: int):
        i = self.start + iteration
        positions = self.batches[min(i, len(self.batches) - 1)]  # DALI prefetches past the end: repeat the last
        cols = list(zip(*(self.sample(p) for p in positions)))
        return [list(c) for c in cols]


OUTPUTS = ("encoded", "crop_start", "crop_shape", "flip", "order", "valid", "label", "index", "epoch")


def build_pipeline(source: _Source, sizes: Sequence[int], batch_size: int, device_id, num_threads: int,
                   interpolation: str = "bicubic", prefetch: int = 2):
    from nvidia.dali import fn, pipeline_def, types

    interp = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[interpolation]
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch,
                  exec_dynamic=True)
    def pipe():
        enc, start, shape, flip, order, valid, label, index, epoch = fn.external_source(
            source=source, num_outputs=len(OUTPUTS), batch=True, parallel=False)
        img = fn.decoders.image_slice(enc, start, shape, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                      axis_names="HW", normalized_anchor=False, normalized_shape=False)
        views = []
        for s in sizes:
            v = fn.resize(img, resize_x=s, resize_y=s, interp_type=interp, antialias=True)
            views.append(fn.crop_mirror_normalize(v, mirror=flip, dtype=types.UINT8, output_layout="CHW",
                                                  mean=[0.0], std=[1.0]))
        return (*views, order, valid, label, index, epoch)

    return pipe()


def _view_to_torch(tl, device, dtype=torch.uint8) -> torch.Tensor:
    """An image batch: GPU outputs are copied device-to-device, CPU outputs wrapped without a copy."""
    t = tl.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=dtype, device=device)
        return feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    return torch.from_numpy(np.array(t))


def _meta_to_torch(tl) -> torch.Tensor:
    return torch.from_numpy(np.array(tl.as_tensor()))


class DaliPretrainLoader:
    """Iterates this rank's micro-batches like the torch DataLoader does, as the same dicts."""

    def __init__(self, stream: PretrainStream, batch_sampler, device: torch.device, num_threads: int = 2):
        self.stream, self.sampler = stream, batch_sampler
        self.batches = batch_sampler  # indexable: micro-batch i -> its stream positions
        self.device = device
        self.device_id = device.index if device.type == "cuda" else None
        self.num_threads = num_threads
        self.failed_batches = 0
        self.max_consecutive_failures = 5

    def __len__(self):
        return len(self.batches)

    def _pipeline(self, start: int):
        p = build_pipeline(_Source(self.stream, self.batches, start), self.stream.sizes, self.sampler.m,
                           self.device_id, self.num_threads, self.stream.interp_name)
        p.build()
        return p

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
                    out = pipe.run()
                    views = [_view_to_torch(out[k], self.device) for k in range(nviews)]
                    order, valid, label, index, epoch = [_meta_to_torch(out[k]) for k in range(nviews, len(out))]
                    yield {"views": views, "order": order.long(), "valid": valid.bool().reshape(-1),
                           "label": label.reshape(-1), "index": index.reshape(-1), "epoch": epoch.reshape(-1)}
                    i += 1
            except Exception as e:  # noqa: BLE001 - a decode error invalidates the DALI pipeline, not the run
                consecutive = consecutive + 1 if last_failed == i - 1 else 1
                last_failed = i
                if consecutive >= self.max_consecutive_failures:
                    raise RuntimeError(f"the DALI pipeline failed on {consecutive} micro-batches in a row; this is not "
                                       f"bad data (set data.loader=torch to continue without DALI): {e}") from e
                log.warning("DALI failed on micro-batch %d (%s); producing it with the torch path", i,
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.failed_batches += 1
                yield self._torch_batch(i)
                i += 1
            finally:
                # stop DALI's worker threads now: left to interpreter shutdown, they held the exit of an
                # mpirun job for over a minute (measured)
                pipe._shutdown()
                del pipe
