"""Every command of README.md and docs/**/*.md runs here, or says here why it cannot and what is checked instead.

The commands are extracted from the Markdown (tests/docs_commands.py: shell code blocks, continuations joined,
comments cut, and inline code spans that start like a command) and each one must be in ``COMMANDS``, in exactly one
class:

- ``run``: executed as written (``bash -c``) in a workspace that mirrors the checkout (``recipes/``,
  ``examples/``) and holds tiny inputs made with the project's builders (``calibrl_verl.tiny``); placeholders
  (``<MATH-500 file>``, ``[--opt]``) and hub names (``hiyouga/geometry3k``) are replaced by local files in the
  same layout, and each replacement is listed with the command;
- ``dry_run``: a GPU launch, executed as written with ``--dry-run`` appended: the run script and the launcher,
  then ``main_calibrl``'s config composition, start-up checks and verl's validation; it must end with "the config
  passed every check" (the data files exist in the workspace);
- ``covered_by``: a test already runs it end to end (the smoke runs, the expert-generation CLI against a scripted
  server, ...): the test must exist and its source must name what the command runs;
- ``not_run``: it cannot run in CI (installs, downloads, keys, clusters, hours of CPU), with the reason;
- ``mention``: an inline span that only names a program or module (`` `python -m calibrl_verl.evaluate` ``): the
  module must exist.

Where a command is not run, something cheap still is: ``help`` runs its own argument list with ``--help``
appended (argparse checks the choices and types before it prints the help, and every ``--flag`` of the command
must be in the help), ``wrapper`` runs a bash wrapper with ``python`` replaced by a recorder (nothing is
executed) and help-checks each Python call it would make, and ``check`` is a check of its own (bash syntax).

A new command in the docs fails ``test_every_documented_command_is_classified`` until it is added here; an entry
whose command left the docs fails ``test_every_entry_is_still_documented``.

Cost: the Python side of every command runs in ONE interpreter (tests/docs_commands.py's runner, through
``runpy``): the bash part runs for real with ``python`` recorded, then the recorded calls are replayed in that
interpreter with their argv, cwd and environment. A fresh interpreter per dry run would cost ~12 s of imports
each on 2 cores.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_commands", Path(__file__).with_name("docs_commands.py"))
docs = importlib.util.module_from_spec(_spec)
sys.modules["docs_commands"] = docs  # dataclasses resolve their module by name
_spec.loader.exec_module(docs)

PASSED = "[calibrl] dry run: the config passed every check; nothing launched"
# variables the launchers and wrappers read: the commands set their own, nothing leaks in from the caller
LAUNCH_ENV = ("WANDB_API_KEY", "NETRC", "DRY_RUN", "MODEL_PATH", "EXP", "PROJECT", "NNODES", "N_GPUS_PER_NODE",
              "OUTPUT_DIR", "CALIBRL_DEVICE", "TRAIN_FILES", "VAL_FILES", "PYTHON", "VENV", "OUT", "REPORT",
              "PRESET", "JOBS", "SEEDS", "METHODS", "ARMS", "STEPS", "LOSS_MODE", "VIRTUAL_ENV")  # fmt: skip


# -- the table -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    kind: str  # run | dry_run | covered_by | not_run | mention
    why: str = ""  # not_run / mention: the reason; run: what the replacements stand for
    subs: tuple[tuple[str, str], ...] = ()  # literal replacements before running ("{W}": the workspace)
    rc: int = 0  # run: the expected exit status
    expect: tuple[str, ...] = ()  # run: strings in its output (bash and Python, stdout and stderr)
    outputs: tuple[str, ...] = ()  # run: files it writes, relative to the workspace
    config: tuple[tuple[str, object], ...] = ()  # dry_run: dotted key -> value in the printed config
    test: str = ""  # covered_by: tests/FILE.py::test_name
    needles: tuple[str, ...] = ()  # covered_by: in the test's source (or its module's top-level code)
    via: tuple[tuple[str, tuple[str, ...]], ...] = ()  # covered_by: (file, strings in it) from the test to the command
    help: bool = False  # its argv + --help parses; every --flag it uses is in the help
    wrapper: bool = False  # a bash wrapper: run with python recorded; each recorded call help-checked
    calls: tuple[str, ...] = ()  # wrapper: strings in the recorded python calls
    check: Callable[[], None] | None = None  # a cheap check of its own
    post: Callable[[Path], None] | None = None  # run: a check of what it wrote (gets the workspace)


def run(why: str = "", **kw) -> Entry:
    return Entry("run", why, **kw)


def dry(**kw) -> Entry:
    return Entry("dry_run", **kw)


def covered(test: str, needles: tuple[str, ...], why: str = "", **kw) -> Entry:
    return Entry("covered_by", why, test=test, needles=needles, **kw)


def not_run(why: str, **kw) -> Entry:
    return Entry("not_run", why, **kw)


def mention(why: str = "names the program; the module exists") -> Entry:
    return Entry("mention", why)


# cheap checks ------------------------------------------------------------------------------------------------------
def bash_syntax(*scripts: str) -> Callable[[], None]:
    def check() -> None:
        for script in scripts:
            result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True, check=False)
            assert result.returncode == 0, f"{script}: {result.stderr}"

    return check


def contains(path: str, *needles: str) -> Callable[[], None]:
    def check() -> None:
        text = (REPO / path).read_text()
        for needle in needles:
            assert needle in text, f"{path} does not contain {needle!r}"

    return check


def all_of(*checks: Callable[[], None]) -> Callable[[], None]:
    def check() -> None:
        for each in checks:
            each()

    return check


def the_named_tests_exist(doc: str) -> Callable[[], None]:
    """Every ``tests/FILE.py::test_name`` the page names is a test function of that file."""

    def check() -> None:
        named = set(re.findall(r"(tests/\w+\.py)::(\w+)", (REPO / doc).read_text()))
        assert named
        for path, name in sorted(named):
            assert name in functions_in(REPO / path), f"{doc} names {path}::{name}, which does not exist"

    return check


def parquet_rows(path: str, n: int | None = None, experts: bool | None = None) -> Callable[[Path], None]:
    """The file is verl RL parquet with n rows; experts: every solution set (True) or every one empty (False)."""

    def check(workspace: Path) -> None:
        import pyarrow.parquet as pq

        rows = pq.read_table(workspace / path).to_pylist()
        assert rows and (n is None or len(rows) == n), (path, len(rows))
        for row in rows:
            assert row["prompt"][0]["role"] == "user" and row["reward_model"]["ground_truth"]
        if experts is not None:
            assert all(bool(row["solution"]) == experts for row in rows), [row["solution"] for row in rows]

    return check


def cache_without_errors(path: str) -> Callable[[Path], None]:
    """data.md's grep: the cache keeps every attempt but the errors, and still loads."""

    def check(workspace: Path) -> None:
        from calibrl_verl.experts.cache import AttemptCache

        records = [json.loads(line) for line in (workspace / path).read_text().splitlines()]
        assert [r["verdict"] for r in records] == ["correct", "wrong"]
        cache = AttemptCache(workspace / path)
        assert cache.outcome("p2", "m", samples=4).status == "pending"  # its error is gone: it is sent again
        cache.close()

    return check


# the test nodes the covered_by entries point at
SMOKE_TINY = "tests/test_smoke_tiny_on_cpu.py"
TOY = f"{SMOKE_TINY}::test_fast_toy_study_runs_logs_plots_and_tabulates"
COVERAGE = "tests/test_smoke_coverage_on_cpu.py::test_fast_coverage_study_trains_measures_and_reports"
EXPERTS_CLI = "tests/test_experts_on_cpu.py::test_a_killed_run_resumes_without_repeating_settled_problems"
EVALUATE = "tests/test_evaluate_on_cpu.py"
PROTOCOLS = "tests/test_protocols_on_cpu.py"
NODES_FILE = "tests/test_two_nodes_on_cpu.py"
NODES = NODES_FILE + "::test_two_nodes_train_with_one_actor_and_one_vllm_replica_each"
SFT_RUN = "tests/test_sft_run_on_cpu.py::test_sft_script_trains_on_cpu_and_the_merged_model_is_what_grpo_starts_from"
GPU_MODEL = "needs a merged 7B checkpoint and a GPU"
INSTALL = "installs the GPU / CPU stack (network, ~7 GB); CI runs setup_cpu.sh before the suite"
SUITE = "runs this test suite (ruff, then pytest): CI's own command (.ci/run)"
TEST_SH = all_of(bash_syntax("scripts/test.sh"), contains("scripts/test.sh", '-m pytest -q "$@"'),
                 contains(".ci/run", "\nbash scripts/test.sh\n"))  # fmt: skip
