"""The tiny Qwen2.5-VL, its processor and the synthetic task, checked through verl's own code paths.

Why: the CPU demo and the CI smoke test run verl's real trainer on these assets. These tests pin what that
needs: the saved files reload through the Auto classes, image tokens line up with image features, verl's
RLHFDataset and its agent-loop prompt builder read the parquet, the expert solutions are graded correct, and
the warm-started model is right sometimes but not always (reward variance at step 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from calibrl_verl.reward import compute_score
from calibrl_verl.tiny import load_vl, model_dir, train_files, val_files
from calibrl_verl.tiny.build import build, main
from calibrl_verl.tiny.models import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    MROPE_SECTION,
    REASONING_TOKENS,
    VISION_TOKENS,
    build_processor,
    build_tokenizer,
    build_vl_model,
)
from calibrl_verl.tiny.task import DATA_SOURCE, INSTRUCTION, chat_messages, make_items, tokenizer_corpus
from calibrl_verl.tiny.warmstart import (
    encode_example,
    generate_ids,
    generate_responses,
    prompt_inputs,
    torch_threads,
)

N_TRAIN, N_VAL, SEED = 16, 16, 0


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full default build (warm-start included) shared by the module: it is the slow part."""
    root = tmp_path_factory.mktemp("tiny")
    build(root, n_train=N_TRAIN, n_val=N_VAL, seed=SEED, eval_samples=0)
    return root


@pytest.fixture(scope="module")
def loaded(tiny_root: Path) -> tuple[Any, Any]:
    """(model, processor) reloaded from disk through the Auto classes."""
    return load_vl(tiny_root)


