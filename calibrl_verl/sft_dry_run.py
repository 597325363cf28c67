"""The dry run of recipes/run_sft_*.sh: compose verl's SFT config with the script's overrides, check it, launch nothing.

    python -m calibrl_verl.sft_dry_run [key=value ...]

verl 0.9.1's SFT trainer (``python -m verl.trainer.sft_trainer``, run under torchrun) is a Hydra app whose config
is ``verl/trainer/config/sft_trainer_engine.yaml``. This composes that same config with the same overrides (Hydra's
compose API, so an unknown key or a bad value fails here as it would at launch), prints it as YAML on stdout, and
checks what would otherwise fail only after the model is loaded on every GPU:

- every data file exists and has the messages column (``data.messages_key``) that verl's ``MultiTurnSFTDataset``
  reads (a missing file is listed, not fatal: the dry run is also for writing a command before the data exists);
- the global batch (``data.train_batch_size``) splits over the GPUs (verl divides it by the data-parallel size);
- with dynamic batching, a micro batch's token budget holds the longest sequence (``data.max_token_len_per_gpu``
  >= ``data.max_length``);
- the optimiser, engine and checkpoint sections convert to verl's dataclasses (their own validation).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

# the same line as main_calibrl --dry-run (tests/test_docs_commands_on_cpu.py looks for it)
PASSED = "[calibrl] dry run: the config passed every check; nothing launched"


def compose(overrides: Sequence[str]):
    """verl's sft_trainer_engine config with ``overrides`` (Hydra compose; raises on an unknown key)."""
    import verl.trainer
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = str(Path(verl.trainer.__file__).parent / "config")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(config_name="sft_trainer_engine", overrides=list(overrides))


def _files(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value]


def check(config) -> tuple[list[str], list[str]]:
    """(errors, missing files) of a composed SFT config."""
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    errors: list[str] = []
    missing: list[str] = []
    data = config.data
    key = data.messages_key
    for field in ("train_files", "val_files"):
        for path in _files(data[field]):
            local = os.path.expanduser(path)
            if "://" in path:
                continue
            if not os.path.isfile(local):
                missing.append(f"data.{field}: {path} (no such file)")
                continue
            columns = pq.read_schema(local).names
            if key not in columns:
                errors.append(f"data.{field}: {path} has no column {key!r} (data.messages_key; columns: "
                              f"{', '.join(columns)}); write it with python -m calibrl_verl.data.sft")
    if not _files(data.train_files):
        errors.append("data.train_files is empty")
    gpus = int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes)
    if int(data.train_batch_size) % gpus:
        errors.append(f"data.train_batch_size={data.train_batch_size} does not split over {gpus} GPUs")
    if data.use_dynamic_bsz and int(data.max_token_len_per_gpu) < int(data.max_length):
        errors.append(f"data.max_token_len_per_gpu={data.max_token_len_per_gpu} < data.max_length="
                      f"{data.max_length}: the longest sequence fits no micro batch")
    for section in ("optim", "engine", "checkpoint"):
        try:
            omega_conf_to_dataclass(config[section])
        except Exception as error:  # verl's own validation, whatever it raises
            errors.append(f"{section}: {type(error).__name__}: {error}")
    OmegaConf.resolve(config)  # interpolations (trainer.default_local_dir) resolve
    return errors, missing


def main(argv: Sequence[str] | None = None) -> int:
    from omegaconf import OmegaConf

    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in overrides):
        print(__doc__)
        return 0
    try:
        config = compose(overrides)
    except Exception as error:  # Hydra's override / composition errors
        print(f"error: verl's SFT config rejects the overrides: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    errors, missing = check(config)
    print(OmegaConf.to_yaml(config))
    for line in missing:
        print(f"[calibrl] dry run: missing {line}", file=sys.stderr)
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 1
    print(PASSED, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
