"""The image-size cap: --max-pixels in data prep (sizes computed by hand), what the processor makes of the cap
(visual tokens of a 1000 x 1000 figure), the recipes' data.mm_processor_kwargs and evaluate's --max-pixels."""

from __future__ import annotations

import importlib.util
from io import BytesIO
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from calibrl_verl import evaluate, generation
from calibrl_verl.data import prep

REPO = Path(__file__).resolve().parents[1]
CAP = 1003520  # 1280 visual tokens of 28 x 28 px: the recipes' cap


def load_geometry3k():
    spec = importlib.util.spec_from_file_location("prep_geometry3k", REPO / "examples/data_preprocess/geometry3k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_bytes(size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size, (255, 255, 255))
    for x in range(0, size[0], 7):  # some structure, so that a resampling difference would show
        image.putpixel((x, (x * 3) % size[1]), (x % 256, 0, 0))
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# (width, height), max_pixels, min_pixels, factor -> expected (width, height) or None (kept as it is), by hand:
CASES = [
    # 1008 x 1008 (36 x 36 tokens) > CAP: beta = sqrt(1e6 / CAP) = 0.99825; 1000 / beta = 1001.8 -> floor to 28: 980
    ((1000, 1000), CAP, None, 28, (980, 980)),
    # beta = sqrt(3e6 / CAP) = 1.72901: 2000 / beta = 1156.7 -> 1148 (41 x 28), 1500 / beta = 867.5 -> 840 (30 x 28)
    ((2000, 1500), CAP, None, 28, (1148, 840)),
    # the same at Qwen3-VL's 32: 1156.7 -> 1152 (36 x 32), 867.5 -> 864 (27 x 32)
    ((2000, 1500), CAP, None, 32, (1152, 864)),
    # 1000 x 1000 at 32: rounds to 992 x 992 = 984064 <= CAP, kept
    ((1000, 1000), CAP, None, 32, None),
    # rounds to 392 x 308 = 120736 <= CAP: kept at 400 x 300 (no rounding without need)
    ((400, 300), CAP, None, 28, None),
    # rounds to 28 x 28 = 784 < 3136: beta = sqrt(3136 / 1200) = 1.6166; 40 * beta = 64.7 -> ceil to 28: 84;
    # 30 * beta = 48.5 -> 56
    ((40, 30), None, 3136, 28, (84, 56)),
]


@pytest.mark.parametrize(("size", "max_pixels", "min_pixels", "factor", "expected"), CASES)
def test_new_size_by_hand(size, max_pixels, min_pixels, factor, expected) -> None:
    cap = prep.PixelCap(max_pixels, min_pixels, factor)
    assert cap.new_size(*size) == expected
    if expected is not None:
        assert (max_pixels is None or expected[0] * expected[1] <= max_pixels)
        assert all(side % factor == 0 for side in expected)


@pytest.mark.parametrize(("size", "max_pixels", "min_pixels", "factor", "expected"), CASES)
def test_smart_resize_is_qwen_vl_utils(size, max_pixels, min_pixels, factor, expected) -> None:
    from qwen_vl_utils import smart_resize

    width, height = size
    theirs = smart_resize(height, width, factor, min_pixels=min_pixels or 4 * factor**2, max_pixels=max_pixels)
    assert prep.smart_resize(height, width, factor, min_pixels or 4 * factor**2, max_pixels) == theirs
    if expected is not None:
        assert theirs == (expected[1], expected[0])


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(prep.PrepError, match="--max-pixels must be >= 784"):
        prep.PixelCap(500)
    with pytest.raises(prep.PrepError, match="is above --max-pixels"):
        prep.PixelCap(10000, 20000)


def test_prep_stores_the_capped_image_qwen_vl_utils_would_give(tmp_path: Path) -> None:
    """geometry3k.py --max-pixels: the large image is stored at 980 x 980, pixel for pixel what fetch_image makes
    of the original under the same cap; the small one is untouched; the summary counts the resized one."""
    from qwen_vl_utils import fetch_image

    big, small = png_bytes((1000, 1000)), png_bytes((400, 300))
    records = [{"images": [{"bytes": big}], "problem": "<image>Find x.", "answer": "1", "id": 1},
               {"images": [{"bytes": small}], "problem": "<image>Find y.", "answer": "2", "id": 2}]  # fmt: skip
    source = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(records), source)
    output = tmp_path / "out.parquet"
    summary = load_geometry3k().main(["--input", str(source), "--split", "test", "--output", str(output),
                                      "--max-pixels", str(CAP)])  # fmt: skip
    assert summary["images_resized"] == 1 and summary["images"] == 2
    rows = pq.read_table(output).to_pylist()
    stored = [Image.open(BytesIO(r["images"][0]["bytes"])) for r in rows]
    assert [image.size for image in stored] == [(980, 980), (400, 300)]
    expected = fetch_image({"image": Image.open(BytesIO(big)), "max_pixels": CAP})
    assert expected.size == (980, 980) and stored[0].convert("RGB").tobytes() == expected.tobytes()
    assert stored[1].convert("RGB").tobytes() == Image.open(BytesIO(small)).convert("RGB").tobytes()

    uncapped = load_geometry3k().main(["--input", str(source), "--split", "test", "--output", str(output)])
    assert "images_resized" not in uncapped