def _rlhf_dataset(path: Path, processor: Any) -> Any:
    """verl's real RLHFDataset with the data config keys verl's trainer passes for geo3k-style data."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "image_key": "images",
            "max_prompt_length": 256,
            "filter_overlong_prompts": True,
            # null = filter in-process: datasets 5.x forks a Pool even for num_proc=1, which can hang once
            # torch has started threads (seen here).
            "filter_overlong_prompts_workers": None,
            "truncation": "error",
            "return_raw_chat": True,
        }
    )
    return RLHFDataset(data_files=[str(path)], tokenizer=processor.tokenizer, config=config, processor=processor)


def test_build_writes_every_asset(tiny_root: Path) -> None:
    info = json.loads((tiny_root / "build_info.json").read_text())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (model_dir(tiny_root) / name).is_file(), name
    assert (tiny_root / "text_model" / "config.json").is_file()
    assert pq.read_table(train_files(tiny_root)).num_rows == N_TRAIN
    assert pq.read_table(val_files(tiny_root)).num_rows == N_VAL
    assert info["warmstart"]["loss_last"] < info["warmstart"]["loss_first"] / 10  # the SFT really trained
    assert 100_000 < info["vl_params"] < 400_000


def test_reload_types_and_special_tokens(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    tok = processor.tokenizer
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert "Qwen2VLImageProcessor" in type(processor.image_processor).__name__
    assert "Qwen2VLVideoProcessor" in type(processor.video_processor).__name__
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    text = model.config.text_config
    assert text.rope_parameters["mrope_section"] == MROPE_SECTION
    assert sum(MROPE_SECTION) == text.hidden_size // text.num_attention_heads // 2
    assert 0 <= text.bos_token_id < text.vocab_size
    assert model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert len(tok) <= text.vocab_size
    for token in REASONING_TOKENS:  # one id each, and kept when verl decodes with skip_special_tokens=True
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == token
    assert tok("\n", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("Ċ")]  # verl's Qwen CT
    assert set(model.generation_config.suppress_tokens) == set(tok.convert_tokens_to_ids(VISION_TOKENS))


def test_forward_with_image_token_counts_match(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    items = make_items(4, SEED, "val")
    inputs = prompt_inputs(processor, items)
    merge = processor.image_processor.merge_size
    per_image = (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(-1).tolist() == per_image
    assert sorted(set(per_image)) <= [4, 16]  # 56 px -> 4 tokens, 112 px -> 16 tokens
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        out = model(**inputs)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    assert sum(f.shape[0] for f in feats) == sum(per_image)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out.logits).all()


def test_parquet_schema(tiny_root: Path) -> None:
    rows = pq.read_table(train_files(tiny_root)).to_pylist()
    row = rows[0]
    assert set(row) == {"data_source", "prompt", "images", "ability", "reward_model", "extra_info", "solution"}
    assert row["data_source"] == DATA_SOURCE
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith("<image>")
    assert row["prompt"][0]["content"].endswith(INSTRUCTION)
    assert row["images"][0]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert row["reward_model"]["style"] == "rule"
    assert [r["extra_info"]["index"] for r in rows] == list(range(N_TRAIN))
    assert {r["extra_info"]["split"] for r in rows} == {"train"}
    assert {r["extra_info"]["kind"] for r in rows} == {"count", "colour"}


def test_expert_solutions_graded_correct(tiny_root: Path) -> None:
    for row in pq.read_table(train_files(tiny_root)).to_pylist():
        truth = row["reward_model"]["ground_truth"]
        good = compute_score(row["data_source"], row["solution"], truth, row["extra_info"])
        assert good["acc"] == 1.0 and good["format"] == 1.0, row["solution"]
        wrong = "B" if truth == "A" else "A" if truth.isalpha() else str(int(truth) % 4 + 1)
        bad = row["solution"].replace(f"<answer>{truth}</answer>", f"<answer>{wrong}</answer>")
        assert compute_score(row["data_source"], bad, truth, row["extra_info"])["acc"] == 0.0


def test_verl_rlhf_dataset_and_agent_loop_prompt(tiny_root: Path) -> None:
    from verl.utils import hf_processor, hf_tokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    processor = hf_processor(str(model_dir(tiny_root)))  # as verl's trainer loads it (binds get_rope_index)
    assert processor is not None and hasattr(processor, "get_rope_index")
    assert hf_tokenizer(str(model_dir(tiny_root))).get_vocab() == processor.tokenizer.get_vocab()
    dataset = _rlhf_dataset(train_files(tiny_root), processor)
    assert len(dataset) == N_TRAIN  # nothing filtered as overlong
    item = dataset[0]
    messages = item["raw_prompt"]
    assert [c["type"] for c in messages[0]["content"]] == ["image", "text"]
    images, _, _ = RLHFDataset._process_multi_modal_info(messages, processor.image_processor.patch_size, None)
    assert len(images) == 1
    builder = create_continuous_token_builder(processor.tokenizer, hf_model_type="qwen2_5_vl", processor=processor)
    mm_inputs: dict[str, Any] = {}
    prompt_ids = builder.build_initial_tokens(messages, images=images, mm_inputs_out=mm_inputs)
    assert {"pixel_values", "image_grid_thw"} <= set(mm_inputs)
    n_image_tokens = int(mm_inputs["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
    assert prompt_ids.count(processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)) == n_image_tokens
    # The warm-start trained on exactly the prompt verl's agent loop builds for the same item.
    train_item = make_items(1, SEED, "train")[0]
    ours = encode_example(processor, train_item)
    assert ours.input_ids[: len(prompt_ids)].tolist() == prompt_ids
    assert torch.equal(ours.pixel_values, mm_inputs["pixel_values"])
    image_mask = (ours.input_ids == processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).long()
    assert torch.equal(ours.mm_token_type_ids, image_mask)  # same token types verl derives for rope positions


def test_vision_tokens_suppressed_in_sampling() -> None:
    tokenizer = build_tokenizer(tokenizer_corpus(SEED))
    processor = build_processor(tokenizer)
    model = build_vl_model(tokenizer, seed=SEED)  # random: samples vision tokens unless told not to
    items = make_items(16, SEED, "val")
    vision = tokenizer.convert_tokens_to_ids(VISION_TOKENS)

    def count_vision(suppress: list[int] | None) -> int:
        model.generation_config.suppress_tokens = suppress
        ids = generate_ids(model, processor, items, temperature=1.0, max_new_tokens=48, seed=SEED)
        return int(torch.isin(ids, torch.tensor(vision)).sum())

    with torch_threads(1):
        unsuppressed = count_vision(None)
        suppressed = count_vision(vision)
    assert unsuppressed > 0  # the hazard is real for a random model...
    assert suppressed == 0  # ...and the saved generation config removes it


def test_warm_start_makes_vision_tokens_vanishingly_unlikely_without_suppression(loaded: tuple[Any, Any]) -> None:
    """vLLM rollouts ignore ``suppress_tokens``: the warm-start itself must keep the policy off the vision tokens.

    Measured along sampled responses (up to their end token) with suppression off: plain SFT leaves ~1e-5 per token
    (a sampled <|image_pad|> every few CI runs), the warm-start's unlikelihood term ~1e-12.
    """
    model, processor = loaded
    tokenizer = processor.tokenizer
    vision = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    items = make_items(16, SEED + 2, "probe")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    inputs = prompt_inputs(processor, items)
    tokenizer.padding_side = side
    torch.manual_seed(SEED)
    with torch_threads(1), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=48, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             suppress_tokens=None, output_logits=True, return_dict_in_generate=True)
    p_vision = torch.softmax(torch.stack(out.logits, 1).float(), -1)[..., vision].sum(-1)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    ended = torch.cumsum((new == tokenizer.eos_token_id).int(), 1) - (new == tokenizer.eos_token_id).int()
    in_response = ended == 0  # positions up to and including the first end token
    assert in_response.sum() >= 16 * 5
    assert p_vision[in_response].max() < 1e-6, p_vision[in_response].max()


def test_warm_started_model_is_sometimes_right(loaded: tuple[Any, Any]) -> None:
    model, processor = loaded
    items = make_items(64, SEED + 1, "probe")  # fresh items, never trained on
    with torch_threads(1):
        responses = generate_responses(model, processor, items, temperature=1.0, seed=SEED)
    scores = [compute_score(DATA_SOURCE, r, it.answer) for r, it in zip(responses, items, strict=True)]
    acc = sum(s["acc"] for s in scores) / len(scores)
    fmt = sum(s["format"] for s in scores) / len(scores)
    assert fmt >= 0.8, responses[:4]  # the format was learned
    assert 0.0 < acc < 1.0, acc  # reward variance within a group from step 1


def test_build_is_deterministic(tmp_path: Path) -> None:
    args = ["--n-train", "4", "--n-val", "4", "--seed", "3", "--warmstart-steps", "2", "--eval-samples", "0"]
    args += ["--warmstart-items", "8"]
    for name in ("a", "b"):
        main(["--out", str(tmp_path / name), *args])
    for split in ("train", "val"):
        table_a = pq.read_table(tmp_path / "a" / "data" / f"{split}.parquet")
        assert table_a.equals(pq.read_table(tmp_path / "b" / "data" / f"{split}.parquet"))
    (model_a, _), (model_b, _) = load_vl(tmp_path / "a"), load_vl(tmp_path / "b")
    state_b = model_b.state_dict()
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, state_b[key]), key
    other = make_items(4, 4, "train")
    assert [it.image.tobytes() for it in other] != [it.image.tobytes() for it in make_items(4, 3, "train")]


def test_text_model_shares_tokenizer(tiny_root: Path, loaded: tuple[Any, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, processor = loaded
    path = tiny_root / "text_model"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert tok.get_vocab() == processor.tokenizer.get_vocab()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "How many circles?"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert not set(out[0, ids.shape[1] :].tolist()) & set(tok.convert_tokens_to_ids(VISION_TOKENS))


# -- the tiny Qwen3-VL (python -m calibrl_verl.tiny.build --family qwen3_vl) ------------------------------------
QWEN3_VL_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question} {instruction}<|im_end|>\n"
                   "<|im_start|>assistant\n")  # fmt: skip


@pytest.fixture(scope="module")
def qwen3_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full Qwen3-VL build (warm-start and accuracy probe included, about 20 s)."""
    root = tmp_path_factory.mktemp("tiny_qwen3_vl")
    build(root, n_train=N_TRAIN, n_val=N_VAL, seed=SEED, eval_samples=32, family="qwen3_vl")
    return root