RUN_SCRIPTS = "recipes/run_*_qwen*.sh"  # the GPU recipes' run scripts (run_calibrl_tiny_cpu.sh trains: not these)
TOY_SCRIPT = "examples/toy_study/run_study.sh"
COVERAGE_SCRIPT = "examples/coverage_study/run_study.sh"
TOY_CALLS = ("-m calibrl_verl.study.grid --out", "-m calibrl_verl.study.report --study")
PREP = "examples/data_preprocess"
VALIDATED = "data/virl39k/train.parquet: "  # validate's summary line starts with the file

COMMANDS: dict[str, Entry] = {
    # -- README: install, demo, test ---------------------------------------------------------------------------
    "bash scripts/setup_gpu.sh": not_run(INSTALL + " (GPU: flash-attn build)",
                                         check=bash_syntax("scripts/setup_gpu.sh")),
    "bash scripts/setup_cpu.sh": not_run(INSTALL, check=bash_syntax("scripts/setup_cpu.sh")),
    "bash recipes/run_calibrl_tiny_cpu.sh": covered(
        f"{SMOKE_TINY}::test_two_data_parallel_ranks_train_calibrl_with_two_distinct_experts",
        ("launch.run(", '"calibrl", "cpu"'), "3 steps of verl's real trainer (~2 min); the smoke tests run launch.run",
        wrapper=True, calls=("-m calibrl_verl.smoke run --device cpu", "--loss-mode calibrl")),
    "LOSS_MODE=grpo bash recipes/run_calibrl_tiny_cpu.sh": covered(
        TOY, ("grid.run_grid(", '"grpo"'), "the fast toy study trains GRPO on the same tiny recipe",
        wrapper=True, calls=("-m calibrl_verl.smoke run --device cpu", "--loss-mode grpo")),
    "bash scripts/test.sh": not_run(SUITE, check=TEST_SH),
    'bash scripts/test.sh -m "not smoke"': not_run(SUITE, check=all_of(TEST_SH, contains("pyproject.toml", '"smoke:'))),
    "bash scripts/test.sh -k guide": not_run(SUITE, check=TEST_SH),
    "bash scripts/test.sh -m families": not_run(SUITE, check=all_of(TEST_SH, contains("pyproject.toml", '"families:'))),
    "bash scripts/test.sh -m serve": not_run(SUITE, check=all_of(TEST_SH, contains("pyproject.toml", '"serve:'),
                                                                 contains("tests/conftest.py", '"serve":'))),
    "bash scripts/test.sh -m studies": not_run(SUITE, check=all_of(TEST_SH, contains("pyproject.toml", '"studies:'),
                                                                   contains("tests/conftest.py", '"studies":'))),
    "bash scripts/test.sh -m nodes": not_run(SUITE, check=all_of(TEST_SH, contains("pyproject.toml", '"nodes:'),
                                                                 contains("tests/conftest.py", '"nodes":'))),
    # -- README / data.md: preparing data ----------------------------------------------------------------------
    f"python {PREP}/virl39k.py --input data/raw/virl39k.parquet --image-dir data/raw --experts data/raw/cots.jsonl "
    "--expert-id-field id --expert-text-field cot --categories geometr --output data/virl39k/train.parquet": run(
        expect=("rows_written",), outputs=("data/virl39k/train.parquet",),
        post=parquet_rows("data/virl39k/train.parquet", n=4, experts=True)),
    f"python {PREP}/geometry3k.py --input hiyouga/geometry3k --split test --output data/geometry3k/test.parquet": run(
        "the hub dataset -> a local folder in its layout (test-00000-of-00001.parquet, images as bytes)",
        subs=(("hiyouga/geometry3k", "data/hub/geometry3k"),), outputs=("data/geometry3k/test.parquet",),
        post=parquet_rows("data/geometry3k/test.parquet", n=3)),
    f"python {PREP}/geometry3k.py --input hiyouga/geometry3k --split test --max-pixels 1003520 "
    "--output data/geometry3k/test.parquet": run(
        "the hub dataset -> a local folder in its layout (test-00000-of-00001.parquet, images as bytes)",
        subs=(("hiyouga/geometry3k", "data/hub/geometry3k"),), expect=("images_resized",),
        outputs=("data/geometry3k/test.parquet",), post=parquet_rows("data/geometry3k/test.parquet", n=3)),
    f"python {PREP}/geoqa.py --input data/raw/geoqa_test.json --image-dir data/raw --split test "
    "--output data/geoqa/test.parquet": run(outputs=("data/geoqa/test.parquet",),
                                            post=parquet_rows("data/geoqa/test.parquet", n=3)),
    f"python {PREP}/eval_sets.py --benchmark mmmu --input lmms-lab/MMMU --split validation "
    "--output data/eval/mmmu_val.parquet": covered(
        "tests/test_data_preprocess_on_cpu.py::"
        "test_eval_scienceqa_mmmu_and_the_benchmark_fields_kept_for_the_community_protocol",
        ('"--benchmark", name', '("mmmu", mmmu)'), "a hub dataset; the test prepares MMMU's layout from local files",
        help=True),
    f"python {PREP}/eval_sets.py --benchmark mathvista --input AI4Math/MathVista --split testmini "
    "--output data/eval/mathvista_testmini.parquet": run(
        "the hub dataset -> a local folder in its layout (testmini-00000-of-00001.parquet, decoded_image bytes)",
        subs=(("AI4Math/MathVista", "data/hub/mathvista"),), outputs=("data/eval/mathvista_testmini.parquet",),
        post=parquet_rows("data/eval/mathvista_testmini.parquet", n=2)),
    "python -m calibrl_verl.data.validate data/virl39k/train.parquet": run(expect=(VALIDATED, "0 errors")),
    f"python {PREP}/virl39k.py --input data/raw/virl39k.parquet --image-dir data/raw --categories geometr "
    "--output data/virl39k/problems.parquet": run(outputs=("data/virl39k/problems.parquet",),
                                                  post=parquet_rows("data/virl39k/problems.parquet", 4, False)),
    f"python {PREP}/openr1_math.py --input <OpenR1-Math-220k files> --output data/openr1_math/train.parquet": run(
        "the placeholder -> a local folder in the dataset's layout",
        post=parquet_rows("data/openr1_math/train.parquet"),
        subs=(("<OpenR1-Math-220k files>", "data/raw/openr1_math/default"),)),
    f"python {PREP}/text_benchmarks.py --benchmark math500 --input <MATH-500 file> "
    "--output data/math500/test.parquet": run(
        "the placeholder -> a local jsonl in MATH-500's layout", subs=(("<MATH-500 file>", "data/raw/math500.jsonl"),),
        post=parquet_rows("data/math500/test.parquet", n=4, experts=False)),
    f"python {PREP}/openr1_math.py --input data/raw/openr1_math/default --output data/openr1_math/train.parquet "
    "[--require-expert]": run(
        "the optional flag given", subs=(("[--require-expert]", "--require-expert"),),
        post=parquet_rows("data/openr1_math/train.parquet", n=3, experts=True)),
    f"python {PREP}/text_benchmarks.py --benchmark math500 --input HuggingFaceH4/MATH-500 --split test "
    "--output data/math500/test.parquet": run(
        "the hub dataset -> a local folder in its layout (test-00000-of-00001.parquet)",
        subs=(("HuggingFaceH4/MATH-500", "data/hub/math500"),), post=parquet_rows("data/math500/test.parquet", n=4)),
    "python -m calibrl_verl.data.validate data/virl39k/train.parquet [--tokenizer MODEL --max-prompt-tokens 20480 "
    "--max-response-tokens 4096]": run(
        "the options given, MODEL -> the tiny models' tokenizer", expect=(VALIDATED, "0 errors"),
        subs=(("[--tokenizer MODEL", "--tokenizer {W}/tokenizer"), ("4096]", "4096"))),
    "python -m calibrl_verl.data.validate data/train.parquet [more.parquet ...] [--expert-key solution] [--no-expert] "
    "[--tokenizer MODEL_OR_DIR --max-prompt-tokens 20480 --max-response-tokens 4096]": run(
        "two tiny parquets, every option given, MODEL_OR_DIR -> the tiny models' tokenizer",
        subs=(("[more.parquet ...]", "data/more.parquet"), ("[--expert-key solution] [--no-expert]",
              "--expert-key solution --no-expert"), ("[--tokenizer MODEL_OR_DIR", "--tokenizer {W}/tokenizer"),
              ("4096]", "4096")),
        expect=("data/train.parquet: 8 rows, 0 errors", "data/more.parquet: 4 rows, 0 errors")),
    # -- README: expert traces ------------------------------------------------------------------------------------
    "export OPENAI_API_KEY=sk-...": not_run("sets a secret key for the OpenAI endpoint"),
    "python -m calibrl_verl.experts generate --data data/virl39k/problems.parquet --out data/virl39k/train.parquet "
    "--base-url https://api.openai.com/v1 --model gpt-4o-2024-08-06 --samples 4 --concurrency 32": covered(
        EXPERTS_CLI, ('"-m", "calibrl_verl.experts", "generate"', '"--base-url"', '"--concurrency"'),
        "needs OpenAI's endpoint and a key; the test runs this CLI against a scripted OpenAI-compatible server",
        help=True),
    "TRAIN_FILES=data/virl39k/train.parquet VAL_FILES=data/geoqa/test.parquet "
    "bash recipes/run_calibrl_qwen2_5vl_7b.sh": dry(config=(("data.val_files", ["{W}/data/geoqa/test.parquet"]),)),
    # -- README: train ----------------------------------------------------------------------------------------------
    "python -m calibrl_verl.main_calibrl --config-name calibrl_qwen2_5vl_7b "
    "data.train_files=data/virl39k/train.parquet data.val_files=data/geoqa/test.parquet "
    "actor_rollout_ref.model.path=Qwen/Qwen2.5-VL-7B-Instruct "
    "calibrl.n_onpolicy=10 calibrl.alpha=0.5": dry(
        config=(("actor_rollout_ref.rollout.n", 11), ("data.train_batch_size", 480), ("calibrl.alpha", 0.5))),
    "bash recipes/run_calibrl_qwen2_5vl_7b.sh": dry(
        config=(("trainer.experiment_name", "calibrl_qwen2_5vl_7b"),
                ("actor_rollout_ref.rollout.tensor_model_parallel_size", 2))),
    "bash recipes/run_calibrl_qwen2_5vl_3b.sh": dry(
        config=(("actor_rollout_ref.model.path", "Qwen/Qwen2.5-VL-3B-Instruct"),
                ("actor_rollout_ref.rollout.tensor_model_parallel_size", 1))),
    "TRAIN_FILES=data/virl39k/train.parquet VAL_FILES=data/geoqa/test.parquet bash recipes/run_calibrl_qwen2_5vl_7b.sh "
    "calibrl.gap=sequence trainer.save_freq=5": dry(config=(("calibrl.gap", "sequence"), ("trainer.save_freq", 5))),
    # its "# also run_{grpo,luffy,rlplus}_qwen3vl_8b.sh": tests/test_recipes_on_cpu.py composes and validates those
    "bash recipes/run_calibrl_qwen3vl_8b.sh": dry(
        config=(("actor_rollout_ref.model.path", "Qwen/Qwen3-VL-8B-Instruct"), ("data.image_patch_size", 16))),
    "bash recipes/run_calibrl_qwen2_5vl_7b_lora.sh": dry(
        config=(("actor_rollout_ref.model.lora_rank", 32), ("actor_rollout_ref.model.lora_alpha", 64),
                ("actor_rollout_ref.model.target_modules", "all-linear"),
                ("actor_rollout_ref.model.exclude_modules", ".*visual.*"),
                ("actor_rollout_ref.actor.optim.lr", 1e-5), ("actor_rollout_ref.rollout.load_format", "safetensors"),
                ("trainer.n_gpus_per_node", 4), ("trainer.experiment_name", "calibrl_qwen2_5vl_7b_lora"))),
    "bash recipes/run_calibrl_qwen3vl_4b.sh": dry(
        config=(("actor_rollout_ref.model.path", "Qwen/Qwen3-VL-4B-Instruct"),
                ("actor_rollout_ref.rollout.tensor_model_parallel_size", 1))),
    # its "# also run_{grpo,luffy,rlplus}_qwen2_5_math_7b.sh": tests/test_recipes_on_cpu.py composes those
    "bash recipes/run_calibrl_qwen2_5_math_7b.sh": dry(
        config=(("actor_rollout_ref.model.path", "Qwen/Qwen2.5-Math-7B"), ("data.max_response_length", 3072),
                ("data.train_files", ["{W}/data/openr1_math/train.parquet"]))),
    "python -m calibrl_verl.main_calibrl --config-name calibrl_seqgap_qwen2_5vl_7b --dry-run": dry(
        why="the README's recipe file, written to the workspace's recipes/ (the checkout's is left alone)",
        subs=(("--config-name", "--config-dir {W}/recipes --config-name"),),
        config=(("calibrl.gap", "sequence"), ("calibrl.sequence_norm", "mean"),
                ("trainer.experiment_name", "calibrl_seqgap_qwen2_5vl_7b"))),
    "bash recipes/run_grpo_qwen2_5vl_7b.sh": dry(
        config=(("calibrl.loss_mode", "grpo"), ("actor_rollout_ref.rollout.n", 10))),
    "bash recipes/run_luffy_qwen2_5vl_7b.sh": dry(config=(("calibrl.loss_mode", "luffy"),)),
    "bash recipes/run_rlplus_qwen2_5vl_7b.sh": dry(config=(("calibrl.loss_mode", "rlplus"),)),
    "bash recipes/run_grpo_qwen2_5vl_7b.sh actor_rollout_ref.actor.entropy_coeff=0.001": dry(
        config=(("actor_rollout_ref.actor.entropy_coeff", 0.001),)),
    "EXP=calibrl_qwen2_5vl_7b_try2 bash recipes/run_calibrl_qwen2_5vl_7b.sh": dry(
        config=(("trainer.experiment_name", "calibrl_qwen2_5vl_7b_try2"),
                ("trainer.default_local_dir", "{W}/checkpoints/calibrl/calibrl_qwen2_5vl_7b_try2"))),
    "bash recipes/run_calibrl_qwen2_5vl_7b.sh trainer.resume_mode=disable": dry(
        config=(("trainer.resume_mode", "disable"),)),
    "bash recipes/run_calibrl_qwen2_5vl_7b.sh trainer.resume_mode=resume_path "
    "trainer.resume_from_path=.../global_step_N": dry(config=(("trainer.resume_mode", "resume_path"),)),
    # -- README / recipes.md: SFT then RL ---------------------------------------------------------------------
    # (the converter first: its replayed call writes the file the SFT dry run then reads)
    "python -m calibrl_verl.data.sft --input data/virl39k/train.parquet --output data/virl39k/sft.parquet": run(
        expect=("rows_written=", "dropped_no_expert=0"), outputs=("data/virl39k/sft.parquet",)),
    "bash recipes/run_sft_qwen2_5vl_7b.sh": dry(
        config=(("data.train_files", ["{W}/data/virl39k/sft.parquet"]), ("data.messages_key", "messages"),
                ("trainer.experiment_name", "sft_qwen2_5vl_7b"),
                ("trainer.default_local_dir", "{W}/checkpoints/calibrl/sft_qwen2_5vl_7b"))),
    "python -m verl.model_merger merge --backend fsdp --local_dir checkpoints/calibrl/sft_qwen2_5vl_7b/global_step_N "
    "--target_dir merged/sft": covered(
        SFT_RUN, ('"verl.model_merger", "merge", "--backend", "fsdp", "--local_dir"', '"--target_dir", "merged/sft"'),
        "needs the 7B SFT run's checkpoint; the test merges a 2-step SFT run of the tiny model (opt-in, -m families)",
        help=True),
    "MODEL_PATH=merged/sft EXP=sft_grpo_qwen2_5vl_7b bash recipes/run_grpo_qwen2_5vl_7b.sh": dry(
        config=(("actor_rollout_ref.model.path", "merged/sft"), ("calibrl.loss_mode", "grpo"),
                ("trainer.experiment_name", "sft_grpo_qwen2_5vl_7b"),
                ("trainer.default_local_dir", "{W}/checkpoints/calibrl/sft_grpo_qwen2_5vl_7b"))),
    # -- README: multi-node --------------------------------------------------------------------------------------
    "ray start --head --port=6379 --num-gpus=8": not_run("starts a Ray head node of a GPU cluster"),
    "ray start --address=<node-0 IP>:6379 --num-gpus=8": not_run("joins a Ray cluster of GPU nodes"),
    "NNODES=2 bash recipes/run_calibrl_qwen2_5vl_7b.sh actor_rollout_ref.actor.ppo_mini_batch_size=96": dry(
        config=(("trainer.nnodes", 2), ("actor_rollout_ref.actor.ppo_mini_batch_size", 96))),
    "NNODES=2 bash recipes/run_grpo_qwen2_5vl_7b.sh actor_rollout_ref.actor.ppo_mini_batch_size=96": dry(
        config=(("trainer.nnodes", 2), ("calibrl.loss_mode", "grpo"))),
    # -- docs/multinode.md: the two-node test's steps ----------------------------------------------------------
    "ray start": mention(),
    "ray start --head": mention(),
    "ray status": mention(),
    "ray stop": mention(),
    "ray get-auth-token --generate": not_run("writes a Ray token into ~/.ray/auth_token, shared by every cluster of "
                                             "this host's user"),
    "export CALIBRL_DEVICE=cpu VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda VLLM_CPU_KVCACHE_SPACE=1": covered(
        NODES, ("**cpu_env()",), "the test gives both raylets the CPU backend's environment",
        via=(("calibrl_verl/cpu/settings.py", ('SWITCH_ENV: SWITCH_VALUE', '"VERL_PLATFORM": "cpu"',
                                                '"VERL_ENGINE_DEVICE": "cuda"', '"VLLM_CPU_KVCACHE_SPACE", "1"')),)),
    "export RAY_AUTH_MODE=token RAY_agent_register_timeout_ms=120000": covered(
        NODES, ('"RAY_AUTH_MODE": "token"', '"RAY_agent_register_timeout_ms": "120000"', "**CLUSTER_ENV"),
        "the test sets them for both raylets and the driver"),
    "ray start --head --port=46379 --include-dashboard=false --temp-dir=/tmp/crn --num-cpus=8 --num-gpus=1 "
    "--object-store-memory=300000000 --disable-usage-stats --node-manager-port=46380 --object-manager-port=46381 "
    "--min-worker-port=46400 --max-worker-port=46499 --dashboard-agent-listen-port=46382 "
    "--dashboard-agent-grpc-port=46383 --metrics-export-port=46384 --runtime-env-agent-port=46385": covered(
        NODES, ("ray_start_commands(",), "the test's node 0 (its --temp-dir: /tmp/crn_<run tag>)",
        via=((NODES_FILE, ('"start", "--head", f"--port={HEAD_PORT}", "--include-dashboard=false"',
                           "HEAD_PORT = 46379", "NODE_CPUS = 8",
                           'f"--num-cpus={NODE_CPUS}", "--num-gpus=1", "--object-store-memory=300000000"',
                           '"--disable-usage-stats"', '{"node-manager-port": 46380, "object-manager-port": 46381, '
                           '"min-worker-port": 46400,',
                           '"max-worker-port": 46499, "dashboard-agent-listen-port": 46382, '
                           '"dashboard-agent-grpc-port": 46383,', '"metrics-export-port": 46384, '
                           '"runtime-env-agent-port": 46385}')),)),
    "ray start --address=$HEAD_IP:46379 --temp-dir=/tmp/crn --num-cpus=8 --num-gpus=1 "
    "--object-store-memory=300000000 --disable-usage-stats --node-manager-port=46390 --object-manager-port=46391 "
    "--min-worker-port=46500 --max-worker-port=46599 --dashboard-agent-listen-port=46392 "
    "--dashboard-agent-grpc-port=46393 --metrics-export-port=46394 --runtime-env-agent-port=46395": covered(
        NODES, ("ray_start_commands(",), "the test's node 1, on this host's address",
        via=((NODES_FILE, ('"start", f"--address={HEAD}", f"--temp-dir={temp_dir}"',
                           '{"node-manager-port": 46390, "object-manager-port": 46391, "min-worker-port": 46500,',
                           '"max-worker-port": 46599, "dashboard-agent-listen-port": 46392, '
                           '"dashboard-agent-grpc-port": 46393,', '"metrics-export-port": 46394, '
                           '"runtime-env-agent-port": 46395}')),)),
    "ray status --address=$HEAD_IP:46379": covered(
        NODES, ("alive_nodes()",), "the test reads the same node list from ray.nodes() (2 alive, GPU 1 each)",
        via=((NODES_FILE, ("ray.nodes() if n['Alive']", "len(nodes) == 2")),)),
    "RAY_ADDRESS=$HEAD_IP:46379 bash recipes/run_calibrl_tiny_cpu.sh ray_kwargs.ray_init.num_cpus=null "
    "ray_kwargs.ray_init.num_gpus=null trainer.nnodes=2 trainer.n_gpus_per_node=1": covered(
        NODES, ('"RAY_ADDRESS": HEAD', "tiny_command()"), "the two-node test's run (opt-in, -m nodes)",
        via=((NODES_FILE, ('"run_calibrl_tiny_cpu.sh"', '"ray_kwargs.ray_init.num_cpus=null", '
                           '"ray_kwargs.ray_init.num_gpus=null",',
                           'f"trainer.nnodes={nnodes}", "trainer.n_gpus_per_node=1"',
                           "multinode_overrides(2)")),)),
    # -- README: evaluate, compare, curves -----------------------------------------------------------------------
    "python -m verl.model_merger merge --backend fsdp --local_dir "
    "checkpoints/calibrl/calibrl_qwen2_5vl_7b/global_step_20/actor --target_dir merged/step_20": covered(
        COVERAGE, ("SCRIPT",), "needs a 7B run's FSDP checkpoint; the coverage smoke test merges its tiny run's",
        via=((COVERAGE_SCRIPT, ("-m calibrl_verl.study.coverage",)),
             ("calibrl_verl/study/coverage.py", ('"verl.model_merger", "merge", "--backend", "fsdp", "--local_dir"',))),
        help=True),
    "python -m calibrl_verl.evaluate --model merged/step_20 --data data/geometry3k/test.parquet "
    "data/geoqa/test.parquet data/eval/mathvista_testmini.parquet --out eval/step_20 --tp 2": covered(
        f"{EVALUATE}::test_vllm_cli_on_cpu_matches_the_hf_backend", ('"calibrl_verl.evaluate"', '"vllm", rows'),
        GPU_MODEL + " (--tp 2); the test runs the CLI on the tiny model with vLLM's CPU build", help=True),
    "python -m calibrl_verl.evaluate --model merged/step_20 --data data/geoqa/test.parquet --n-samples 32 "
    "--temperature 1.0 --seed 0 --out eval/step_20_k32": covered(
        f"{EVALUATE}::test_vllm_cli_on_cpu_samples_k_answers_per_problem", ('"--n-samples"',),
        GPU_MODEL + "; the test samples K answers per problem through the CLI on the tiny model", help=True),
    "python -m calibrl_verl.evaluate --model merged/text_step_20 --name-by data_source --max-new-tokens 3072 "
    "--data data/math500/test.parquet data/eval/aime24.parquet data/eval/aime25.parquet data/eval/amc23.parquet "
    "data/eval/minerva.parquet data/eval/olympiadbench.parquet": covered(
        f"{EVALUATE}::test_vllm_cli_on_cpu_text_model_matches_the_hf_backend",
        ('"calibrl_verl.evaluate"', 'model="text_model", data="math500"'),
        GPU_MODEL + " (text); the test evaluates the tiny text model on a MATH-500-layout file", help=True),
    "python -m calibrl_verl.evaluate --model Qwen/Qwen2.5-VL-7B-Instruct --protocol community --data "
    "data/eval/mathvista_testmini.parquet data/eval/mmmu_val.parquet --out eval/base_community --judge-base-url "
    "https://api.openai.com/v1 --judge-model gpt-4o-2024-11-20": covered(
        f"{PROTOCOLS}::test_community_judge_scores_beside_the_rules_and_a_rerun_asks_nothing",
        ('"--protocol", "community"', '"--judge-base-url"', '"--judge-model"'),
        GPU_MODEL + " and an OpenAI key; the test runs the community protocol on every benchmark layout with a "
        "scripted OpenAI-compatible judge", help=True),
    "python -m calibrl_verl.evaluate_compare eval/base eval/grpo eval/step_20 --names base grpo calibrl "
    "--metric accuracy --out eval/comparison": run(
        "the three run folders hold summary.json files made by calibrl_verl.eval_metrics from sample rows",
        outputs=("eval/comparison/comparison.md", "eval/comparison/comparison.csv")),
    "python -m calibrl_verl.plots run_a.jsonl run_b.jsonl --out curves.png": run(
        "two verl file-logger JSONL files of 3 steps", outputs=("curves.png",)),
    # -- README / study pages: the studies -----------------------------------------------------------------------
    f"bash {TOY_SCRIPT}": covered(TOY, ("grid.run_grid(", "report.write_report("),
                                  "the full grid is 24 runs, 43 minutes; the smoke test runs its fast preset",
                                  wrapper=True, calls=(*TOY_CALLS, "--preset full")),
    f"bash {COVERAGE_SCRIPT}": covered(
        COVERAGE, ("SCRIPT", '"PRESET": "fast"'), "the full grid is 18 runs of ~13 minutes; the smoke test runs "
        "this script with PRESET=fast", wrapper=True,
        calls=("-m calibrl_verl.study.coverage --out", "-m calibrl_verl.study.coverage_report --study")),
    f"JOBS=2 bash {TOY_SCRIPT}": not_run("two launches at once need > 28 GB of memory", wrapper=True,
                                         calls=("--jobs 2",)),
    f"PRESET=fast bash {TOY_SCRIPT}": covered(TOY, ('grid.PRESETS["fast"]',), "the smoke test runs this preset",
                                              wrapper=True, calls=("--preset fast",)),
    f"bash {TOY_SCRIPT} calibrl.guide_coef=1.0": covered(
        TOY, ("grid.run_grid(",), "24 runs; the overrides pass through the grid to every launch", wrapper=True,
        calls=("--preset full calibrl.guide_coef=1.0",)),
    "python -m calibrl_verl.study.report --study outputs/toy_study --out docs/toy_study [--target 0.5]": covered(
        "tests/test_toy_study_on_cpu.py::test_report_tabulates_and_plots_mean_and_spread",
        ("report.write_report(", "target=0.5"), "needs the grid's logs; the test tabulates a hand-made study",
        subs=(("[--target 0.5]", "--target 0.5"),), help=True),
    "python -m calibrl_verl.tiny.build --family wall --out outputs/wall --warmstart-items 200000": not_run(
        "the paper's SFT: 3125 steps, ~30 minutes on 2 cores", help=True),
    "python -m calibrl_verl.study.coverage --out outputs/coverage_study --seeds 0 1 2 --arms grpo calibrl_a0.5 luffy":
        not_run("9 runs of ~13-20 minutes after the 30-minute SFT", help=True),
    "python -m calibrl_verl.study.coverage --out outputs/coverage_study --seeds 0 1 2 --arms calibrl_allwrong":
        not_run("3 runs of ~13-20 minutes after the 30-minute SFT", help=True),
    "python -m calibrl_verl.study.coverage --out outputs/coverage_study --seeds 0 1 2 --arms grpo_entropy":
        not_run("3 runs of ~15-20 minutes after the 30-minute SFT", help=True),
    "python -m calibrl_verl.study.coverage --out outputs/coverage_study --seeds 0 1 --arms calibrl_seqgap "
    "sft_then_grpo": not_run("4 runs of ~15-20 minutes after the 30-minute SFT (and the SFT on the RL split)",
                             help=True),
    "python -m calibrl_verl.study.coverage --out outputs/coverage_study --seeds 0 1 2 "
    "--arms grpo calibrl_a0.5 luffy calibrl_allwrong grpo_entropy calibrl_seqgap sft_then_grpo":
        not_run("the rest of the grid: about 5 hours on 2 cores", help=True),
    "python -m calibrl_verl.study.coverage_report --study outputs/coverage_study --out docs/coverage_study": covered(
        "tests/test_coverage_study_on_cpu.py::test_report_table_pairs_seeds_and_counts_newly_covered",
        ("coverage_report.main(", '"--study"', '"--out"'), "needs measured runs; the test reports on hand-made ones",
        help=True),
    # -- docs/benchmarks.md -------------------------------------------------------------------------------------
    "python benchmarks/bench_core_algos.py": not_run("480 x 10 x 4096 loss terms: minutes of CPU", help=True),
    "python benchmarks/bench_core_algos.py --sizes 48x10x1024 --pairs 5": not_run(
        "a timing benchmark (seconds to minutes, load-sensitive)", help=True),
    "python benchmarks/bench_core_algos.py --no-terms --e2e": not_run("the per-row loop alone takes ~4 minutes",
                                                                      help=True),
    "python benchmarks/bench_step.py": not_run("six launches of verl's real trainer (~9 minutes)", help=True),
    "python benchmarks/bench_step.py --report outputs/bench_step/results.json --markdown": not_run(
        "reads a saved bench_step run (outputs/ is not committed)", help=True),
    # -- docs/data.md: local teacher, cache ---------------------------------------------------------------------
    "vllm serve Qwen/Qwen2.5-VL-72B-Instruct --tensor-parallel-size 8 --max-model-len 32768 --port 8000": not_run(
        "serves a 72B model on 8 GPUs"),
    "export TEACHER_KEY=EMPTY": not_run("sets the key variable of a running vllm serve"),
    "python -m calibrl_verl.cpu.vllm_cli serve Qwen/Qwen2.5-VL-3B-Instruct --port 8000 --dtype float32": covered(
        "tests/test_vllm_serve_on_cpu.py::test_served_tiny_teacher_answers_the_expert_generator",
        ('"-m", "calibrl_verl.cpu.vllm_cli", "serve"', '"--dtype", "float32"'),
        "downloads a 3B model; the opt-in test (-m serve) serves the tiny model through the module and generates "
        "expert traces against it (its flags are vLLM's own)"),
    "python -m calibrl_verl.experts generate --data data/virl39k/problems.parquet --out data/virl39k/train.parquet "
    "--base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-VL-72B-Instruct --api-key-env TEACHER_KEY "
    "--concurrency 64": covered(
        EXPERTS_CLI, ('"-m", "calibrl_verl.experts", "generate"', '"--api-key-env"'),
        "needs the 72B teacher; the test runs this CLI against a scripted OpenAI-compatible server", help=True),
    "python -m calibrl_verl.evaluate --data data/virl39k/train.failures.parquet ...": covered(
        f"{EVALUATE}::test_end_to_end_with_the_tiny_model", ("evaluate.main(", '"--data"'), GPU_MODEL,
        subs=(("...", "--model merged/step_20"),), help=True),
    "grep -v '\"verdict\": \"error\"' OUT.cache.jsonl > c && mv c OUT.cache.jsonl": run(
        "OUT -> a cache of three attempts (one an error) written by the generator's own AttemptCache",
        subs=(("OUT.cache.jsonl", "data/gen.parquet.cache.jsonl"),),
        post=cache_without_errors("data/gen.parquet.cache.jsonl")),
    # -- docs/evaluation.md, recipes.md, reliability.md ---------------------------------------------------------
    "python -m calibrl_verl.evaluate_compare RUN_DIR ... --names ... --out DIR": run(
        "RUN_DIR ... -> two run folders, DIR -> eval/cmp",
        subs=(("RUN_DIR ...", "eval/base eval/grpo"), ("--names ...", "--names base grpo"), ("DIR", "eval/cmp")),
        outputs=("eval/cmp/comparison.md",)),
    "diff recipes/methods/calibrl.yaml recipes/methods/luffy.yaml": run(
        rc=1, expect=("<   loss_mode: calibrl", ">   loss_mode: luffy")),
    "python -m calibrl_verl.main_calibrl --config-name calibrl_qwen2_5vl_7b [--dry-run] [key=value ...]": dry(
        why="the optional parts given; the workspace's recipes/, so that <repo> (the recipes' data/ defaults) is the "
            "workspace, as in a checkout",
        subs=(("[--dry-run]", "--dry-run"), ("[key=value ...]", "calibrl.alpha=0.3"),
              ("--config-name", "--config-dir {W}/recipes --config-name")),
        config=(("calibrl.alpha", 0.3),)),
    "bash recipes/run_<recipe>.sh --help": run(
        "every GPU recipe's run script", expect=("ok",),
        subs=(("bash recipes/run_<recipe>.sh --help", f'for s in {RUN_SCRIPTS}; do bash "$s" --help | grep -q '
               "'^  TRAIN_FILES' || exit 1; done; echo ok"),)),
    "wandb login": not_run("stores a wandb key (network); test_recipes checks that a stored key adds the logger"),
    "pytest tests/FILE::TEST": not_run("a placeholder for the tests the page names; they are checked to exist",
                                       check=the_named_tests_exist("docs/reliability.md")),
    "python -m calibrl_verl.soak --steps 200 --save-freq 20 --out outputs/soak": not_run(
        "one launch of verl's real trainer for 200 steps (tens of minutes, ~13.5 GB of RAM); tests/test_soak_on_cpu.py "
        "checks its fit, process groups, sampler and checkpoint checks without a launch", help=True),
    "python -m calibrl_verl.soak --report outputs/soak": covered(
        "tests/test_soak_on_cpu.py::test_report_of_a_saved_run_passes_flat_memory_and_fails_growth",
        ('soak.main(["--report"',), "needs a saved soak run; the test reports on a hand-made one", help=True),
    "python -m calibrl_verl.plots <metrics.jsonl or tensorboard folder>": run(
        "the placeholder -> one file-logger JSONL", subs=(("<metrics.jsonl or tensorboard folder>", "run_a.jsonl"),),
        outputs=("curves.png",)),
    # -- docs/cpu_backend.md, algorithm.md, architecture.md --------------------------------------------------------
    "python -m calibrl_verl.tiny.build --out DIR": covered(
        "tests/test_tiny_assets_on_cpu.py::test_build_writes_every_asset", ("build_info.json",),
        "the full build with its warm-start (~30 s): the tiny-assets tests build it (in-process, same build())",
        via=(("tests/test_tiny_assets_on_cpu.py", ("from calibrl_verl.tiny.build import", "build(root")),),
        subs=(("DIR", "outputs/tiny"),), help=True),
    "python -m calibrl_verl.smoke run --family qwen3_vl --steps 2": covered(
        "tests/test_smoke_qwen3vl_on_cpu.py::test_calibrl_trains_a_tiny_qwen3_vl", ("launch.run(", 'family="qwen3_vl"'),
        "a 2-minute launch of verl's trainer (the test is marked families: bash scripts/test.sh -m families)",
        help=True),
    "python -m calibrl_verl.smoke run --family text --steps 2": covered(
        "tests/test_smoke_text_on_cpu.py::test_calibrl_trains_the_text_model_end_to_end",
        ("launch.run(", 'family="text"'),
        "a launch of verl's trainer (the test is marked families: bash scripts/test.sh -m families)", help=True),
    "python -m calibrl_verl.experts generate --samples N --keep all": covered(
        "tests/test_experts_on_cpu.py::test_keep_all_takes_every_sample_and_keeps_each_distinct_verified_trace",
        ('"--keep", "all"',), "needs a teacher; the test runs it against a scripted server",
        subs=(("N", "4"),), help=True),
    "python -m calibrl_verl.smoke check --dump-dir": covered(
        f"{SMOKE_TINY}::test_smoke_check_fails_a_sign_flipped_luffy_loss_from_the_dump", ("smoke.check(", "dump_dir="),
        "needs a run's metrics and dumps", subs=(("--dump-dir", "metrics.jsonl --steps 2 --dump-dir dump"),),
        help=True),
    "python -m calibrl_verl.smoke check METRICS.jsonl --steps N --loss-mode MODE --dump-dir DIR": covered(
        f"{SMOKE_TINY}::test_smoke_check_fails_a_sign_flipped_luffy_loss_from_the_dump", ("smoke.check(", "dump_dir="),
        "needs a run's metrics and dumps", subs=(("--steps N", "--steps 2"), ("MODE", "luffy")), help=True),
    # -- names only -------------------------------------------------------------------------------------------------
    "vllm": mention("the package's name"),
    "vllm serve": mention("vLLM's OpenAI server, named; the command is in docs/data.md"),
    "python -m calibrl_verl.main_calibrl": mention(),
    "python -m calibrl_verl.data.validate": mention(),
    "python -m calibrl_verl.data.sft": mention(),
    "python -m calibrl_verl.smoke run": mention(),
    "python -m calibrl_verl.experts generate": mention(),
    "python -m calibrl_verl.evaluate": mention(),
    "python -m calibrl_verl.evaluate_compare": mention(),
    "python -m calibrl_verl.study.coverage": mention(),
    "python -m calibrl_verl.study.coverage_report": mention(),
    "python -m calibrl_verl.study.grid": mention(),
    "python -m calibrl_verl.soak": mention(),
}  # fmt: skip


