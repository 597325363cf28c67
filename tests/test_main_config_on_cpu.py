"""calibrl_trainer.yaml composed on verl's ppo_trainer, and what main_calibrl derives and checks before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from calibrl_verl.config import CalibRLConfig, CalibRLConfigError
from calibrl_verl.main_calibrl import prepare_config


def _compose(*overrides: str):
    with initialize_config_module("calibrl_verl.config", version_base=None):
        return compose("calibrl_trainer", overrides=list(overrides))


def test_yaml_calibrl_section_is_the_dataclass_defaults():
    cfg = _compose()
    assert CalibRLConfig.from_config(cfg.calibrl) == CalibRLConfig()
    # verl's own sections are there, composed underneath
    assert cfg.actor_rollout_ref.actor.strategy and cfg.data.max_response_length > 0
    assert cfg.reward.custom_reward_function.path == "pkg://calibrl_verl.reward"


@pytest.mark.parametrize("mode,estimator,loss", [("calibrl", "calibrl", "calibrl"), ("grpo", "grpo", "vanilla"),
                                                 ("luffy", "calibrl", "luffy"), ("rlplus", "calibrl", "rlplus")])
def test_loss_mode_selects_estimator_and_policy_loss(mode, estimator, loss):
    cfg = _compose(f"calibrl.loss_mode={mode}")
    prepare_config(cfg)
    assert cfg.algorithm.adv_estimator == estimator
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == loss
    assert cfg.trainer.v1.trainer_mode == "calibrl"
    assert os.path.isfile(cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path)
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "calibrl_agent"


def test_hydra_overrides_reach_the_validated_section_and_verl_keys():
    cfg = _compose("calibrl.alpha=0.3", "calibrl.pass_rate_range=[0.1,0.9]", "calibrl.norm_adv_by_std=true")
    got = prepare_config(cfg)
    assert got.alpha == 0.3 and got.pass_rate_range == (0.1, 0.9)
    assert cfg.algorithm.norm_adv_by_std_in_grpo is True  # one switch for both


def test_bad_values_stop_before_anything_starts():
    with pytest.raises(CalibRLConfigError, match="calibrl.alpha"):
        prepare_config(_compose("calibrl.alpha=2"))
    with pytest.raises(CalibRLConfigError, match=r"calibrl.n_onpolicy=0 must be an integer >= 1"):
        prepare_config(_compose("calibrl.n_onpolicy=0"))
    with pytest.raises(CalibRLConfigError, match=r"actor_rollout_ref.rollout.n=1 disagrees"):
        prepare_config(_compose("actor_rollout_ref.rollout.n=1"))
    with pytest.raises(CalibRLConfigError, match="warmup_grpo_steps=5 >= the run's 5"):
        prepare_config(_compose("calibrl.warmup_grpo_steps=5", "trainer.total_training_steps=5"))


@pytest.mark.parametrize("mode", ["calibrl", "luffy", "rlplus"])
def test_rollout_correction_bypass_mode_is_refused_where_expert_old_log_probs_are_needed(mode):
    cfg = _compose(f"calibrl.loss_mode={mode}", "algorithm.rollout_correction.bypass_mode=true")
    with pytest.raises(CalibRLConfigError, match=r"algorithm.rollout_correction.bypass_mode=true cannot run "
                                                 rf"calibrl.loss_mode='{mode}'.*bypass_mode=false"):
        prepare_config(cfg)
    grpo = _compose("calibrl.loss_mode=grpo", "calibrl.n_onpolicy=4",
                    "algorithm.rollout_correction.bypass_mode=true")
    prepare_config(grpo)  # no expert rows: verl's own bypass mode stays available to the GRPO baseline
    assert grpo.algorithm.adv_estimator == "grpo"


# rollout.n follows from calibrl.n_onpolicy: on-policy samples + expert rows (calibrl.experts_per_group, none
# for grpo). Expected values by hand: (overrides, rollout.n).
ROLLOUT_N = [
    ([], 11), (["calibrl.loss_mode=grpo"], 10), (["calibrl.loss_mode=luffy"], 11), (["calibrl.loss_mode=rlplus"], 11),
    (["calibrl.n_onpolicy=4"], 5), (["calibrl.n_onpolicy=4", "calibrl.loss_mode=grpo"], 4),
    (["calibrl.n_onpolicy=4", "calibrl.experts_per_group=2", "calibrl.loss_mode=luffy"], 6),
    (["calibrl.n_onpolicy=4", "calibrl.experts_per_group=2", "calibrl.loss_mode=grpo"], 4),
    (["calibrl.n_onpolicy=1", "calibrl.experts_per_group=0", "calibrl.loss_mode=grpo"], 1),
]


@pytest.mark.parametrize("overrides,n", ROLLOUT_N)
def test_rollout_n_is_the_on_policy_count_plus_the_mode_s_expert_rows(overrides, n):
    cfg = _compose(*overrides)
    assert OmegaConf.is_interpolation(cfg.actor_rollout_ref.rollout, "n")  # derived by the calibrl_rollout_n resolver
    assert cfg.actor_rollout_ref.rollout.n == n
    prepare_config(cfg)
    # a plain int from here on: verl's TaskRunner resolves the config in a process that may lack the resolver
    assert OmegaConf.to_container(cfg.actor_rollout_ref.rollout)["n"] == n
    assert "calibrl_rollout_n" not in OmegaConf.to_yaml(cfg)


def test_grpo_on_a_calibrl_config_samples_calibrl_s_on_policy_rows():
    """The baseline's budget: calibrl.loss_mode=grpo alone gives 10 on-policy rows, as CalibRL samples 10 + 1."""
    cfg = _compose("calibrl.loss_mode=grpo")
    prepare_config(cfg)
    assert cfg.actor_rollout_ref.rollout.n == 10