def test_qwen3_vl_build_types_shape_and_warm_start(qwen3_root: Path, loaded: tuple[Any, Any]) -> None:
    """A real Qwen3-VL: 16-px patches, interleaved M-RoPE, DeepStack; head_dim 32 for vLLM's CPU attention; the
    Qwen2.5-VL tiny's tokenizer; a warm-start that is right sometimes but not always (reward variance)."""
    from calibrl_verl.tiny import qwen3_vl

    info = json.loads((qwen3_root / "build_info.json").read_text())
    model, processor = load_vl(qwen3_root)
    assert info["family"] == "qwen3_vl" and 100_000 < info["vl_params"] < 1_000_000
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and type(processor).__name__ == "Qwen3VLProcessor"
    assert processor.image_processor.patch_size == processor.video_processor.patch_size == 16
    text, vision = model.config.text_config, model.config.vision_config
    assert text.head_dim == 32 and text.rope_parameters["mrope_interleaved"] is True
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert vision.patch_size == 16 and 0 < len(vision.deepstack_visual_indexes) <= text.num_hidden_layers
    assert all(0 <= i < vision.depth for i in vision.deepstack_visual_indexes)
    assert len(model.model.visual.deepstack_merger_list) == len(qwen3_vl.DEEPSTACK_VISUAL_INDEXES)
    assert processor.tokenizer.get_vocab() == loaded[1].tokenizer.get_vocab()  # shared with the Qwen2.5-VL tiny
    assert set(model.generation_config.suppress_tokens) == set(processor.tokenizer.convert_tokens_to_ids(VISION_TOKENS))
    assert info["warmstart"]["loss_last"] < info["warmstart"]["loss_first"] / 10
    assert 0.0 < info["accuracy"]["sampled_t1"] < 1.0, info["accuracy"]


