"""recipes/*.sh: bash syntax, dry-run output, data checks, and that the printed overrides compose into verl's config."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
LAUNCHER = "calibrl_verl.main_calibrl"
# recipe -> (loss_mode, rollout.n, model, vLLM tensor parallel size)
EXPECTED = {
    "run_calibrl_qwen2_5vl_7b.sh": ("calibrl", 11, "Qwen/Qwen2.5-VL-7B-Instruct", 2),
    "run_calibrl_qwen2_5vl_3b.sh": ("calibrl", 11, "Qwen/Qwen2.5-VL-3B-Instruct", 1),
    "run_grpo_qwen2_5vl_7b.sh": ("grpo", 10, "Qwen/Qwen2.5-VL-7B-Instruct", 2),
    "run_luffy_qwen2_5vl_7b.sh": ("luffy", 11, "Qwen/Qwen2.5-VL-7B-Instruct", 2),
    "run_rlplus_qwen2_5vl_7b.sh": ("rlplus", 11, "Qwen/Qwen2.5-VL-7B-Instruct", 2),
}
# The paper's setting (SPEC section 7), shared by every recipe: same data and budget for the baselines.
SHARED = [
    "data.train_batch_size=480", "actor_rollout_ref.actor.ppo_mini_batch_size=120",
    "actor_rollout_ref.actor.optim.lr=1e-6", "actor_rollout_ref.actor.optim.lr_scheduler_type=constant",
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0", "actor_rollout_ref.rollout.temperature=1.0",
    "data.max_prompt_length=20480", "data.max_response_length=4096", "actor_rollout_ref.actor.use_kl_loss=false",
    "algorithm.use_kl_in_reward=false", "actor_rollout_ref.actor.entropy_coeff=0",
    "actor_rollout_ref.actor.grad_clip=1.0", "trainer.total_epochs=1", "trainer.n_gpus_per_node=8",
    "trainer.nnodes=1", "actor_rollout_ref.rollout.name=vllm", "trainer.test_freq=5",
    "actor_rollout_ref.model.use_remove_padding=true", "calibrl.alpha=0.5", "calibrl.guide_coef=0.1",
    "calibrl.expert_key=solution", "calibrl.experts_per_group=1", "calibrl.gap=token", "calibrl.tail=zero",
    "calibrl.norm_adv_by_std=false", "calibrl.mix_policy=always", "calibrl.pass_rate_range=[0.0,1.0]",
    "trainer.logger=[console,tensorboard]",
]  # fmt: skip
CALIBRL_KEYS = {"loss_mode", "expert_key", "experts_per_group", "alpha", "guide_coef", "pass_threshold", "gap",
                "tail", "sequence_norm", "norm_adv_by_std", "mix_policy", "mix_ratio", "pass_rate_range",
                "warmup_grpo_steps", "expert_overlong", "seed"}  # fmt: skip


@pytest.fixture
def data(tmp_path: Path) -> dict[str, str]:
    """Environment with existing (empty) data files: the recipes only check that they exist."""
    files = {name: tmp_path / f"{name}.parquet" for name in ("train", "val_a", "val_b")}
    for path in files.values():
        path.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "DRY_RUN", "MODEL_PATH", "EXP")}
    env.update(TRAIN_FILES=str(files["train"]), VAL_FILES=f"{files['val_a']},{files['val_b']}",
               OUTPUT_DIR=str(tmp_path / "out"))  # fmt: skip
    return env


def run_recipe(recipe: str, env: dict[str, str], *args: str, dry_flag: bool = True) -> subprocess.CompletedProcess:
    argv = ["bash", str(RECIPES / recipe), *(["--dry-run"] if dry_flag else []), *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def overrides(stdout: str) -> list[str]:
    """The Hydra overrides of the printed command (everything after the launcher module)."""
    words = shlex.split(stdout.replace("\\\n", " "))
    return words[words.index(LAUNCHER) + 1 :]


def dry_run(recipe: str, env: dict[str, str], *args: str) -> list[str]:
    result = run_recipe(recipe, env, *args)
    assert result.returncode == 0, result.stderr
    return overrides(result.stdout)


def compose_overrides(args: list[str]):
    with initialize_config_module("calibrl_verl.config", version_base=None):
        return compose("calibrl_trainer", overrides=args)


@pytest.mark.parametrize("script", sorted(EXPECTED) + ["common.sh"])
def test_bash_syntax(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(RECIPES / script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_dry_run_prints_the_recipe(recipe: str, data: dict[str, str]) -> None:
    loss_mode, n, model, tp = EXPECTED[recipe]
    result = run_recipe(recipe, data)
    assert result.returncode == 0, result.stderr
    assert "nothing launched" in result.stderr
    assert f"python3 -m {LAUNCHER}" in result.stdout.splitlines()[0]
    args = overrides(result.stdout)
    for expected in SHARED + [f"calibrl.loss_mode={loss_mode}", f"actor_rollout_ref.rollout.n={n}",
                              f"actor_rollout_ref.model.path={model}",
                              f"actor_rollout_ref.rollout.tensor_model_parallel_size={tp}"]:  # fmt: skip
        assert expected in args, expected
    assert {a.split("=")[0].removeprefix("calibrl.") for a in args if a.startswith("calibrl.")} == CALIBRL_KEYS
    assert f"data.train_files=[{data['TRAIN_FILES']}]" in args
    assert f"data.val_files=[{data['VAL_FILES']}]" in args
    assert f"trainer.default_local_dir={data['OUTPUT_DIR']}" in args
    assert len({a.split("=")[0] for a in args}) == len(args)  # each key once: nothing silently overridden


def test_user_overrides_come_last_and_win(data: dict[str, str]) -> None:
    user = ["data.train_batch_size=8", "calibrl.alpha=0.3", "+actor_rollout_ref.model.override_config.foo=1"]
    args = dry_run("run_calibrl_qwen2_5vl_7b.sh", data, *user)
    assert args[-3:] == user and "data.train_batch_size=480" in args
    cfg = compose_overrides(args)
    assert cfg.data.train_batch_size == 8 and cfg.calibrl.alpha == 0.3


def test_environment_variables(data: dict[str, str]) -> None:
    env = {**data, "DRY_RUN": "1", "NNODES": "2", "N_GPUS_PER_NODE": "4", "MODEL_PATH": "org/m",
           "PROJECT": "p", "EXP": "e", "WANDB_API_KEY": "x"}  # fmt: skip
    result = run_recipe("run_grpo_qwen2_5vl_7b.sh", env, "trainer.save_freq=3", dry_flag=False)
    assert result.returncode == 0, result.stderr
    args = overrides(result.stdout)
    for expected in ["trainer.nnodes=2", "trainer.n_gpus_per_node=4", "actor_rollout_ref.model.path=org/m",
                     "trainer.project_name=p", "trainer.experiment_name=e",
                     "trainer.logger=[console,tensorboard,wandb]", "trainer.save_freq=3"]:  # fmt: skip
        assert expected in args
    assert f"TENSORBOARD_DIR={data['OUTPUT_DIR']}/tensorboard" in result.stdout.splitlines()[0]


def test_mini_batch_split_over_the_gpus_is_checked(data: dict[str, str]) -> None:
    """verl asserts (prompts x rollout.n) % GPUs == 0 for each PPO mini-batch: the recipe says so up front."""
    two_nodes = {**data, "NNODES": "2"}
    result = run_recipe("run_calibrl_qwen2_5vl_7b.sh", two_nodes)  # 120 x 11 rows over 16 GPUs
    assert result.returncode != 0
    assert "does not split over 16 GPUs; pass actor_rollout_ref.actor.ppo_mini_batch_size=96" in result.stderr
    assert "trainer.nnodes=2" in dry_run("run_grpo_qwen2_5vl_7b.sh", two_nodes)  # 120 x 10 rows split
    fixed = dry_run("run_calibrl_qwen2_5vl_7b.sh", two_nodes, "actor_rollout_ref.actor.ppo_mini_batch_size=96")
    cfg = compose_overrides(fixed)
    assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n % 16 == 0


@pytest.mark.parametrize("var", ["TRAIN_FILES", "VAL_FILES"])
def test_missing_data_file_is_a_clear_error(var: str, data: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "x.parquet"
    result = run_recipe("run_calibrl_qwen2_5vl_7b.sh", {**data, var: str(missing)})
    assert result.returncode != 0
    assert f"error: {var}: no such file: {missing}" in result.stderr
    assert LAUNCHER not in result.stdout


def test_missing_local_model_dir_is_a_clear_error(data: dict[str, str], tmp_path: Path) -> None:
    result = run_recipe("run_calibrl_qwen2_5vl_3b.sh", {**data, "MODEL_PATH": str(tmp_path / "no_model")})
    assert result.returncode != 0 and "MODEL_PATH: no such directory" in result.stderr


def test_data_files_given_as_override_skip_the_env_check(data: dict[str, str], tmp_path: Path) -> None:
    env = {**data, "TRAIN_FILES": str(tmp_path / "absent.parquet")}
    args = dry_run("run_calibrl_qwen2_5vl_7b.sh", env, "data.train_files=hdfs://somewhere/train.parquet")
    assert args[-1] == "data.train_files=hdfs://somewhere/train.parquet"


def test_help_lists_the_environment() -> None:
    result = subprocess.run(["bash", str(RECIPES / "run_grpo_qwen2_5vl_7b.sh"), "--help"], capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert result.returncode == 0
    assert "GRPO baseline" in result.stdout and "TRAIN_FILES" in result.stdout and "ray start --head" in result.stdout


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_printed_overrides_compose_into_a_valid_verl_config(recipe: str, data: dict[str, str]) -> None:
    """Every key exists in verl 0.9.1's config (Hydra rejects unknown keys), and verl's validation passes."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from calibrl_verl.main_calibrl import prepare_config

    loss_mode, n, model, tp = EXPECTED[recipe]
    cfg = compose_overrides(dry_run(recipe, data))
    prepare_config(cfg)
    assert cfg.calibrl.loss_mode == loss_mode and cfg.actor_rollout_ref.rollout.n == n
    assert cfg.algorithm.adv_estimator == ("grpo" if loss_mode == "grpo" else "calibrl")
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == ("vanilla" if loss_mode == "grpo" else loss_mode)
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == tp
    # our reward, behind the reward guard (prepare_config wraps it)
    reward_fn = cfg.reward.custom_reward_function
    assert reward_fn.path == "pkg://calibrl_verl.integration.reward_guard" and reward_fn.name == "guarded_score"
    assert reward_fn.reward_kwargs.calibrl_inner_path == "pkg://calibrl_verl.reward"
    assert not need_critic(cfg) and not need_reference_policy(cfg)  # no KL: no reference model
    validate_config(config=cfg, use_reference_policy=False, use_critic=False)
    # the static micro batches (use_dynamic_bsz=false) divide the per-GPU mini-batch of rows
    actor = cfg.actor_rollout_ref.actor
    rows_per_gpu = actor.ppo_mini_batch_size * n // cfg.trainer.n_gpus_per_node
    assert rows_per_gpu % actor.ppo_micro_batch_size_per_gpu == 0