def qwen2_5_vl_image_processor():
    """Qwen2.5-VL-7B-Instruct's image processor settings (its preprocessor_config.json: 14-px patches, 2 x 2
    merge, 3136 to 12845056 pixels), built locally."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                 temporal_patch_size=2)  # fmt: skip


def visual_tokens(processor, image: Image.Image, **kwargs) -> int:
    grid = processor(images=[image], return_tensors="pt", **kwargs)["image_grid_thw"][0]
    return int(grid.prod()) // 4  # 2 x 2 patches merge into one token


def test_visual_tokens_of_a_1000_px_figure() -> None:
    """docs/data.md's numbers: 1296 tokens uncapped (1008 x 1008), 1225 under the recipes' cap (980 x 980); a
    max_pixels passed alone is ignored by transformers 5.9, hence both keys in the recipes."""
    processor = qwen2_5_vl_image_processor()
    figure = Image.new("RGB", (1000, 1000), (255, 255, 255))
    assert visual_tokens(processor, figure) == 36 * 36 == 1296
    assert visual_tokens(processor, figure, min_pixels=3136, max_pixels=CAP) == 35 * 35 == 1225
    assert visual_tokens(processor, figure, max_pixels=CAP) == 1296  # alone: no effect
    capped = Image.open(BytesIO(prep.encode_png(figure, "0", prep.PixelCap(CAP))))
    assert visual_tokens(processor, capped) == 1225  # prep-time capping: the same count without any kwargs
    small = Image.new("RGB", (400, 300), (255, 255, 255))  # 392 x 308: 14 x 11 tokens, capped or not
    assert visual_tokens(processor, small) == visual_tokens(processor, small, min_pixels=3136, max_pixels=CAP) == 154
    # a 12 MP photo: 4004 x 2996 uncapped (143 x 107 tokens); capped: 1148 x 840 (41 x 30)
    photo = Image.new("RGB", (4000, 3000), (255, 255, 255))
    assert visual_tokens(processor, photo) == 143 * 107 == 15301
    assert visual_tokens(processor, photo, min_pixels=3136, max_pixels=CAP) == 41 * 30 == 1230


@pytest.mark.parametrize("model", ["qwen2_5vl_7b", "qwen2_5vl_3b", "qwen3vl_8b", "qwen3vl_4b"])
def test_vl_model_recipes_set_both_pixel_bounds(model: str) -> None:
    data = yaml.safe_load((REPO / "recipes" / "models" / f"{model}.yaml").read_text())["data"]
    bounds = data["mm_processor_kwargs"]
    assert bounds["max_pixels"] == CAP and 0 < bounds["min_pixels"] < CAP
    assert bounds["min_pixels"] == (65536 if model.startswith("qwen3vl") else 3136)  # each processor's own


def test_evaluate_max_pixels_reaches_process_vision_info() -> None:
    """--max-pixels puts the bound on every image entry, where qwen_vl_utils.fetch_image reads it."""
    from qwen_vl_utils import process_vision_info

    args = evaluate.parse_args(["--model", "m", "--data", "x.parquet", "--max-pixels", str(CAP)])
    options = generation.pixel_options(args.max_pixels, args.min_pixels)
    assert options == {"max_pixels": CAP}
    figure = Image.new("RGB", (1000, 1000), (255, 255, 255))
    messages = generation.build_messages([{"role": "user", "content": "<image>Find x."}], [figure], options)
    assert messages[0]["content"][0] == {"type": "image", "image": figure, "max_pixels": CAP}
    assert process_vision_info(messages, image_patch_size=14)[0][0].size == (980, 980)
    plain = generation.build_messages([{"role": "user", "content": "<image>Find x."}], [figure])
    assert process_vision_info(plain, image_patch_size=14)[0][0].size == (1008, 1008)
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "m", "--data", "x.parquet", "--max-pixels", "100", "--min-pixels", "200"])