@pytest.mark.parametrize("overrides,n", [(["calibrl.loss_mode=grpo", "actor_rollout_ref.rollout.n=10"], 10),
                                         (["actor_rollout_ref.rollout.n=11"], 11),
                                         (["calibrl.n_onpolicy=4", "actor_rollout_ref.rollout.n=5"], 5)])
def test_an_explicit_rollout_n_that_agrees_is_accepted(overrides, n):
    cfg = _compose(*overrides)
    prepare_config(cfg)
    assert cfg.actor_rollout_ref.rollout.n == n


def test_an_explicit_rollout_n_that_disagrees_is_refused_naming_both_keys():
    with pytest.raises(CalibRLConfigError) as err:
        prepare_config(_compose("calibrl.loss_mode=grpo", "actor_rollout_ref.rollout.n=11"))
    assert str(err.value) == (
        "actor_rollout_ref.rollout.n=11 disagrees with calibrl.n_onpolicy=10 on-policy samples + 0 expert rows "
        "(calibrl.loss_mode='grpo' adds none) = 10: rollout.n follows from calibrl.n_onpolicy; drop the "
        "actor_rollout_ref.rollout.n override, or set calibrl.n_onpolicy=11 for 11 on-policy samples")
    with pytest.raises(CalibRLConfigError) as err:
        prepare_config(_compose("actor_rollout_ref.rollout.n=5"))
    assert str(err.value) == (
        "actor_rollout_ref.rollout.n=5 disagrees with calibrl.n_onpolicy=10 on-policy samples + 1 expert rows "
        "(calibrl.experts_per_group=1) = 11: rollout.n follows from calibrl.n_onpolicy; drop the "
        "actor_rollout_ref.rollout.n override, or set calibrl.n_onpolicy=4 for 4 on-policy samples")
    with pytest.raises(CalibRLConfigError, match=r"rollout.n=1 disagrees .* = 11: rollout.n follows from "
                                                 r"calibrl.n_onpolicy; drop the actor_rollout_ref.rollout.n override$"):
        prepare_config(_compose("actor_rollout_ref.rollout.n=1"))  # no on-policy count would give 1


def test_a_verl_release_other_than_the_wrappers_is_refused_unless_allowed(monkeypatch, capsys):
    from calibrl_verl.integration import stage_io
    from calibrl_verl.integration.stage_io import VerlDriftError

    monkeypatch.setattr(stage_io, "installed_verl_version", lambda: "0.10.0")
    with pytest.raises(VerlDriftError, match=r"verl 0.10.0 is installed.*written against verl 0.9.1.*pip install "
                                             r"'verl==0.9.1'.*calibrl.allow_verl_mismatch=true"):
        prepare_config(_compose())
    cfg = _compose("calibrl.allow_verl_mismatch=true")
    assert prepare_config(cfg).allow_verl_mismatch is True
    assert "[calibrl] warning: verl 0.10.0 is installed" in capsys.readouterr().err
    monkeypatch.setattr(stage_io, "installed_verl_version", lambda: "0.9.1")
    prepare_config(_compose())
    assert capsys.readouterr().err == ""


