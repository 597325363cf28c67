"""The environment variables the recipes read in YAML (calibrl_verl/config/resolvers.py) and their resolution on the
driver: what main_calibrl hands to verl (and Ray) holds plain values, with no ${oc.env:...} or ${calibrl_*:...} left.

Expected values are written out here (paths under tmp_path, the checkout's own path), not computed by the resolvers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from calibrl_verl.config import CalibRLConfigError, resolvers
from calibrl_verl.main_calibrl import prepare_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
ENV = ("MODEL_PATH", "TRAIN_FILES", "VAL_FILES", "NNODES", "N_GPUS_PER_NODE", "PROJECT", "EXP", "OUTPUT_DIR",
       "WANDB_API_KEY", "NETRC")  # fmt: skip
# the keys the recipes fill from the environment
ENV_KEYS = ("data.train_files", "data.val_files", "actor_rollout_ref.model.path", "trainer.nnodes",
            "trainer.n_gpus_per_node", "trainer.project_name", "trainer.experiment_name", "trainer.default_local_dir",
            "trainer.logger")  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No recipe variable leaks in from the caller; no netrc with a wandb key; <repo> is the checkout."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setattr(resolvers, "_recipes_dir", None)


def compose_recipe(recipe: str, *overrides: str):
    with initialize_config_dir(str(RECIPES), version_base=None):
        return compose(recipe, overrides=list(overrides))


# -- the resolvers, one by one ---------------------------------------------------------------------------------------
def test_files_from_the_variable_are_split_and_taken_from_the_current_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAIN_FILES", "a.parquet, /abs/b.parquet [sub/c.parquet] 'd.parquet' hdfs://nn/e.parquet")
    assert resolvers.env_files("TRAIN_FILES", "data/x.parquet") == [
        f"{tmp_path}/a.parquet", "/abs/b.parquet", f"{tmp_path}/sub/c.parquet", f"{tmp_path}/d.parquet",
        "hdfs://nn/e.parquet"]  # fmt: skip


def test_files_default_under_the_repository_when_unset_or_empty(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not where the defaults are taken from
    expected = [f"{REPO}/data/geometry3k/test.parquet", f"{REPO}/data/geoqa/test.parquet"]
    assert resolvers.env_files("VAL_FILES", "data/geometry3k/test.parquet", "data/geoqa/test.parquet") == expected
    monkeypatch.setenv("VAL_FILES", " ")
    assert resolvers.env_files("VAL_FILES", "data/geometry3k/test.parquet", "data/geoqa/test.parquet") == expected


def test_the_repository_is_the_folder_above_the_recipes_folder(tmp_path):
    assert resolvers.repo_root() == str(REPO)
    resolvers.set_recipes_dir(tmp_path / "work" / "recipes")
    assert resolvers.repo_root() == f"{tmp_path}/work"
    assert resolvers.env_dir("OUTPUT_DIR", "checkpoints/p/e") == f"{tmp_path}/work/checkpoints/p/e"


def test_recipes_folder_of_links_keeps_its_own_repository(tmp_path):
    """As the run scripts' `cd ... && pwd`: a linked recipes folder is not followed to the checkout."""
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "recipes").symlink_to(RECIPES)
    resolvers.set_recipes_dir(tmp_path / "ws" / "recipes")
    assert resolvers.repo_root() == f"{tmp_path}/ws"


def test_output_dir_from_the_variable_is_taken_from_the_current_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTPUT_DIR", "rel/out")
    assert resolvers.env_dir("OUTPUT_DIR", "checkpoints/x") == f"{tmp_path}/rel/out"
    monkeypatch.setenv("OUTPUT_DIR", "/abs/out")
    assert resolvers.env_dir("OUTPUT_DIR", "checkpoints/x") == "/abs/out"


@pytest.mark.parametrize(("value", "expected"), [("2", 2), ("16", 16), (" 4 ", 4), ("", 8)])
def test_gpu_counts_from_the_variable(monkeypatch, value, expected):
    monkeypatch.setenv("N_GPUS_PER_NODE", value)
    assert resolvers.env_int("N_GPUS_PER_NODE", 8) == expected


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5", "2x", "08"])
def test_a_bad_count_names_the_variable_and_its_value(monkeypatch, value):
    monkeypatch.setenv("NNODES", value)
    with pytest.raises(CalibRLConfigError, match=f"^NNODES='{value}' must be a positive integer$"):
        resolvers.env_int("NNODES", 1)


