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
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tensordict import TensorDict
from verl.trainer.ppo.v1 import trainer_base

GetHook = Callable[[TensorDict], None]
PutHook = Callable[[TensorDict], TensorDict]


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

    def kv_batch_get(self, keys: Any, partition_id: str, select_fields: Any = None) -> TensorDict:
        if self.got is not None or select_fields is None or not self._ours(keys, partition_id):
            return self._real.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=select_fields)
        asked = [select_fields] if isinstance(select_fields, str) else list(select_fields)
        wanted = asked + [f for f in self._extra_get if f not in asked]
        self.got = self._real.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=wanted)
        if self._on_get is not None:
            self._on_get(self.got)
        # a new TensorDict over the same tensors: verl pops and adds keys on what it gets, never on ``got``
        return self.got.select(*[f for f in asked if f in self.got.keys()])

    def kv_batch_put(self, keys: Any, partition_id: str, fields: TensorDict | None = None, **kwargs: Any) -> Any:
        if self.put is None and fields is not None and self._ours(keys, partition_id):
            fields = self._on_put(fields) if self._on_put is not None else fields
            self.put = fields
        return self._real.kv_batch_put(keys=keys, partition_id=partition_id, fields=fields, **kwargs)


@contextlib.contextmanager
def stage_io(keys: Sequence[str], partition_id: str, extra_get: Sequence[str] = (), on_get: GetHook | None = None,
             on_put: PutHook | None = None) -> Iterator[StageIO]:
    """Route verl's trainer-module TransferQueue calls through a ``StageIO`` while the ``with`` body runs."""
    real = trainer_base.tq
    io = StageIO(real, keys, partition_id, extra_get, on_get, on_put)
    trainer_base.tq = io
    try:
        yield io
    finally:
        trainer_base.tq = real