def test_a_verl_release_mismatch_stops_the_launch_with_its_message(monkeypatch, tmp_path):
    import calibrl_verl.main_calibrl as entry
    from calibrl_verl.integration import stage_io

    monkeypatch.setattr(stage_io, "installed_verl_version", lambda: "0.10.0")
    monkeypatch.setattr(sys, "argv", ["main_calibrl"])
    monkeypatch.setattr(entry, "_dry_run", False)  # restored after the test: cli() sets it
    from calibrl_verl.config import resolvers

    monkeypatch.setattr(resolvers, "_recipes_dir", None)  # restored too: cli() records the --config-dir
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        entry.cli(["--dry-run"])
    assert str(exit_.value).startswith("error: verl's release differs") and "verl 0.10.0 is installed" in str(
        exit_.value)  # the message, not a traceback


def test_register_env_is_forwarded_to_ray_workers():
    cfg = _compose()
    prepare_config(cfg)
    env = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert env["CALIBRL_REGISTER_TRAINER"] == "1"


def test_the_file_logger_path_reaches_ray_workers_of_a_started_cluster(monkeypatch):
    """verl's file logger runs in the TaskRunner; a cluster from `ray start` does not pass it the driver's env."""
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", "/runs/a/metrics.jsonl")
    cfg = _compose()
    prepare_config(cfg)
    env = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert env["VERL_FILE_LOGGER_PATH"] == "/runs/a/metrics.jsonl"