def test_wandb_joins_the_loggers_with_a_key_or_after_wandb_login(monkeypatch, tmp_path):
    assert resolvers.loggers("console", "tensorboard") == ["console", "tensorboard"]
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com\n  login u\n  password p\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolvers.loggers("console", "tensorboard") == ["console", "tensorboard"]
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert resolvers.loggers("console", "tensorboard") == ["console", "tensorboard", "wandb"]
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolvers.loggers("console", "tensorboard") == ["console", "tensorboard", "wandb"]
    assert resolvers.loggers("console", "wandb") == ["console", "wandb"]  # not twice


# -- in the recipes --------------------------------------------------------------------------------------------------
def test_a_recipe_reads_every_variable(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name, value in {"MODEL_PATH": "org/model", "TRAIN_FILES": "t.parquet", "VAL_FILES": "v1.parquet,v2.parquet",
                        "NNODES": "2", "N_GPUS_PER_NODE": "4", "PROJECT": "proj", "EXP": "exp1",
                        "WANDB_API_KEY": "k"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    cfg = OmegaConf.to_container(compose_recipe("calibrl_qwen2_5vl_7b"), resolve=True)
    assert [OmegaConf.select(OmegaConf.create(cfg), key) for key in ENV_KEYS] == [
        [f"{tmp_path}/t.parquet"], [f"{tmp_path}/v1.parquet", f"{tmp_path}/v2.parquet"], "org/model", 2, 4, "proj",
        "exp1", f"{REPO}/checkpoints/proj/exp1", ["console", "tensorboard", "wandb"]]  # fmt: skip


def test_without_variables_a_recipe_has_its_defaults_under_the_repository(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    vl = OmegaConf.create(OmegaConf.to_container(compose_recipe("grpo_qwen2_5vl_3b"), resolve=True))
    text = compose_recipe("luffy_qwen2_5_math_7b")
    assert [OmegaConf.select(vl, k) for k in ENV_KEYS] == [
        [f"{REPO}/data/virl39k/train.parquet"],
        [f"{REPO}/data/geometry3k/test.parquet", f"{REPO}/data/geoqa/test.parquet"], "Qwen/Qwen2.5-VL-3B-Instruct", 1,
        8, "calibrl", "grpo_qwen2_5vl_3b", f"{REPO}/checkpoints/calibrl/grpo_qwen2_5vl_3b", ["console", "tensorboard"]]
    assert (list(text.data.train_files), list(text.data.val_files), text.actor_rollout_ref.model.path) == (
        [f"{REPO}/data/openr1_math/train.parquet"], [f"{REPO}/data/math500/test.parquet"], "Qwen/Qwen2.5-Math-7B")
    assert compose_recipe("calibrl_qwen2_5vl_7b_lora").trainer.n_gpus_per_node == 4  # the LoRA recipe's default


def test_n_gpus_per_node_also_sets_the_lora_recipe(monkeypatch):
    monkeypatch.setenv("N_GPUS_PER_NODE", "8")
    assert compose_recipe("calibrl_qwen2_5vl_7b_lora").trainer.n_gpus_per_node == 8


def test_the_output_folder_follows_a_swapped_method_and_the_user_s_names(monkeypatch):
    cfg = compose_recipe("calibrl_qwen2_5vl_7b", "methods=grpo", "trainer.project_name=mine")
    assert cfg.trainer.default_local_dir == f"{REPO}/checkpoints/mine/grpo_qwen2_5vl_7b"
    monkeypatch.setenv("OUTPUT_DIR", "/abs/out")
    assert compose_recipe("calibrl_qwen2_5vl_7b").trainer.default_local_dir == "/abs/out"


def test_prepare_config_leaves_no_environment_interpolation(monkeypatch, tmp_path):
    """On the driver the values become plain: a process without our resolvers and with another environment (a Ray
    worker on another node) resolves the saved config to the same values."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAIN_FILES", "t.parquet")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("EXP", "e")
    cfg = compose_recipe("calibrl_qwen2_5vl_7b", "actor_rollout_ref.actor.ppo_mini_batch_size=96")
    for key in ENV_KEYS:
        parent, leaf = key.rsplit(".", 1)
        assert OmegaConf.is_interpolation(OmegaConf.select(cfg, parent), leaf), key
    prepare_config(cfg)
    unresolved = OmegaConf.to_yaml(cfg)
    for name in (*resolvers.RESOLVERS, "oc.env"):
        assert "${" + name + ":" not in unresolved, name
    for key in ENV_KEYS:
        parent, leaf = key.rsplit(".", 1)
        assert not OmegaConf.is_interpolation(OmegaConf.select(cfg, parent), leaf), key
    expected = {key: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"]
                for key in ENV_KEYS}  # fmt: skip
    assert expected["data.train_files"] == [f"{tmp_path}/t.parquet"] and expected["trainer.nnodes"] == 2
    assert expected["trainer.default_local_dir"] == f"{REPO}/checkpoints/calibrl/e"
    saved = tmp_path / "config.yaml"
    saved.write_text(unresolved)
    code = ("import json, sys; from omegaconf import OmegaConf; c = OmegaConf.load(sys.argv[1]); "
            "OmegaConf.resolve(c); print(json.dumps({k: OmegaConf.to_container(OmegaConf.create({'v': "
            "OmegaConf.select(c, k)}))['v'] for k in sys.argv[2:]}))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ENV and k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(saved), *ENV_KEYS], env=env, cwd="/", capture_output=True,
                            text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == expected


def test_a_bad_variable_stops_prepare_config_naming_key_variable_and_value(monkeypatch):
    monkeypatch.setenv("NNODES", "two")
    cfg = compose_recipe("calibrl_qwen2_5vl_7b")
    with pytest.raises(CalibRLConfigError, match=r"^trainer.nnodes: NNODES='two' must be a positive integer$"):
        prepare_config(cfg)


# -- main_calibrl end to end (Hydra's main, without Ray) --------------------------------------------------------------
def test_the_config_handed_to_verl_has_the_environment_resolved(monkeypatch, tmp_path):
    """main_calibrl's real path up to run_ppo: the variables are resolved on the driver, relative paths against the
    directory the launch started in, <repo> the folder above --config-dir."""
    import calibrl_verl.main_calibrl as entry

    work = tmp_path / "work"
    (work / "recipes").mkdir(parents=True)
    for item in RECIPES.iterdir():  # a checkout of linked recipe files, as the docs tests build one
        (work / "recipes" / item.name).symlink_to(item)
    run_dir = tmp_path / "launch"
    run_dir.mkdir()
    (run_dir / "t.parquet").touch()
    (run_dir / "v.parquet").touch()
    monkeypatch.chdir(run_dir)
    for name, value in {"TRAIN_FILES": "t.parquet", "VAL_FILES": "v.parquet", "N_GPUS_PER_NODE": "4",
                        "MODEL_PATH": "org/m"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    seen = []
    monkeypatch.setattr(entry, "run", lambda config: seen.append(config))
    monkeypatch.setattr(entry, "validate_train_data", lambda config, cfg: None)
    monkeypatch.setattr(entry, "_dry_run", False)
    monkeypatch.setattr(sys, "argv", ["main_calibrl"])
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    entry.cli(["--config-dir", str(work / "recipes"), "--config-name", "grpo_qwen2_5vl_7b",
               f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null", "hydra/job_logging=none"])
    (config,) = seen
    unresolved = OmegaConf.to_yaml(config)
    assert "${oc.env:" not in unresolved and "${calibrl_" not in unresolved
    assert list(config.data.train_files) == [f"{run_dir}/t.parquet"]
    assert list(config.data.val_files) == [f"{run_dir}/v.parquet"]
    assert (config.trainer.n_gpus_per_node, config.actor_rollout_ref.model.path) == (4, "org/m")
    assert config.trainer.default_local_dir == f"{work}/checkpoints/calibrl/grpo_qwen2_5vl_7b"


def test_cli_records_the_recipes_folder_it_passes_to_hydra(monkeypatch, tmp_path):
    import calibrl_verl.main_calibrl as entry

    monkeypatch.setattr(entry, "main", lambda: None)
    monkeypatch.setattr(entry, "_dry_run", False)
    monkeypatch.setattr(sys, "argv", ["main_calibrl"])
    entry.cli(["--config-name", "grpo_qwen2_5vl_7b"])
    assert resolvers.repo_root() == str(REPO)
    entry.cli([f"--config-dir={tmp_path}/a/recipes", "--config-name", "x"])
    assert resolvers.repo_root() == f"{tmp_path}/a"
    entry.cli(["-cd", f"{tmp_path}/b/recipes", "--config-name", "x"])
    assert resolvers.repo_root() == f"{tmp_path}/b"


def test_an_empty_model_path_is_named_as_a_missing_input(monkeypatch):
    """oc.env reads a set-but-empty MODEL_PATH as "" (the run scripts unset empty variables first); a direct launch
    with it stops naming the key and the variable instead of handing verl an empty path."""
    from calibrl_verl.main_calibrl import missing_inputs

    monkeypatch.setenv("MODEL_PATH", "")
    cfg = compose_recipe("calibrl_qwen2_5vl_7b")
    prepare_config(cfg)
    assert ("actor_rollout_ref.model.path is empty: set it (MODEL_PATH in the run scripts) to a local model directory "
            "or a Hugging Face id") in missing_inputs(cfg)