def entries(kind: str) -> list[str]:
    return [key for key, entry in COMMANDS.items() if entry.kind == kind]


def short(key: str) -> str:
    return key if len(key) <= 70 else key[:67] + "..."


# -- what the docs hold --------------------------------------------------------------------------------------------
def test_every_documented_command_is_classified() -> None:
    new = [f"{c.file}:{c.line}: {c.text}" for c in docs.all_commands() if c.text not in COMMANDS]
    assert not new, "commands in the docs with no entry in COMMANDS (add one: run, dry_run, covered_by, not_run):\n" + \
        "\n".join(new)  # fmt: skip


def test_every_entry_is_still_documented() -> None:
    documented = {c.text for c in docs.all_commands()}
    stale = [key for key in COMMANDS if key not in documented]
    assert not stale, f"entries of COMMANDS no longer in the docs (remove them): {stale}"
    assert {entry.kind for entry in COMMANDS.values()} <= {"run", "dry_run", "covered_by", "not_run", "mention"}
    for key, entry in COMMANDS.items():
        assert entry.kind in ("run", "dry_run") or entry.why, f"{key}: say why it is not run"
        assert entry.kind != "covered_by" or entry.test, key


def test_shell_blocks_hold_only_commands_and_other_blocks_none() -> None:
    """A code block is commands throughout, or none: a command inside a prose-like block would be missed."""
    for path in docs.doc_files():
        for block in docs.code_blocks(path.read_text()):
            if block.fence is not None and block.fence not in docs.SHELL_FENCES:
                continue  # ```python, ```yaml: code, not commands
            shell = docs.is_shell_block(block)
            what = "not a command, in a shell block" if shell else "a command, in a block that is not shell"
            for line, command in docs.block_commands(block):
                where = f"{path.relative_to(REPO)}:{line}"
                assert bool(docs.COMMAND_RE.match(command)) == shell, f"{where}: {what}: {command}"