def test_verl_accepts_the_composed_config():
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = _compose("data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", "trainer.n_gpus_per_node=1",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1")
    prepare_config(cfg)
    assert not need_critic(cfg) and not need_reference_policy(cfg)
    validate_config(config=cfg, use_reference_policy=False, use_critic=False)


_PROBE = ("import json, verl\nfrom verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY as R\n"
          "print(json.dumps({'calibrl': R['calibrl'].__module__ if 'calibrl' in R else None}))\n")


@pytest.mark.parametrize("flag,expected", [("1", "calibrl_verl.integration.trainer"), ("0", None)])
def test_trainer_registers_through_verl_plugin_loading_only_when_asked(flag, expected):
    env = {**os.environ, "CALIBRL_REGISTER_TRAINER": flag}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["calibrl"] == expected


def test_training_files_are_validated_on_the_driver_before_ray(tmp_path, capsys):
    import pandas as pd

    from calibrl_verl.data.validate import DataValidationError
    from calibrl_verl.main_calibrl import validate_train_data
    from calibrl_verl.tiny.task import make_items, write_parquet

    good = write_parquet(make_items(4, 0, "train"), "train", tmp_path / "good.parquet")
    cfg = _compose(f"data.train_files=[{good}]")
    validate_train_data(cfg, prepare_config(cfg))
    assert "good.parquet" in capsys.readouterr().out
    frame = pd.read_parquet(good)
    frame["reward_model"] = [{"style": "rule", "ground_truth": "" if i == 2 else rm["ground_truth"]}
                             for i, rm in enumerate(frame["reward_model"])]
    bad = tmp_path / "bad.parquet"
    frame.to_parquet(bad)
    cfg = _compose(f"data.train_files=[{good},{bad}]")
    with pytest.raises(DataValidationError, match=r"bad.parquet.*row 2"):
        validate_train_data(cfg, prepare_config(cfg))


# -- start-up checks that every launch gets (they were the bash recipes' own until the recipes became YAML) --------
def _split_config(gpus: int, n: int, mini: int, batch: int = 480, nnodes: int = 1, sp: int = 1):
    return OmegaConf.create({"trainer": {"n_gpus_per_node": gpus, "nnodes": nnodes}, "data": {
        "train_batch_size": batch}, "actor_rollout_ref": {"rollout": {"n": n}, "actor": {
            "ppo_mini_batch_size": mini, "ulysses_sequence_parallel_size": sp}}})


@pytest.mark.parametrize("mode", ["calibrl", "luffy", "rlplus"])
def test_mini_batch_rows_with_the_experts_must_split_over_all_gpus(mode):
    from calibrl_verl.main_calibrl import check_batch_split, check_update_shape

    config, cfg = _split_config(8, 11, 120, nnodes=2), CalibRLConfig(loss_mode=mode)
    with pytest.raises(CalibRLConfigError) as err:
        check_batch_split(config, cfg)
    assert str(err.value) == ("the PPO mini-batch of 120 prompts x 11 rows does not split over 16 GPUs; pass "
                              "actor_rollout_ref.actor.ppo_mini_batch_size=96 (it divides data.train_batch_size=480)")
    config.actor_rollout_ref.actor.ppo_mini_batch_size = 96  # the size named passes both checks
    check_batch_split(config, cfg)
    check_update_shape(config, cfg)


def test_mini_batch_split_counts_rows_per_mode_and_data_parallel_ranks():
    from calibrl_verl.main_calibrl import check_batch_split

    check_batch_split(_split_config(8, 10, 120, nnodes=2), CalibRLConfig(loss_mode="grpo"))  # 1200 rows / 16
    check_batch_split(_split_config(8, 11, 120), CalibRLConfig())  # the paper: 1320 rows over 8 GPUs
    # sequence parallelism: rows split over the data-parallel ranks, GPUs / sp
    check_batch_split(_split_config(8, 11, 120, nnodes=2, sp=2), CalibRLConfig())
    with pytest.raises(CalibRLConfigError, match=r"over 4 data-parallel ranks \(8 GPUs / sequence parallel 2\)"):
        check_batch_split(_split_config(8, 11, 2, batch=6, sp=2), CalibRLConfig(loss_mode="luffy"))
    # CalibRL: the size named also splits the on-policy rows (n = 6: 6 rows and 5 on-policy rows over 4 GPUs)
    with pytest.raises(CalibRLConfigError, match=r"ppo_mini_batch_size=4 \(it divides data.train_batch_size=8\)"):
        check_batch_split(_split_config(4, 6, 1, batch=8), CalibRLConfig(n_onpolicy=5))
    with pytest.raises(CalibRLConfigError, match=r"choose data.train_batch_size and actor_rollout_ref.actor."
                                                 r"ppo_mini_batch_size so that prompts x 11 is divisible by 16"):
        check_batch_split(_split_config(8, 11, 3, batch=3, nnodes=2), CalibRLConfig())


@pytest.mark.parametrize("key,value", [("nnodes", 0), ("n_gpus_per_node", "8"), ("nnodes", True)])
def test_gpu_counts_must_be_positive_integers(key, value):
    from calibrl_verl.main_calibrl import check_batch_split

    config = _split_config(8, 11, 120)
    config.trainer[key] = value
    with pytest.raises(CalibRLConfigError, match=rf"trainer.{key}={value!r} must be a positive integer"):
        check_batch_split(config, CalibRLConfig())


def test_missing_inputs_name_every_file_and_the_variable(tmp_path, monkeypatch):
    from calibrl_verl.main_calibrl import missing_inputs, require_inputs

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "train.parquet").touch()
    (tmp_path / "model").mkdir()
    cfg = _compose("data.train_files=['~/train.parquet','hdfs://x/train.parquet']",
                   f"data.val_files={tmp_path}/v.parquet", "actor_rollout_ref.model.path='~/model'")
    assert missing_inputs(cfg) == [f"data.val_files: no such file: {tmp_path}/v.parquet (set VAL_FILES or "
                                   "data.val_files to your parquet file(s); see README 'Preparing data')"]
    cfg = _compose("data.train_files=[]", "data.val_files=null", "actor_rollout_ref.model.path=./no_model")
    assert missing_inputs(cfg) == [
        "data.train_files is empty: set it (TRAIN_FILES in the run scripts) to your parquet file(s)",
        "actor_rollout_ref.model.path: no such directory: ./no_model (a local model directory or a Hugging Face id; "
        "MODEL_PATH in the run scripts)"]
    with pytest.raises(CalibRLConfigError, match=r"missing input\(s\):\n  data.train_files is empty"):
        require_inputs(cfg)
    require_inputs(_compose(f"data.train_files={tmp_path}/train.parquet", "data.val_files=null",
                            "actor_rollout_ref.model.path=Qwen/Qwen2.5-VL-7B-Instruct"))  # a HF id is not checked


