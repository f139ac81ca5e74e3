"""Reading torch files without running their code: DeepSpeed checkpoint folders included.

A ``torch.save`` file is a pickle, and unpickling can call any importable function (``os.system`` ...). Run
directories are what people share on clusters, so megadigpt never unpickles with ``weights_only=False``:

- :func:`load`: ``torch.load(weights_only=True)`` under ``torch.serialization.safe_globals(ALLOWED)``. torch's
  restricted unpickler builds only tensors, containers and plain values, plus the few classes listed here; any
  other global (a function, an unknown class) is refused before anything is called.
- :func:`deepspeed_loads`: a context manager under which every ``torch.load`` is :func:`load`. DeepSpeed reads its
  own files with ``torch.load(..., weights_only=False)`` in some twenty places (its checkpoint engine,
  ``zero_to_fp32``, the ZeRO-3 universal loader, ``ds_to_universal``), several of which bypass the pluggable
  checkpoint engine, so a safe checkpoint engine would leave the universal paths unsafe. Every one of them looks
  ``torch.load`` up at call time, so replacing that attribute for the duration of the load covers them all (and
  whatever a later DeepSpeed adds the same way) without copying any of DeepSpeed's code. The patch is
  process-wide while the block runs; megadigpt loads checkpoints from one thread, and the previous function is
  restored on exit, exceptions included.
- :func:`check_folder`: a static scan (``torch.serialization.get_unsafe_globals_in_checkpoint``: pickle opcodes
  are read, nothing is executed) of every ``.pt`` file of a checkpoint tag. Every rank runs it before DeepSpeed
  loads, so a payload in one rank's shard stops every rank with the same one-line error, instead of one rank
  failing while the others wait in a collective.

``ALLOWED`` is exactly what DeepSpeed 0.19 writes, found by saving real checkpoints (ZeRO 0/1/2/3, fp32 and bf16,
1 and 2 ranks, and their universal conversions) and listing the globals ``weights_only`` refuses: model-states
files hold none; optimizer-states files (and a universal folder's ``zero/optimizer_state.pt``) hold the ZeRO
optimizer's loss scaler object and its ``zero_stage`` enum, and ZeRO-1/2 ones the parameter
``fragment_address`` records. fp16 (GPU only, not reproducible on CPU) stores a ``DynamicLossScaler`` in place of
the static ``LossScaler`` (``stage_1_and_2.py`` / ``stage3.py``: ``state_dict[LOSS_SCALER] = self.loss_scaler``).
All four are plain data holders rebuilt by ``__new__`` + ``__dict__`` update (the enum by value); allowing them
lets no function be called.
"""

import contextlib
import pickle
import re
from pathlib import Path
from typing import List

import torch

from ..config import ConfigError

_torch_load = torch.serialization.load  # the real loader; only the ``torch.load`` attribute is ever patched


def allowed_globals() -> List[type]:
    """The non-tensor types DeepSpeed's checkpoint files hold (see the module docstring for how they were found)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def refused(path, what: str) -> ConfigError:
    return ConfigError(f"{path}: refused to load: it holds code or objects that are not plain tensors ({what})")


def _name(f) -> str:
    return str(f) if isinstance(f, (str, Path)) else str(getattr(f, "name", f))


def _why(msg: str) -> str:
    """The refused global (or the unpickler's reason) out of torch's multi-paragraph message."""
    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"WeightsUnpickler error: ([^\n]+)", msg)
    if m:
        return m.group(1)
    lines = [l for l in msg.splitlines()[1:] if l.strip() and not l.startswith("Check the documentation")]
    return lines[0] if lines else msg.splitlines()[0]


def load(f, map_location="cpu", extra_globals=(), mmap=None, deepspeed_types: bool = True):
    """``torch.load`` that can only build tensors, containers, plain values, ``extra_globals`` and (with
    ``deepspeed_types``, for DeepSpeed's files) :func:`allowed_globals`. A refused or unreadable file is a
    :class:`ConfigError` naming it."""
    try:
        return _restricted_load(f, map_location, mmap, deepspeed_types, extra_globals)
    except ConfigError:
        raise
    except (RuntimeError, EOFError, ValueError, OSError, KeyError) as e:  # truncated, not a torch file, ...
        first = (str(e).splitlines() or [""])[0]
        raise ConfigError(f"{_name(f)}: not a loadable checkpoint ({type(e).__name__}: {first})") from None


def _restricted_load(f, map_location, mmap, deepspeed_types=True, extra_globals=()):
    """The weights_only load; a refusal becomes the one-line ConfigError, other errors pass as they are."""
    allowed = (allowed_globals() if deepspeed_types else []) + list(extra_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return _torch_load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refused(_name(f), _why(str(e))) from None


def _patched_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
    # the caller's weights_only=False and pickle_module are ignored on purpose: that is the point of the patch.
    # Other errors (a missing optional file, ...) reach DeepSpeed unchanged, as from torch.load itself.
    return _restricted_load(f, map_location, mmap)


@contextlib.contextmanager
def deepspeed_loads():
    """Every ``torch.load`` inside the block (DeepSpeed's included) is :func:`load`."""
    previous = torch.load
    torch.load = _patched_load
    try:
        yield
    finally:
        torch.load = previous


def check_folder(folder) -> None:
    """Refuse (ConfigError naming the file) any ``.pt`` file under ``folder`` whose pickle names a global outside
    torch's safe set and :func:`allowed_globals`, or opcodes the restricted unpickler refuses. Static: nothing in
    the files runs. Files it cannot scan (legacy non-zip format, damaged) are left to :func:`load`, which refuses
    or reports them in turn. A ``.pt`` name that is a symbolic link or not a regular file (a FIFO would block the
    scan, a device would be read without end) is refused too: checkpoint files are read only as regular files."""
    import os
    import stat

    with torch.serialization.safe_globals(allowed_globals()):
        for f in sorted(Path(folder).rglob("*.pt")):
            mode = os.lstat(f).st_mode
            if not stat.S_ISREG(mode):
                if stat.S_ISDIR(mode):
                    continue
                raise ConfigError(f"{f}: refused to load: it is a symbolic link or not a regular file; megadigpt "
                                  f"reads checkpoint files only as regular files (replace it by the file itself)")
            try:
                bad = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
            except pickle.UnpicklingError as e:  # opcodes the restricted unpickler refuses as well
                raise refused(f, _why(str(e))) from None
            except Exception:  # noqa: BLE001 - not a zip (legacy format) / damaged: the safe load reports it
                continue
            if bad:
                raise refused(f, ", ".join(bad))