def test_qwen3_vl_prompt_images_and_forward(qwen3_root: Path) -> None:
    """The chat template renders the image as Qwen3-VL's does (in place, no default system turn); 16-px patches
    turn the task's 56 / 112 px images into 64 / 128 px (4 / 16 image tokens); the forward (DeepStack) is finite."""
    model, processor = load_vl(qwen3_root)
    item = make_items(1, SEED, "val")[0]
    text = processor.apply_chat_template(chat_messages(item), add_generation_prompt=True, tokenize=False)
    assert text == QWEN3_VL_PROMPT.format(question=item.question, instruction=INSTRUCTION)
    items = make_items(8, SEED, "val")
    inputs = prompt_inputs(processor, items)
    per_image = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert set(per_image) == {4, 16}
    assert [it.image.size[0] for it in items] == [{4: 56, 16: 112}[n] for n in per_image]
    assert (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist() == per_image
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out.logits).all()


def test_qwen3_vl_verl_dataset_and_agent_loop_prompt(qwen3_root: Path) -> None:
    """verl binds Qwen3-VL's M-RoPE index to the processor; its agent loop builds the prompt the warm-start
    trained on; its dataset keeps every row when it measures prompts with Qwen3-VL's patch size."""
    from verl.utils import hf_processor
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    processor = hf_processor(str(model_dir(qwen3_root)))
    assert type(processor).__name__ == "Qwen3VLProcessor" and hasattr(processor, "get_rope_index")
    dataset = _rlhf_dataset(train_files(qwen3_root), processor)
    assert len(dataset) == N_TRAIN
    messages = dataset[0]["raw_prompt"]
    images, _, _ = RLHFDataset._process_multi_modal_info(messages, processor.image_processor.patch_size, None)
    builder = create_continuous_token_builder(processor.tokenizer, hf_model_type="qwen3_vl", processor=processor)
    mm_inputs: dict[str, Any] = {}
    prompt_ids = builder.build_initial_tokens(messages, images=images, mm_inputs_out=mm_inputs)
    ours = encode_example(processor, make_items(1, SEED, "train")[0])
    assert ours.input_ids[: len(prompt_ids)].tolist() == prompt_ids
    assert torch.equal(ours.pixel_values, mm_inputs["pixel_values"])
    ids = torch.tensor([prompt_ids])
    types = (ids == processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).long()
    positions, _ = processor.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=mm_inputs["image_grid_thw"])
    image = types[0].bool()
    assert positions.shape == (3, 1, len(prompt_ids))
    assert positions[1, 0, image].unique().numel() > 1 and positions[2, 0, image].unique().numel() > 1  # h, w grid
    assert torch.equal(positions[0, 0, ~image], positions[1, 0, ~image])  # text: the same position on all three