def test_the_parser_joins_continuations_and_cuts_comments() -> None:
    text = ("Intro:\n\n    # a comment line\n    A=1 python -m x --a b \\\n        --c d   # trailing note\n"
            "    bash s.sh\n\nProse with `bash t.sh --x` and `the_name` and\n`LOSS_MODE=grpo bash\nu.sh`.\n\n"
            "    hydra:\n      key: value\n")  # fmt: skip
    blocks = docs.code_blocks(text)
    assert [docs.is_shell_block(b) for b in blocks] == [True, False]
    assert docs.block_commands(blocks[0]) == [(4, "A=1 python -m x --a b --c d"), (6, "bash s.sh")]
    assert docs.inline_commands(text) == [(8, "bash t.sh --x"), (9, "LOSS_MODE=grpo bash u.sh")]


# -- the workspace: the checkout's recipes and examples, tiny inputs -------------------------------------------------
SHIM = """#!/usr/bin/env bash
# test_docs_commands_on_cpu.py: records one python call (cwd, argv, environment) instead of running it
out="$DOCS_RECORD_DIR/$(date +%s%N)-$$"
{ printf '%s\\0' "$PWD" "$#" "$@"; env -0; } > "$out.tmp" && mv "$out.tmp" "$out"
"""


# the tiny models' tokenizer (calibrl_verl.tiny.build saves it with each model), for data.validate --tokenizer
TOKENIZER = """
from calibrl_verl.tiny.models import build_tokenizer
from calibrl_verl.tiny.task import tokenizer_corpus
build_tokenizer(tokenizer_corpus(0)).save_pretrained("{out}")
"""