def _tiny_overrides(assets, run_dir, mode: str, device: str) -> list[str]:
    """A smoke launch's overrides, as calibrl_verl.launch builds them (CPU backend's first)."""
    from calibrl_verl import launch
    from calibrl_verl.cpu import cpu_overrides

    return (cpu_overrides() if device == "cpu" else []) + launch.recipe_overrides(assets, run_dir, 3, mode, device)


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("mode", ["calibrl", "grpo", "luffy", "rlplus"])
def test_the_tiny_recipe_passes_the_start_up_checks(mode, device, tmp_path):
    """smoke / study launches (4 prompts x (4 + 1) rows on 1 GPU, and the dp = 2 variant) pass every new check."""
    from calibrl_verl import tiny
    from calibrl_verl.main_calibrl import check_batch_split, missing_inputs

    assets = tmp_path / "assets"
    args = _tiny_overrides(assets, tmp_path / mode, mode, device)
    assert len(missing_inputs(_compose(*args))) == 3  # train, val, model: not built here
    tiny.train_files(assets).parent.mkdir(parents=True)
    tiny.train_files(assets).touch()
    tiny.val_files(assets).touch()
    tiny.model_dir(assets).mkdir()
    for extra in ([], ["trainer.n_gpus_per_node=2", "++ray_kwargs.ray_init.num_gpus=2"]):
        cfg = _compose(*args, *extra)
        check_batch_split(cfg, prepare_config(cfg))
        assert missing_inputs(cfg) == []


def test_the_toy_study_runs_pass_the_batch_split_check(tmp_path):
    """Every arm of the study grid, with the CPU backend's placement that calibrl_verl.launch adds at launch."""
    from calibrl_verl.cpu import cpu_overrides
    from calibrl_verl.main_calibrl import check_batch_split
    from calibrl_verl.study import grid

    for name, method in grid.METHODS.items():
        cfg = _compose(*cpu_overrides(), *grid.run_overrides(tmp_path, method, seed=1, cfg=grid.PRESETS["full"]))
        check_batch_split(cfg, prepare_config(cfg))
        assert cfg.trainer.n_gpus_per_node == 1, name


def test_cli_takes_dry_run_out_and_puts_the_recipes_on_the_search_path(monkeypatch):
    import calibrl_verl.main_calibrl as entry

    seen = []
    monkeypatch.setattr(entry, "main", lambda: seen.append((list(sys.argv[1:]), entry._dry_run)))
    monkeypatch.setattr(sys, "argv", ["main_calibrl"])
    monkeypatch.setattr(entry, "_dry_run", False)  # restored after the test: cli() sets it
    from calibrl_verl.config import resolvers

    monkeypatch.setattr(resolvers, "_recipes_dir", None)  # restored too: cli() records the --config-dir
    entry.cli(["--config-name", "grpo_qwen2_5vl_7b", "--dry-run", "calibrl.alpha=0.3"])
    entry.cli(["calibrl.alpha=0.3", "--config-dir=mine"])
    recipes = f"{entry.RECIPES_DIR}"
    assert seen == [
        (["--config-dir", recipes, "--config-name", "grpo_qwen2_5vl_7b", "calibrl.alpha=0.3",
          "hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none"], True),
        (["--config-dir", recipes, "calibrl.alpha=0.3", "--config-dir=mine"], False),  # Hydra keeps the last one
    ]


def test_dry_run_prints_the_validated_config_as_yaml_and_names_missing_inputs(capsys):
    from calibrl_verl.main_calibrl import dry_run

    cfg = _compose("data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", "trainer.n_gpus_per_node=1",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
                   "data.train_files=/no/train.parquet")
    prepare_config(cfg)
    dry_run(cfg)
    out, err = capsys.readouterr()
    assert OmegaConf.create(out) == OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # stdout: YAML only
    assert "[validate_config] All configuration checks passed" in err
    assert "[calibrl] dry run: missing data.train_files: no such file: /no/train.parquet" in err
    assert err.rstrip().endswith("a launch would stop on the missing inputs above; nothing launched")