# -- the tiny text task and model (python -m calibrl_verl.tiny.build --family text) ----------------------------
@pytest.fixture(scope="module")
def text_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A default text build through the CLI (warm-start included, the accuracy probe on 64 val items): ~10 s."""
    root = tmp_path_factory.mktemp("tiny_text")
    main(["--family", "text", "--out", str(root), "--n-train", str(N_TRAIN), "--n-val", str(N_VAL)])
    return root


def test_text_build_writes_a_text_model_and_text_rows(text_root: Path) -> None:
    from calibrl_verl.tiny import text_model_dir
    from calibrl_verl.tiny.text_task import DEFAULT_WARMSTART_STEPS

    info = json.loads((text_root / "build_info.json").read_text())
    assert info["family"] == "text" and info["warmstart"]["steps"] == DEFAULT_WARMSTART_STEPS
    assert not model_dir(text_root).exists()  # no VL model in a text build
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (text_model_dir(text_root) / name).is_file(), name
    table = pq.read_table(train_files(text_root))
    assert table.num_rows == N_TRAIN and pq.read_table(val_files(text_root)).num_rows == N_VAL
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info", "solution"]
    for row in table.to_pylist():  # the expert solution is right by our reward; another answer is wrong
        truth = row["reward_model"]["ground_truth"]
        assert compute_score(row["data_source"], row["solution"], truth) == {"score": 1.1, "acc": 1.0, "format": 1.0}
        bad = row["solution"].replace(f"<answer>{truth}</answer>", f"<answer>{int(truth) + 1}</answer>")
        assert compute_score(row["data_source"], bad, truth)["acc"] == 0.0
        assert "<image>" not in row["prompt"][0]["content"]


def test_text_rows_load_in_verl_without_a_processor(text_root: Path) -> None:
    """verl's tokenizer/processor loading, dataset and agent-loop prompt builder on the text model: no processor,
    no images, and the warm-start encodes exactly the prompt tokens verl builds. Digits are single tokens: transformers
    reloads the tokenizer as Qwen2Tokenizer, whose pre-tokenizer splits them (text_task.reload_tokenizer)."""
    from verl.utils import hf_processor, hf_tokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    from calibrl_verl.tiny import text_model_dir
    from calibrl_verl.tiny.text_task import make_items as make_text_items

    path = str(text_model_dir(text_root))
    tokenizer = hf_tokenizer(path)
    assert hf_processor(path) is None
    config = OmegaConf.create({"prompt_key": "prompt", "image_key": None, "max_prompt_length": 256,
                               "filter_overlong_prompts": True, "filter_overlong_prompts_workers": None,
                               "truncation": "error", "return_raw_chat": True})  # fmt: skip
    dataset = RLHFDataset(data_files=[str(train_files(text_root))], tokenizer=tokenizer, config=config, processor=None)
    assert len(dataset) == N_TRAIN
    item = dataset[0]
    assert "multi_modal_data" not in item and isinstance(item["raw_prompt"][0]["content"], str)
    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen2", processor=None)
    prompt_ids = builder.build_initial_tokens(item["raw_prompt"])
    ours = encode_example(tokenizer, make_text_items(1, SEED, "train")[0])
    assert ours.input_ids[: len(prompt_ids)].tolist() == prompt_ids and ours.pixel_values is None
    pieces = [tokenizer.decode([t]) for t in prompt_ids]  # " 7" is two tokens here, one in the BPE as trained
    assert "7" in pieces and not any(p.strip().isdigit() and p != p.strip() for p in pieces)


def test_text_model_as_verl_loads_it_is_sometimes_right(text_root: Path) -> None:
    """Reloaded through the Auto classes (as verl loads it), the warm-started model answers some but not all val
    items by our reward, greedy and sampled: rewards vary at RL step 1. The build's own probe agrees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrl_verl.tiny import text_model_dir
    from calibrl_verl.tiny.text_task import accuracy
    from calibrl_verl.tiny.text_task import make_items as make_text_items

    model = AutoModelForCausalLM.from_pretrained(text_model_dir(text_root)).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_model_dir(text_root))
    probe = make_text_items(64, SEED, "val")
    with torch_threads(1):
        greedy = accuracy(model, tokenizer, probe, temperature=0.0, seed=SEED)
        sampled = accuracy(model, tokenizer, probe, temperature=1.0, seed=SEED)
    assert 0.2 < greedy < 0.95 and 0.1 < sampled < 0.9, (greedy, sampled)
    info = json.loads((text_root / "build_info.json").read_text())["accuracy"]
    assert info["greedy"] == greedy and info["eval_items"] == 64
