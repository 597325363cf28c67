"""One TransferQueue get and one put per trainer stage: CalibRL's fields ride along with verl's own calls.

Why this exists (the one place that wraps verl's stage I/O): verl 0.9.1's V1 stages
(``PPOTrainerBase._compute_old_log_prob`` and ``_compute_advantage`` in ``verl/trainer/ppo/v1/trainer_base.py``)
read the step's rows from TransferQueue, compute, and write their results back inside one method, with no hook
in between. CalibRL needs the same rows (plus ``extra_fields``) and writes fields of its own. Doing that with a
get and a put of its own after verl's stage cost 4-10 ms per call, about 0.03 s of a 1.2 s tiny step
(``benchmarks/bench_step.py``); merging them by copying verl's stage bodies is what this project never does.

So for the duration of one stage call, ``stage_io`` replaces the ``tq`` name of verl's trainer module with a
``StageIO`` that passes every call through to TransferQueue and, for the stage's own keys only:

* widens verl's first get by ``extra_fields`` (verl gets back exactly the fields it asked for; the whole
  result is kept in ``StageIO.got``) and calls ``on_get(got)`` once the rows are in;
* calls ``on_put(fields)`` on verl's put before it is sent, so CalibRL's fields are written by the same call
  (``on_put`` returns the fields to write: verl's, plus or amended by CalibRL's).

Calls for other keys or partitions (another thread, a later stage) go to TransferQueue untouched, and the module
name is restored when the stage returns or raises.

Where verl's stage does something else (a get without ``select_fields``, a put before any get, a stage that
returns without its get or its put), CalibRL's fields would silently go unread or unwritten: that is a
``VerlDriftError`` naming what verl did, the verl release installed and the one these wrappers were written
against. ``check_verl_version`` refuses another verl release up front (``main_calibrl.prepare_config``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from calibrl_verl import VERL_VERSION

if TYPE_CHECKING:  # tensordict (torch) and verl's trainer load only when a stage runs: the driver checks stay light
    from tensordict import TensorDict

GetHook = Callable[["TensorDict"], None]
PutHook = Callable[["TensorDict"], "TensorDict"]


def installed_verl_version() -> str:
    """The installed verl's version string (package metadata; the module's ``__version__`` without one)."""
    try:
        return metadata.version("verl")
    except metadata.PackageNotFoundError:
        import verl

        return str(getattr(verl, "__version__", "unknown"))


def _versions_note() -> str:
    return (f"verl {installed_verl_version()} is installed; calibrl_verl's stage wrappers "
            f"(calibrl_verl/integration/stage_io.py) were written against verl {VERL_VERSION}: "
            f"pip install 'verl=={VERL_VERSION}'")


class VerlDriftError(RuntimeError):
    """verl read or wrote a stage's data differently from the release calibrl_verl's wrappers were written against.

    The message says what verl did, then which verl is installed and which one the wrappers expect.
    """

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(f"{what}. {_versions_note()}{hint}")


_ALLOW_HINT = (", or set calibrl.allow_verl_mismatch=true to start anyway (a stage that reads or writes "
               "TransferQueue differently then stops with VerlDriftError)")


def _release(version: str) -> tuple[int, ...] | None:
    """``X.Y.Z`` of a final release (post releases and local builds such as ``+cu124`` too); None otherwise."""
    match = re.fullmatch(r"v?(\d+(?:\.\d+)*)(?:\.post\d+)?(?:\+[\w.]+)?", version.strip())
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def check_verl_version(allow_mismatch: bool) -> str | None:
    """Refuse a verl release other than ``VERL_VERSION`` (its pre-releases included); with ``allow_mismatch``
    return the warning to print instead. None when the installed release is the one the wrappers target."""
    installed = installed_verl_version()
    if _release(installed) == _release(VERL_VERSION):
        return None
    if not allow_mismatch:
        raise VerlDriftError("verl's release differs from the one calibrl_verl was written for", _ALLOW_HINT)
    return (f"{_versions_note()}; starting anyway (calibrl.allow_verl_mismatch=true): a stage that reads or writes "
            "TransferQueue differently stops with VerlDriftError")


class StageIO:
    """Stands in for the ``transfer_queue`` module inside one verl stage call (see the module docstring)."""

    def __init__(self, real: Any, keys: Sequence[str], partition_id: str, extra_get: Sequence[str] = (),
                 on_get: GetHook | None = None, on_put: PutHook | None = None) -> None:
        self._real = real
        self._keys = list(keys)
        self._partition_id = partition_id
        self._extra_get = list(extra_get)
        self._on_get, self._on_put = on_get, on_put
        self.got: TensorDict | None = None
        self.put: TensorDict | None = None

    def __getattr__(self, name: str) -> Any:  # everything else is TransferQueue's own
        return getattr(self._real, name)

    def _ours(self, keys: Any, partition_id: str) -> bool:
        return partition_id == self._partition_id and list(keys) == self._keys

    def _where(self) -> str:
        return f"the stage's {len(self._keys)} keys in partition {self._partition_id!r}"

    def kv_batch_get(self, keys: Any, partition_id: str, select_fields: Any = None, **kwargs: Any) -> TensorDict:
        if self.got is not None or not self._ours(keys, partition_id):
            return self._real.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=select_fields, **kwargs)
        if select_fields is None:
            raise VerlDriftError(f"verl's stage made a kv_batch_get of {self._where()} without select_fields, so "
                                 "stage_io has no selection to widen with CalibRL's fields")
        asked = [select_fields] if isinstance(select_fields, str) else list(select_fields)
        wanted = asked + [f for f in self._extra_get if f not in asked]
        self.got = self._real.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=wanted, **kwargs)
        if self._on_get is not None:
            self._on_get(self.got)
        # a new TensorDict over the same tensors: verl pops and adds keys on what it gets, never on ``got``
        return self.got.select(*[f for f in asked if f in self.got.keys()])

    def kv_batch_put(self, keys: Any, partition_id: str, fields: TensorDict | None = None, **kwargs: Any) -> Any:
        if self.put is None and fields is not None and self._ours(keys, partition_id):
            if self.got is None:  # CalibRL's put hook needs the rows verl's get brought in
                raise VerlDriftError(f"verl's stage made a kv_batch_put of {self._where()} before any selected "
                                     "kv_batch_get of them, so CalibRL's fields were never read")
            fields = self._on_put(fields) if self._on_put is not None else fields
            self.put = fields
        return self._real.kv_batch_put(keys=keys, partition_id=partition_id, fields=fields, **kwargs)

    def check_done(self) -> None:
        """After the stage returned: its selected get and its put of the stage's keys both came through here."""
        if self.got is None:
            raise VerlDriftError(f"the stage returned without a selected kv_batch_get of its {len(self._keys)} keys "
                                 f"in partition {self._partition_id!r}: verl read the step's rows some other way")
        if self.put is None:
            raise VerlDriftError(f"the stage returned without a kv_batch_put of its {len(self._keys)} keys in "
                                 f"partition {self._partition_id!r}: verl wrote its results some other way, so "
                                 "CalibRL's fields were not written")


@contextlib.contextmanager
def stage_io(keys: Sequence[str], partition_id: str, extra_get: Sequence[str] = (), on_get: GetHook | None = None,
             on_put: PutHook | None = None) -> Iterator[StageIO]:
    """Route verl's trainer-module TransferQueue calls through a ``StageIO`` while the ``with`` body runs.

    Raises ``VerlDriftError`` when the body returns without the stage's get or put having come through.
    """
    from verl.trainer.ppo.v1 import trainer_base  # here: the module-level helpers serve the driver, before verl loads

    real = trainer_base.tq
    io = StageIO(real, keys, partition_id, extra_get, on_get, on_put)
    trainer_base.tq = io
    try:
        yield io
    finally:
        trainer_base.tq = real
    io.check_done()  # only once the body returned: an exception of its own goes out as it was
