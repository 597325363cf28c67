"""SFT-then-RL: the SFT parquet made from the RL parquet (calibrl_verl.data.sft), verl 0.9.1's own SFT dataset
reading it with the tiny Qwen2.5-VL processor (images included), and recipes/run_sft_qwen2_5vl_7b.sh's dry run.

Expected values are written by hand from the rows below."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from calibrl_verl.data import prep
from calibrl_verl.data.sft import SFTDataError, convert, main, sft_rows
from calibrl_verl.sft_dry_run import PASSED

REPO = Path(__file__).resolve().parents[1]
PNG_A, PNG_B = b"\x89PNG-a", b"\x89PNG-b"  # never decoded by the converter


def rl_row(i: int, solution, images: list[bytes], prompt: str = "<image>Q?") -> dict:
    return {"data_source": "virl39k", "prompt": [{"role": "user", "content": prompt}],
            "images": [{"bytes": b} for b in images], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "3"},
            "extra_info": {"split": "train", "index": i, "id": f"v{i}", "question": "Q?", "answer": "3", "meta": ""},
            "solution": solution}  # fmt: skip


ROWS = [
    rl_row(0, "<think>a</think><answer>3</answer>", [PNG_A]),
    rl_row(1, "", [PNG_B]),  # no expert: dropped
    rl_row(2, ["<think>b</think><answer>3</answer>", "<think>c</think><answer>3</answer>"], [PNG_A]),
    rl_row(3, "<think>see <image></think><answer>3</answer>", [PNG_B]),  # would be an image placeholder: dropped
    rl_row(4, None, []),  # parquet null: no expert
]


def write_rl(path: Path, rows: list[dict]) -> Path:
    """The prep scripts' schema; with a list of traces in some row, ``experts generate --keep all``'s list column."""
    schema = prep.OUTPUT_SCHEMA
    if any(isinstance(row["solution"], list) for row in rows):
        index = schema.get_field_index("solution")
        schema = schema.set(index, pa.field("solution", pa.list_(pa.string())))
        rows = [{**row, "solution": [row["solution"]] if isinstance(row["solution"], str) else row["solution"]}
                for row in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_first_trace_per_row_and_the_drops_are_counted() -> None:
    out, stats = sft_rows(ROWS)
    assert [r["id"] for r in out] == ["v0", "v2"]
    assert out[0]["messages"] == [{"role": "user", "content": "<image>Q?"},
                                  {"role": "assistant", "content": "<think>a</think><answer>3</answer>"}]
    assert out[1]["messages"][1]["content"] == "<think>b</think><answer>3</answer>"  # the first of two
    assert out[0]["images"] == [{"bytes": PNG_A}] and out[0]["data_source"] == "virl39k"
    assert (stats["rows_read"], stats["rows_written"], stats["dropped_no_expert"],
            stats["dropped_image_token_in_expert"]) == (5, 2, 2, 1)  # fmt: skip


def test_all_traces_gives_one_row_per_distinct_trace() -> None:
    rows = [rl_row(0, ["<think>x</think><answer>3</answer>", "<think>y</think><answer>3</answer>",
                       "<think>x</think><answer>3</answer>"], [PNG_A])]  # fmt: skip
    out, stats = sft_rows(rows, traces="all")
    assert [r["messages"][-1]["content"] for r in out] == ["<think>x</think><answer>3</answer>",
                                                           "<think>y</think><answer>3</answer>"]
    assert stats["rows_written"] == 2 and stats["rows_read"] == 1


def test_convert_writes_verl_sft_parquet(tmp_path: Path) -> None:
    stats = convert(write_rl(tmp_path / "train.parquet", ROWS), tmp_path / "out" / "sft.parquet")
    table = pq.read_table(tmp_path / "out" / "sft.parquet")
    assert table.column_names == ["messages", "images", "data_source", "id"]
    assert table.column("id").to_pylist() == ["v0", "v2"]
    assert table.column("images").to_pylist() == [[{"bytes": PNG_A}], [{"bytes": PNG_A}]]
    assert stats["rows_written"] == 2


def test_text_only_data_has_no_images_column(tmp_path: Path) -> None:
    rows = [rl_row(0, "<think>t</think><answer>3</answer>", [], prompt="What is 1+2?")]
    convert(write_rl(tmp_path / "t.parquet", rows), tmp_path / "sft.parquet")
    assert pq.read_table(tmp_path / "sft.parquet").column_names == ["messages", "data_source", "id"]


def test_errors_name_the_file_and_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SFTDataError, match=r"nope\.parquet: no such file"):
        convert(tmp_path / "nope.parquet", tmp_path / "o.parquet")
    no_solution = tmp_path / "nosol.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "Q"}]]}), no_solution)
    with pytest.raises(SFTDataError, match=r"nosol\.parquet: no column 'solution' \(columns: prompt\) -- pass --exp"):
        convert(no_solution, tmp_path / "o.parquet")
    two_images = [rl_row(0, "<think>a</think><answer>3</answer>", [PNG_A, PNG_B])]
    bad_count = write_rl(tmp_path / "count.parquet", two_images)
    with pytest.raises(SFTDataError, match=r"count\.parquet: row 0, column 'prompt': 1 <image> placeholders but 2"):
        convert(bad_count, tmp_path / "o.parquet")
    bad_prompt = tmp_path / "prompt.parquet"
    pq.write_table(pa.table({"prompt": ["just text"], "solution": ["<think>a</think><answer>3</answer>"]}), bad_prompt)
    with pytest.raises(SFTDataError, match=r"prompt\.parquet: row 0, column 'prompt': expected a non-empty list"):
        convert(bad_prompt, tmp_path / "o.parquet")
    empty = write_rl(tmp_path / "empty.parquet", [rl_row(0, "", [PNG_A])])
    assert main(["--input", str(empty), "--output", str(tmp_path / "o.parquet")]) == 1
    assert "empty.parquet: no row has an expert trace in column 'solution' (1 rows read)" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_cli_prints_the_counts(tmp_path: Path) -> None:
    src = write_rl(tmp_path / "train.parquet", ROWS)
    result = subprocess.run([sys.executable, "-m", "calibrl_verl.data.sft", "--input", str(src), "--output",
                             str(tmp_path / "sft.parquet")], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "rows_read=5 rows_written=2 dropped_no_expert=2 dropped_image_token_in_expert=1" in result.stdout


def test_verl_sft_dataset_reads_it_with_images_and_trains_only_the_expert(tmp_path: Path) -> None:
    """verl 0.9.1's MultiTurnSFTDataset (the SFT trainer's default) on the converted tiny task, with the tiny
    Qwen2.5-VL processor: the image becomes pixel values and the loss mask covers exactly the expert trace."""
    from omegaconf import OmegaConf
    from transformers import AutoProcessor
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from calibrl_verl.tiny import task
    from calibrl_verl.tiny.build import build_vl
    from calibrl_verl.tiny.models import build_tokenizer
    from calibrl_verl.tiny.task import tokenizer_corpus

    model_dir = tmp_path / "model"

    tokenizer = build_tokenizer(tokenizer_corpus(0))
    processor, _ = build_vl("qwen2_5_vl", tokenizer, 0)
    processor.save_pretrained(model_dir)
    items = task.make_items(2, 0, "train")
    task.write_parquet(items, "train", tmp_path / "train.parquet")
    convert(tmp_path / "train.parquet", tmp_path / "sft.parquet")

    processor = AutoProcessor.from_pretrained(model_dir)
    config = OmegaConf.create({"messages_key": "messages", "pad_mode": "no_padding", "max_length": 4096,
                               "truncation": "error"})  # fmt: skip
    dataset = MultiTurnSFTDataset(str(tmp_path / "sft.parquet"), processor.tokenizer, config, processor=processor)
    assert len(dataset) == 2
    sample = dataset[0]
    assert sample["multi_modal_inputs"]["image_grid_thw"].shape == (1, 3)
    assert sample["multi_modal_inputs"]["pixel_values"].shape[0] > 0
    trained = processor.tokenizer.decode(sample["input_ids"][sample["loss_mask"].bool()])
    assert trained == items[0].solution + "<|im_end|>\n"


def run_sft_script(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "MODEL_PATH", "EXP", "PROJECT",
                                                              "TRAIN_FILES", "VAL_FILES", "OUTPUT_DIR", "DRY_RUN")}
    clean.update({"HOME": str(cwd), "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **env})
    return subprocess.run(["bash", str(REPO / "recipes" / "run_sft_qwen2_5vl_7b.sh"), *args], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_sft_script_dry_run_composes_verl_sft_config_with_our_data_keys(tmp_path: Path) -> None:
    write_rl(tmp_path / "train.parquet", ROWS)
    convert(tmp_path / "train.parquet", tmp_path / "sft.parquet")
    ok = run_sft_script(tmp_path, "optim.lr=2e-5", "--dry-run", TRAIN_FILES="sft.parquet", N_GPUS_PER_NODE="4")
    assert ok.returncode == 0 and PASSED in ok.stderr, ok.stderr[-3000:]
    assert "-m calibrl_verl.sft_dry_run" in ok.stderr and "torch.distributed.run" not in ok.stderr
    config = yaml.safe_load(ok.stdout)
    assert config["data"]["train_files"] == [str(tmp_path / "sft.parquet")]
    assert config["data"]["messages_key"] == "messages" and config["data"]["val_files"] is None
    assert config["data"]["max_length"] == 24576 and config["data"]["truncation"] == "error"
    assert config["model"]["path"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert config["optim"]["lr"] == 2e-5  # the user's override wins
    assert config["trainer"]["experiment_name"] == "sft_qwen2_5vl_7b"
    assert config["trainer"]["default_local_dir"] == str(REPO / "checkpoints" / "calibrl" / "sft_qwen2_5vl_7b")
    assert config["trainer"]["n_gpus_per_node"] == 4 and config["trainer"]["logger"] == ["console", "tensorboard"]

    # the RL parquet itself (no messages column) and an unknown key stop the dry run, naming what is wrong
    rl = run_sft_script(tmp_path, "--dry-run", TRAIN_FILES="train.parquet")
    assert rl.returncode == 1 and "has no column 'messages'" in rl.stderr and "calibrl_verl.data.sft" in rl.stderr
    bad = run_sft_script(tmp_path, "--dry-run", "data.no_such_key=1", TRAIN_FILES="sft.parquet")
    assert bad.returncode == 1 and "no_such_key" in bad.stderr


def test_sft_script_launch_command_is_verl_sft_trainer_under_torchrun(tmp_path: Path) -> None:
    """Without --dry-run the script execs torchrun on verl.trainer.sft_trainer: run with a recording PYTHON."""
    recorder = tmp_path / "python"
    recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/argv.txt"\n')
    recorder.chmod(0o755)
    result = run_sft_script(tmp_path, "trainer.total_epochs=2", PYTHON=str(recorder), MODEL_PATH="/m/base")
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert argv[:5] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=8"]
    assert argv[5:7] == ["-m", "verl.trainer.sft_trainer"]
    assert "model.path=/m/base" in argv and argv[-1] == "trainer.total_epochs=2"
    assert f"data.train_files=[{REPO}/data/virl39k/sft.parquet]" in argv


def test_sft_cpu_overrides_compose_in_verls_sft_config(tmp_path: Path) -> None:
    """calibrl_verl.cpu.sft_cpu_overrides() (what tests/test_sft_run_on_cpu.py appends to the run script, -m families)
    are keys of verl's sft_trainer_engine config and pass the dry run's checks; cheap, so in the default run."""
    from calibrl_verl.cpu import sft_cpu_overrides
    from calibrl_verl.sft_dry_run import check, compose

    write_rl(tmp_path / "train.parquet", ROWS)
    convert(tmp_path / "train.parquet", tmp_path / "sft.parquet")
    config = compose([f"data.train_files=[{tmp_path / 'sft.parquet'}]", "trainer.n_gpus_per_node=1",
                      *sft_cpu_overrides()])
    assert check(config) == ([], [])
    assert config.trainer.device == "cpu" and config.engine.strategy == "fsdp2"
    assert config.model.override_config.attn_implementation == "sdpa" and config.model.use_remove_padding is False
    assert config.engine.mixed_precision.param_dtype == "fp32" and config.engine.use_torch_compile is False
