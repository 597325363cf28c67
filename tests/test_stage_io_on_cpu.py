"""integration/stage_io.py: one interception of a verl stage's TransferQueue get and put, and a named error
(``VerlDriftError``) wherever verl's stage reads or writes differently from the verl release it was written for.

The transfer-queue module is stood in for by ``FakeTQ`` (StageIO is our own class: it only forwards calls); the
name swap is made on verl's real ``verl.trainer.ppo.v1.trainer_base`` module, where verl's stages look ``tq`` up.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from verl.trainer.ppo.v1 import trainer_base

from calibrl_verl.integration import stage_io as stage_io_module
from calibrl_verl.integration.stage_io import VerlDriftError, check_verl_version, stage_io

KEYS = ["u0", "u1"]
PART = "train"


class FakeTQ:
    """A transfer queue with two rows per partition: answers selected gets, records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.rows = TensorDict({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0]),
                                "extra": torch.tensor([5.0, 6.0])}, batch_size=2)

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        self.calls.append(("get", list(keys), partition_id, select_fields))
        return self.rows.clone() if select_fields is None else self.rows.select(*select_fields).clone()

    def kv_batch_put(self, keys, partition_id, fields=None, **kwargs):
        self.calls.append(("put", list(keys), partition_id, sorted(fields.keys()) if fields is not None else None))
        return "meta"

    def kv_list(self, partition_id):
        return ["listed", partition_id]


@pytest.fixture
def fake(monkeypatch) -> FakeTQ:
    fake = FakeTQ()
    monkeypatch.setattr(trainer_base, "tq", fake)  # verl's stages call trainer_base.tq.<fn>: what stage_io swaps
    return fake


def _stage(select=("a",), put=True):
    """verl's stage body as 0.9.1 writes it: one selected get of the step's keys, one put of its results."""
    data = trainer_base.tq.kv_batch_get(keys=KEYS, partition_id=PART, select_fields=list(select))
    if put:
        trainer_base.tq.kv_batch_put(keys=KEYS, partition_id=PART, fields=TensorDict({"out": data["a"] * 10},
                                                                                     batch_size=2))
    return data


def _add_field(put: TensorDict) -> TensorDict:
    put["ours"] = put["out"] + 1
    return put


def test_other_keys_partitions_and_attributes_pass_through_untouched(fake):
    seen = []
    with stage_io(KEYS, PART, extra_get=["extra"], on_get=seen.append, on_put=_add_field) as io:
        assert trainer_base.tq is io
        other = trainer_base.tq.kv_batch_get(keys=["u9"], partition_id=PART, select_fields=["a"])
        val = trainer_base.tq.kv_batch_get(keys=KEYS, partition_id="val", select_fields=["b"])
        trainer_base.tq.kv_batch_put(keys=KEYS, partition_id="val", fields=TensorDict({"out": val["b"]},
                                                                                      batch_size=2))
        assert trainer_base.tq.kv_list("train") == ["listed", "train"]  # any other function: TransferQueue's own
        assert io.got is None and io.put is None and seen == []
        _stage()
    assert sorted(other.keys()) == ["a"] and sorted(val.keys()) == ["b"]
    assert fake.calls[:3] == [("get", ["u9"], PART, ["a"]), ("get", KEYS, "val", ["b"]),
                              ("put", KEYS, "val", ["out"])]
    assert trainer_base.tq is fake


def test_exactly_one_get_and_one_put_are_intercepted(fake):
    seen = []
    with stage_io(KEYS, PART, extra_get=["extra", "a"], on_get=seen.append, on_put=_add_field) as io:
        first = _stage(select=("a",))
        second = trainer_base.tq.kv_batch_get(keys=KEYS, partition_id=PART, select_fields=["b"])
        trainer_base.tq.kv_batch_put(keys=KEYS, partition_id=PART, fields=TensorDict({"out": second["b"]},
                                                                                     batch_size=2))
    # the first get asked TransferQueue for verl's fields plus the extras (each once); verl got only its own
    assert fake.calls == [("get", KEYS, PART, ["a", "extra"]), ("put", KEYS, PART, ["ours", "out"]),
                          ("get", KEYS, PART, ["b"]), ("put", KEYS, PART, ["out"])]
    assert sorted(first.keys()) == ["a"] and sorted(second.keys()) == ["b"]
    assert len(seen) == 1 and sorted(seen[0].keys()) == ["a", "extra"] and io.got is seen[0]
    assert torch.equal(io.got["extra"], torch.tensor([5.0, 6.0]))
    assert torch.equal(io.put["ours"], torch.tensor([11.0, 21.0]))  # on_put's fields went out in verl's put
    first["new"] = first["a"]  # verl adds keys to what it got: never to what CalibRL kept
    assert "new" not in io.got.keys()