def readme_recipe() -> str:
    """The README's example recipe (the YAML block under "Make a new recipe")."""
    for block in docs.code_blocks((REPO / "README.md").read_text()):
        text = "\n".join(block.lines)
        if "experiment_name: ${oc.env:EXP,calibrl_seqgap_qwen2_5vl_7b}" in text:
            return text + "\n"
    raise AssertionError("the README's example recipe is gone")


def build_workspace(w: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from calibrl_verl.eval_metrics import benchmark_summary
    from calibrl_verl.experts.cache import AttemptCache
    from calibrl_verl.tiny import task, text_task

    (w / "recipes").mkdir()
    for item in (REPO / "recipes").iterdir():
        (w / "recipes" / item.name).symlink_to(item)
    (w / "recipes" / "calibrl_seqgap_qwen2_5vl_7b.yaml").write_text(readme_recipe())
    (w / "examples").symlink_to(REPO / "examples")
    (w / "home").mkdir()
    for name in ("shim", "fakevenv/bin"):
        (w / name).mkdir(parents=True)
    for path in (w / "shim" / "python", w / "shim" / "python3", w / "fakevenv" / "bin" / "python"):
        path.write_text(SHIM)
        path.chmod(0o755)

    def parquet(path: Path, records: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(records), path)

    def image(item: task.TinyItem, path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        item.image.save(path)
        return str(path.relative_to(w / "data" / "raw"))

    # the data files the recipes default to, and data.validate's: the tiny task's verl RL parquet
    vl, text = task.make_items(8, 0, "train"), text_task.make_items(8, 0, "train")
    for name in ("virl39k/train", "geometry3k/test", "geoqa/test", "train"):
        task.write_parquet(vl, "train", w / "data" / f"{name}.parquet")
    task.write_parquet(vl[:4], "val", w / "data" / "more.parquet")
    text_task.write_parquet(text, "train", w / "data" / "openr1_math" / "train.parquet")
    text_task.write_parquet(text, "test", w / "data" / "math500" / "test.parquet")

    # raw inputs of the prep scripts, in each source's layout, from the tiny task's items
    raw, items = w / "data" / "raw", task.make_items(6, 1, "raw")
    categories = ["(GradeSchool) Geometric", "Geometry", "Chart", "geometric reasoning", "Geometric", "Chart"]
    problems = [{"qid": f"v{i}", "question": it.question, "answer": it.answer, "category": categories[i],
                 "image": [image(it, raw / "images" / f"v{i}.png")]} for i, it in enumerate(items)]  # fmt: skip
    parquet(raw / "virl39k.parquet", problems)
    (raw / "cots.jsonl").write_text("".join(json.dumps({"id": f"v{i}", "cot": it.solution}) + "\n"
                                            for i, it in enumerate(items)))  # fmt: skip
    counts = [it for it in task.make_items(12, 2, "raw") if it.kind == "count"][:3]
    geoqa = [{"id": i, "subject": it.question, "choices": ["1", "2", "3", "4"], "label": int(it.answer) - 1,
              "answer": it.answer, "image": image(it, raw / "geoqa" / f"{i}.png")} for i, it in enumerate(counts)]
    (raw / "geoqa_test.json").write_text(json.dumps(geoqa))
    parquet(w / "data" / "hub" / "geometry3k" / "test-00000-of-00001.parquet",
            [{"images": [{"bytes": task.png_bytes(it.image), "path": None}], "problem": f"<image>{it.question}",
              "answer": it.answer, "id": i} for i, it in enumerate(counts)])  # fmt: skip
    parquet(w / "data" / "hub" / "mathvista" / "testmini-00000-of-00001.parquet",
            [{"pid": str(i), "question": it.question, "image": f"images/{i}.png", "choices": None,
              "decoded_image": {"bytes": task.png_bytes(it.image), "path": None}, "answer": it.answer,
              "question_type": "free_form"} for i, it in enumerate(counts[:2])])  # fmt: skip
    sums = text_task.make_items(4, 3, "raw")
    math500 = [{"problem": it.question, "answer": it.answer, "solution": "...", "unique_id": f"test/{i}.json"}
               for i, it in enumerate(sums)]  # fmt: skip
    (raw / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math500))
    parquet(w / "data" / "hub" / "math500" / "test-00000-of-00001.parquet", math500)

    def r1(it: text_task.TextItem, answer: str) -> str:
        return f"<think>\n{it.question} The answer is {answer}.\n</think>\n\nSo the result is $\\boxed{{{answer}}}$."

    parquet(raw / "openr1_math" / "default" / "train-00000-of-00001.parquet",
            [{"problem": it.question, "answer": it.answer, "uuid": f"u{i}", "generations": [r1(it, it.answer)],
              "correctness_math_verify": [True], "is_reasoning_complete": [True]} for i, it in enumerate(sums[:3])]
            + [{"problem": sums[3].question, "answer": sums[3].answer, "uuid": "u3", "generations": [],
                "correctness_math_verify": [], "is_reasoning_complete": []}])  # fmt: skip

    # evaluate's summary.json per run (eval_metrics.benchmark_summary of sample rows), file-logger metrics, a cache
    for run_dir, right in (("base", 1), ("grpo", 2), ("step_20", 3)):
        rows = [{"id": f"p{i}", "sample": 0, "correct": i < right, "extracted": "A"} for i in range(4)]
        how = {"protocol": "calibrl", "temperature": 0.0, "top_p": 1.0, "seed": 0}
        summary = {bench: {**how, **benchmark_summary(rows)} for bench in ("geoqa/test", "mathvista_testmini")}
        (w / "eval" / run_dir).mkdir(parents=True)
        (w / "eval" / run_dir / "summary.json").write_text(json.dumps(summary))
    for name, shift in (("run_a", 0.0), ("run_b", 0.1)):
        lines = [{"step": s, "data": {"training/global_step": s, "critic/score/mean": 0.3 + shift + 0.1 * s,
                                      "calibrl/guide_loss": -0.01 * s, "calibrl/gate_full_frac": 0.2,
                                      "actor/entropy": 0.2 - 0.01 * s}} for s in (1, 2, 3)]  # fmt: skip
        (w / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cache = AttemptCache(w / "data" / "gen.parquet.cache.jsonl")
    for problem, verdict in (("p1", "correct"), ("p2", "error"), ("p3", "wrong")):
        cache.append({"problem": problem, "id": problem, "sample": 0, "verdict": verdict, "model": "m",
                      "response": "<think>t</think><answer>1</answer>" if verdict != "error" else None,
                      "error": "HTTP 503" if verdict == "error" else None})  # fmt: skip
    cache.close()


def command_env(w: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(HOME=str(w / "home"), VENV=str(w / "fakevenv"), MPLBACKEND="Agg",
               PATH=os.pathsep.join([str(w / "shim"), str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def substituted(key: str, entry: Entry, w: Path) -> str:
    text = key
    for old, new in entry.subs:
        assert old in text, f"{key}: nothing to replace for {old!r}"
        text = text.replace(old, new.replace("{W}", str(w)))
    return text


def recorded_calls(record_dir: Path, w: Path) -> list[dict]:
    """The python calls the shim recorded, in order, as runner jobs (cwd, argv, environment without the shim)."""
    calls = []
    for path in sorted(record_dir.iterdir(), key=lambda p: (int(p.name.split("-")[0]), p.name)):
        fields = path.read_bytes().split(b"\0")
        cwd, argc = fields[0].decode(), int(fields[1])
        argv = [f.decode() for f in fields[2 : 2 + argc]]
        env = dict(f.decode().split("=", 1) for f in fields[2 + argc :] if b"=" in f)
        env.pop("DOCS_RECORD_DIR", None)
        env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(w / "shim"))
        if argv[:1] != ["-c"]:  # the wrappers' "is the venv there" probe
            calls.append({"cwd": cwd, "argv": argv, "env": env})
    return calls


def help_job(argv: list[str], cwd: str, env: dict[str, str]) -> dict:
    return {"cwd": cwd, "argv": [*argv, "--help"], "env": env, "timeout": 120}


def python_argv(command: str) -> list[str]:
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words.pop(0)
    assert words[0] in ("python", "python3"), command
    return words[1:]


@dataclass
class Executed:
    workspace: Path
    shell: dict[str, subprocess.CompletedProcess]  # key -> the bash run (run, dry_run, wrapper)
    jobs: dict[str, list[str]]  # key -> the runner job ids of its python calls
    help_jobs: dict[str, list[tuple[list[str], str]]]  # key -> (argv, job id) of its --help checks
    results: dict[str, dict]  # job id -> rc, out, err, seconds


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Executed:
    """Every run / dry_run command through bash (python recorded), then every python call in one interpreter."""
    w = tmp_path_factory.mktemp("docs_workspace")
    build_workspace(w)
    env = command_env(w)
    plain = {**env, "PATH": env["PATH"].split(os.pathsep, 1)[1]}  # without the recorder
    jobs: list[dict] = [{"id": "tokenizer", "cwd": str(w), "env": plain, "code": TOKENIZER.format(out=w / "tokenizer")}]
    shell, job_ids, help_ids = {}, {}, {}
    for index, (key, entry) in enumerate(COMMANDS.items()):
        job_ids[key], help_ids[key] = [], []
        command = substituted(key, entry, w) if entry.kind in ("run", "dry_run") else key
        if entry.kind == "dry_run":
            command += " --dry-run"
        if entry.kind in ("run", "dry_run") or entry.wrapper:
            record = w / "records" / str(index)
            record.mkdir(parents=True)
            shell[key] = subprocess.run(["bash", "-c", command], cwd=w, env={**env, "DOCS_RECORD_DIR": str(record)},
                                        capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
            for k, call in enumerate(recorded_calls(record, w)):
                if entry.kind in ("run", "dry_run"):
                    jobs.append({**call, "id": f"{index}.{k}"})
                    job_ids[key].append(f"{index}.{k}")
                else:  # a wrapper: its calls are only parsed
                    jobs.append({**help_job(call["argv"], call["cwd"], call["env"]), "id": f"{index}.{k}.help"})
                    help_ids[key].append((call["argv"], f"{index}.{k}.help"))
        if entry.help:
            argv = python_argv(substituted(key, entry, w))
            jobs.append({**help_job(argv, str(REPO), plain), "id": f"{index}.help"})
            help_ids[key].append((argv, f"{index}.help"))
    spec = w / "jobs.json"
    spec.write_text(json.dumps(jobs))
    out = w / "results.json"
    batch = subprocess.run([sys.executable, str(Path(__file__).with_name("docs_commands.py")), str(spec), str(out)],
                           cwd=REPO, env=plain, capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert batch.returncode == 0 and out.exists(), batch.stderr[-5000:]
    results = json.loads(out.read_text())
    assert results["tokenizer"]["rc"] == 0, results["tokenizer"]["err"][-3000:]
    return Executed(w, shell, job_ids, help_ids, results)


def output_of(executed: Executed, key: str) -> str:
    result = executed.shell[key]
    parts = [result.stdout, result.stderr]
    for job in executed.jobs[key]:
        parts += [executed.results[job]["out"], executed.results[job]["err"]]
    return "\n".join(parts)


def check_help(executed: Executed, key: str) -> None:
    """Each help job exited 0 (argparse took the command's values) and its help names every --flag used."""
    for argv, job in executed.help_jobs[key]:
        result = executed.results[job]
        text = result["out"] + result["err"]
        assert result["rc"] == 0 and "usage:" in text, (argv, text[-3000:])
        for flag in {word.split("=", 1)[0] for word in argv if word.startswith("--")}:
            assert re.search(rf"{re.escape(flag)}(?![\w-])", text), f"{key}: {flag} is not an option of {argv[:3]}"


def node_source(node: str) -> str:
    """A test function's source, with the module's fixtures it takes and helpers it calls (one level), and the
    module's top-level code (constants such as SCRIPT)."""
    path, name = node.split("::")
    source = (REPO / path).read_text()
    tree = ast.parse(source)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    assert name.startswith("test_") and name in functions, f"{node}: no such test"
    test = functions[name]
    used = {a.arg for a in test.args.args} | {n.func.id for n in ast.walk(test)
                                              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    parts = [test] + [functions[n] for n in sorted(used) if n in functions and n != name]
    parts += [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    return "\n".join(ast.get_source_segment(source, n) or "" for n in parts)


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


# -- the classes --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", entries("run"), ids=short)
def test_run(executed: Executed, key: str) -> None:
    entry, w = COMMANDS[key], executed.workspace
    text = output_of(executed, key)
    if executed.jobs[key]:
        for job in executed.jobs[key]:
            assert executed.results[job]["rc"] == entry.rc, text[-4000:]
    else:
        assert executed.shell[key].returncode == entry.rc, text[-4000:]
    for needle in entry.expect:
        assert needle in text, f"{needle!r} not in the output:\n{text[-4000:]}"
    for path in entry.outputs:
        assert (w / path).is_file() and (w / path).stat().st_size > 0, path
    if entry.post:
        entry.post(w)


def config_value(config: dict, dotted: str) -> object:
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("key", entries("dry_run"), ids=short)
def test_dry_run(executed: Executed, key: str) -> None:
    entry, w = COMMANDS[key], executed.workspace
    assert executed.shell[key].returncode == 0, executed.shell[key].stderr[-3000:]
    assert len(executed.jobs[key]) == 1, executed.jobs[key]  # one launch
    for job in executed.jobs[key]:
        result = executed.results[job]
        assert result["rc"] == 0 and PASSED in result["err"], result["err"][-4000:]
        assert "[calibrl] dry run: missing" not in result["err"], result["err"][-4000:]
    config = yaml.load(executed.results[executed.jobs[key][0]]["out"], Loader=yaml.CSafeLoader)
    for dotted, value in entry.config:
        value = [v.replace("{W}", str(w)) for v in value] if isinstance(value, list) else value
        value = value.replace("{W}", str(w)) if isinstance(value, str) else value
        assert config_value(config, dotted) == value, dotted


@pytest.mark.parametrize("key", entries("covered_by"), ids=short)
def test_covered_by(executed: Executed, key: str) -> None:
    entry = COMMANDS[key]
    source = node_source(entry.test)
    for needle in entry.needles:
        assert needle in source, f"{entry.test} does not contain {needle!r}: it may no longer run {key!r}"
    for path, needles in entry.via:
        text = (REPO / path).read_text()
        for needle in needles:
            assert needle in text, f"{path} does not contain {needle!r}"
    cheap_checks(executed, key)


@pytest.mark.parametrize("key", entries("not_run"), ids=short)
def test_not_run(executed: Executed, key: str) -> None:
    cheap_checks(executed, key)


def cheap_checks(executed: Executed, key: str) -> None:
    entry = COMMANDS[key]
    check_help(executed, key)
    if entry.wrapper:
        assert executed.shell[key].returncode == 0, executed.shell[key].stderr[-3000:]
        calls = [" ".join(argv) for argv, _ in executed.help_jobs[key]]
        assert calls, f"{key}: the wrapper made no python call"
        for needle in entry.calls:
            assert any(needle in call for call in calls), (needle, calls)
    if entry.check:
        entry.check()


@pytest.mark.parametrize("key", entries("mention"), ids=short)
def test_mention(key: str) -> None:
    words = key.split()
    if words[0] == "python":
        assert importlib.util.find_spec(words[2]) is not None, key
    else:
        assert importlib.util.find_spec(words[0]) is not None or shutil.which(words[0]), key


# The team's notes outside the repository: a user has none of them, so nothing shipped may cite them. (Written as
# parts so that this file does not match itself.)
OUTSIDE_NOTES = ("SPEC" + ".md", "VLLM" + "_ON_CPU", "VERL" + "_ON_CPU", "EXPERT" + "_HOOK_NOTES", "../" + "shared/")
SHIPPED_TEXT = ("*.py", "*.md", "*.sh", "*.yaml", "*.toml", "*.txt", "*.cfg")


def test_nothing_shipped_cites_a_file_outside_the_repository() -> None:
    skip = {".venv", ".git", "outputs", "checkpoints", "data", "node_modules"}
    hits = []
    for pattern in SHIPPED_TEXT:
        for path in REPO.rglob(pattern):
            if skip & set(path.relative_to(REPO).parts) or not path.is_file():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                hits += [f"{path.relative_to(REPO)}:{number}: {name}" for name in OUTSIDE_NOTES if name in line]
    assert not hits, "references to files users do not have:\n" + "\n".join(hits)