def test_the_module_name_is_restored_when_the_stage_raises(fake):
    with pytest.raises(ZeroDivisionError):
        with stage_io(KEYS, PART) as io:
            assert trainer_base.tq is io
            raise ZeroDivisionError
    assert trainer_base.tq is fake
    with pytest.raises(VerlDriftError):
        with stage_io(KEYS, PART):
            trainer_base.tq.kv_batch_get(keys=KEYS, partition_id=PART)  # a drift error restores it too
    assert trainer_base.tq is fake


def _drift_message(match: str):
    """A VerlDriftError names what verl did, the verl installed here and the release the wrappers target."""
    installed = stage_io_module.installed_verl_version()
    return pytest.raises(VerlDriftError, match=rf"{match}.*verl {installed} is installed.*written against verl 0\.9\.1")


def test_a_get_without_select_fields_is_a_named_error(fake):
    with _drift_message(r"kv_batch_get of the stage's 2 keys in partition 'train' without select_fields"):
        with stage_io(KEYS, PART, extra_get=["extra"]):
            trainer_base.tq.kv_batch_get(keys=KEYS, partition_id=PART)
    assert fake.calls == []  # refused before TransferQueue was asked
    assert issubclass(VerlDriftError, RuntimeError)


def test_a_stage_that_never_puts_is_a_named_error(fake):
    with _drift_message(r"the stage returned without a kv_batch_put of its 2 keys"):
        with stage_io(KEYS, PART):
            _stage(put=False)
    assert trainer_base.tq is fake


def test_a_put_before_any_get_is_a_named_error(fake):
    with _drift_message(r"kv_batch_put of the stage's 2 keys .* before any selected kv_batch_get"):
        with stage_io(KEYS, PART, on_put=_add_field):
            trainer_base.tq.kv_batch_put(keys=KEYS, partition_id=PART, fields=TensorDict({"out": torch.ones(2)},
                                                                                         batch_size=2))
    assert ("put", KEYS, PART, ["out"]) not in fake.calls  # refused before it was written
    with _drift_message(r"the stage returned without a selected kv_batch_get of its 2 keys"):
        with stage_io(KEYS, PART):
            pass  # a stage that read its rows some other way and wrote nothing


@pytest.mark.parametrize("installed,ok", [("0.9.1", True), ("0.9.1+cu124", True), ("0.9.1.post1", True),
                                          ("0.9.2", False), ("0.10.0", False), ("0.9.1rc1", False),
                                          ("0.9.1.dev0", False), ("0.9.0", False)])
def test_the_installed_verl_release_must_be_the_one_the_wrappers_target(monkeypatch, installed, ok):
    monkeypatch.setattr(stage_io_module, "installed_verl_version", lambda: installed)
    if ok:
        assert check_verl_version(allow_mismatch=False) is None
        return
    with pytest.raises(VerlDriftError, match=rf"verl {installed} is installed.*written against verl 0\.9\.1.*"
                                             r"calibrl.allow_verl_mismatch=true"):
        check_verl_version(allow_mismatch=False)
    warning = check_verl_version(allow_mismatch=True)
    assert f"verl {installed} is installed" in warning and "calibrl.allow_verl_mismatch=true" in warning


def test_this_environment_has_the_verl_the_wrappers_target():
    from importlib.metadata import version

    assert stage_io_module.installed_verl_version() == version("verl") == "0.9.1"
    assert check_verl_version(allow_mismatch=False) is None
