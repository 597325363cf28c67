"""Evaluation protocols: lenient answer extraction, the community rule sets, the model judge (local scripted server).

Expected values are written by hand from the public harness's documented behaviour (docs/evaluation.md), never taken
from the functions under test."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from calibrl_verl import evaluate, evaluate_compare, generation
from calibrl_verl.experts import endpoint
from calibrl_verl.protocols import geometry, mathvista, multiple_choice, wemath
from calibrl_verl.protocols import judge as judge_mod
from calibrl_verl.protocols.base import Item
from calibrl_verl.protocols.extract import lenient_answer


def _helper(name: str) -> Any:
    """A helper module beside the tests, loaded by path (pytest runs in importlib mode: pyproject.toml)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lmms_reference = _helper("lmms_reference")
chat_server = _helper("chat_server")

KEY_ENV = "CALIBRL_TEST_JUDGE_KEY"
KEY = "sk-judge-secret-123"


# ------------------------------------------------------------------------------------------- lenient extraction


@pytest.mark.parametrize(
    ("response", "want"),
    [
        ("<think>x</think><answer> 12 </answer>", ("12", "answer_tag")),
        ("<answer>3</answer> then <answer>4</answer>", ("4", "answer_tag")),  # the last block
        ("<answer> </answer> so \\boxed{7}", ("7", "boxed")),  # an empty block is no answer
        ("first \\boxed{1}, finally \\boxed{\\frac{1}{2}}.", ("\\frac{1}{2}", "boxed")),
        ("Thus the answer is (B).", ("(B)", "answer_is")),
        ("The final answer: **42**", ("42", "answer_is")),
        ("Answer: $x=3$.\nDone", ("x=3", "answer_is")),
        ("B", ("B", "letter")),
        ("(C) 12", ("C", "letter")),
        ("Option D.", ("D", "letter")),
        ("A rectangle has four sides", (None, "none")),  # a word starting with a letter is no option
        ("", (None, "none")),
    ],
)
def test_lenient_extraction_routes(response: str, want: tuple[str | None, str]) -> None:
    assert lenient_answer(response) == want


# ------------------------------------------------------------------------------------------------- the judge


class ScriptedJudge(chat_server.ChatServer):
    """A local OpenAI-compatible judge: ``answer(prompt)`` is its reply (default ``EXTRACTED <text after the last
    #>``); ``failures`` maps that tag to HTTP statuses returned first, one per request."""

    def __init__(self, failures: dict[str, list[int]] | None = None, answer: Any = None) -> None:
        self.failures = failures or {}
        self.answer = answer or (lambda prompt: f"EXTRACTED {prompt.split('#')[-1]}")
        super().__init__()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body["messages"][0]["content"]
        self.log.append({"prompt": prompt, "auth": request.headers.get("Authorization"), "body": body})
        pending = self.failures.get(prompt.split("#")[-1], [])
        if pending:
            status = pending.pop(0)
            return web.json_response({"error": {"message": f"scripted {status}"}}, status=status)
        return chat_server.completion(self.answer(prompt), "judge")


@pytest.fixture
def judge_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(endpoint.BACKOFF_ENV, "0.01")
    monkeypatch.setenv(KEY_ENV, KEY)


def _judge(server: ScriptedJudge, cache: Path, retries: int = 2) -> judge_mod.Judge:
    return judge_mod.Judge(judge_mod.JudgeSettings(server.url, "judge-model", cache, KEY_ENV, max_retries=retries,
                                                   timeout=5.0, concurrency=3))


def test_judge_replies_are_cached_and_a_rerun_sends_nothing(judge_env: None, tmp_path: Path) -> None:
    server = ScriptedJudge(failures={"2": [500, 429], "3": [500, 500, 500]})
    try:
        cache = tmp_path / "judge_cache.jsonl"
        judge = _judge(server, cache)
        prompts = [f"extract #{i}" for i in range(4)] + ["extract #0"]  # a repeated prompt
        assert judge.ask(prompts) == ["EXTRACTED 0", "EXTRACTED 1", "EXTRACTED 2", None, "EXTRACTED 0"]
        # 0 and 1 once, 2 after two retryable failures, 3 fails three times (max_retries 2), the repeat is not resent
        assert len(server.log) == 1 + 1 + 3 + 3
        assert judge.stats.as_dict() == {"judge_requests": 8, "judge_cached": 0, "judge_errors": 1}
        assert all(entry["auth"] == f"Bearer {KEY}" for entry in server.log)
        assert all(entry["body"]["temperature"] == 0 for entry in server.log)
        assert KEY not in cache.read_text()
        lines = [json.loads(line) for line in cache.read_text().splitlines()]
        assert sorted(line["reply"] for line in lines) == ["EXTRACTED 0", "EXTRACTED 1", "EXTRACTED 2"]

        server.log.clear()
        again = _judge(server, cache)
        assert again.ask(prompts[:3]) == ["EXTRACTED 0", "EXTRACTED 1", "EXTRACTED 2"]
        assert server.log == [] and again.stats.as_dict()["judge_cached"] == 3
        assert again.ask(["extract #3"]) == ["EXTRACTED 3"]  # the failed one is asked again (not cached)
        assert len(server.log) == 1
    finally:
        server.stop()


def test_judge_without_its_key_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(judge_mod.JudgeError, match=KEY_ENV):
        judge_mod.Judge(judge_mod.JudgeSettings("http://127.0.0.1:9/v1", "m", tmp_path / "c.jsonl", KEY_ENV))


def test_judge_refuses_a_corrupt_cache_line(judge_env: None, tmp_path: Path) -> None:
    cache = tmp_path / "judge_cache.jsonl"
    cache.write_text('{"key": "a", "model": "m", "reply": "x"}\nnot json\n')
    with pytest.raises(judge_mod.JudgeError, match="line 2"):
        judge_mod.Judge(judge_mod.JudgeSettings("http://127.0.0.1:9/v1", "m", cache, KEY_ENV))


def test_judge_stops_on_a_bad_key(judge_env: None, tmp_path: Path) -> None:
    server = ScriptedJudge(failures={"0": [401]})
    try:
        with pytest.raises(endpoint.FatalEndpointError, match="401"):
            _judge(server, tmp_path / "c.jsonl").ask(["extract #0"])
    finally:
        server.stop()


# -------------------------------------------------- community rules against lmms-eval 0.7.3's own functions





def _lmms(module: str) -> Any:
    found = lmms_reference.load(module)
    if found is None:
        pytest.skip("lmms-eval is not installed (scripts/setup_cpu.sh installs it for these checks)")
    return found


def _item(source: str, meta: dict[str, Any], truth: Any = "", n_images: int = 1, **extra: Any) -> Item:
    return Item(source, [], truth, {"id": "x1", **extra}, meta=meta, n_images=n_images)


MATHVISTA_PROBLEMS = [
    {"question": "What fraction is shaded?", "choices": ["3/11", "8/11", "6/11", "3/5"], "unit": "",
     "precision": None, "question_type": "multi_choice", "answer_type": "text", "answer": "8/11"},
    {"question": "How many cubes?", "choices": None, "unit": "", "precision": None, "question_type": "free_form",
     "answer_type": "integer", "answer": "14"},
    {"question": "What is the length?", "choices": None, "unit": "cm", "precision": 1.0, "question_type": "free_form",
     "answer_type": "float", "answer": "2.5"},
    {"question": "What is the ratio?", "choices": None, "unit": "", "precision": 2.0, "question_type": "free_form",
     "answer_type": "float", "answer": "1.46"},
    {"question": "Which years?", "choices": None, "unit": "", "precision": None, "question_type": "free_form",
     "answer_type": "list", "answer": "[2007, 2008]"},
]
MATHVISTA_EXTRACTIONS = ["(B)", "B", "(b) 8/11", "B.", "b", "The answer is B", "8/11", "6/11 maybe", "14", "14.7",
                         " 14 ", "2.5", "2.54", "1.456", "1.455", "$1.45", "[2007, 2008]", "[2007,2008]", "x"]


@pytest.mark.parametrize("problem", MATHVISTA_PROBLEMS, ids=lambda p: p["answer_type"] + "/" + p["question_type"])
def test_mathvista_prompt_normalisation_and_equality_match_lmms_eval(problem: dict[str, Any]) -> None:
    evals = _lmms("mathvista.mathvista_evals")
    evaluator = evals.MathVistaEvaluator()
    item = _item("mathvista", problem)
    theirs = evaluator.create_one_query({**problem, "caption": "", "ocr": ""}, shot_type="step-by-step", shot_num=0)
    assert mathvista.query(item) == theirs
    # lmms-eval hands round() the dataset's precision as stored (a float, 1.0 / 2.0), which raises, so there every
    # float answer scores wrong; MathVista's own evaluation rounds to int(precision), as ours does (docs/evaluation.md)
    precision = problem["precision"]
    if problem["answer_type"] == "float":
        assert evaluator.normalize_extracted_answer("2.5", None, "free_form", "float", float(precision)) is None
        precision = int(precision)
    for extraction in MATHVISTA_EXTRACTIONS:
        normalized = evaluator.normalize_extracted_answer(extraction, problem["choices"], problem["question_type"],
                                                          problem["answer_type"], precision)
        want = normalized is not None and evaluator.safe_equal(normalized, problem["answer"])
        ours, correct = mathvista.is_correct(item, extraction)
        assert (ours, correct) == (normalized, want), extraction


SCIENCEQA_DOCS = [{"question": "Which is a mammal?", "choices": ["frog", "whale", "trout"], "answer": 1, "hint": ""},
                  {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "Look closely."}]
SCIENCEQA_RESPONSES = ["B", "b", " B\n", "B.", "B. whale", "(B)", "B)", "The answer is B", "b.", "Bw", "A", "A. frog"]


@pytest.mark.parametrize("doc", SCIENCEQA_DOCS, ids=["no hint", "hint"])
def test_scienceqa_prompt_and_grade_match_lmms_eval(doc: dict[str, Any]) -> None:
    utils = _lmms("scienceqa.utils")
    kwargs = {"format": "default", "pre_prompt": "",
              "post_prompt": "\nAnswer with the option's letter from the given choices directly."}
    letter = "ABCDE"[doc["answer"]]
    item = _item("scienceqa", {"question": doc["question"], "choices": doc["choices"], "hint": doc["hint"]}, letter)
    assert multiple_choice.scienceqa_prompt(item)[0]["content"] == "<image>" + utils.sqa_doc_to_text(doc, kwargs)
    for response in SCIENCEQA_RESPONSES:
        want = utils.sqa_process_results(doc, [response])["exact_match"]
        assert multiple_choice.scienceqa_grade(item, response)["acc"] == want, response


MMMU_OPTIONS = ["cat", "dog", "bird fly", "fish"]
MMMU_MC_RESPONSES = ["A", "(B)", "B.", "The answer is (C).", "answer: D", "A and B",
                     "The correct option is B and not A", "I think it is a dog, not a cat at all",
                     "Answer (A) or rather (D)", "D is right", "C."]
MMMU_OPEN = [("42", "42"), ("The answer is 3,000.", "3000"), ("x = 5.5 so the result is 1e3", "1000"),
             ("Paris", "Paris"), ("The answer is 2.", "2"), ("It is paris.", "Paris"), ("maybe 7", "8"),
             ("The capital is Rome\nso the answer is rome", "Rome"), ("A", "A"), ("so it is 0.333", "1/3")]


def test_mmmu_prompts_and_parsers_match_lmms_eval() -> None:
    utils = _lmms("mmmu.utils")
    index2ans, letters = utils.get_multi_choice_info(MMMU_OPTIONS)
    for response in MMMU_MC_RESPONSES:
        random.seed(0)  # their fallback draws from the global generator; these responses never reach it
        want = utils.parse_multi_choice_response(response, letters, index2ans)
        assert multiple_choice.parse_multi_choice(response, MMMU_OPTIONS, "seed") == (want, "letter"), response
    for response, truth in MMMU_OPEN:
        want = utils.eval_open(truth, utils.parse_open_response(response))
        item = _item("mmmu", {"question": "q", "question_type": "open", "answer": truth})
        assert multiple_choice.mmmu_grade(item, response)["acc"] == float(want), response
        assert sorted(map(str, multiple_choice.parse_open(response))) == sorted(
            map(str, utils.parse_open_response(response))), response
    kwargs = {"prompt_type": "format", "multiple_choice_prompt": multiple_choice.MC_PROMPT,
              "open_ended_prompt": multiple_choice.OPEN_PROMPT}
    for doc in ({"question": "Look at <image 1>. Which?", "options": str(MMMU_OPTIONS),
                 "question_type": "multiple-choice"},
                {"question": "Compute <image 1>.", "options": "[]", "question_type": "open"}):
        meta = {"question": doc["question"], "question_type": doc["question_type"],
                "choices": MMMU_OPTIONS if doc["question_type"] == "multiple-choice" else []}
        ours = multiple_choice.mmmu_prompt(_item("mmmu", meta))[0]["content"]
        assert ours == "<image>" + utils.mmmu_doc_to_text(doc, kwargs)


def test_mmmu_random_fallback_reproduces_per_problem_and_response() -> None:
    picks = {multiple_choice.parse_multi_choice("nothing here", MMMU_OPTIONS, f"p{i}:nothing here") for i in range(40)}
    assert {route for _, route in picks} == {"random"} and len({letter for letter, _ in picks}) > 1
    again = multiple_choice.parse_multi_choice("nothing here", MMMU_OPTIONS, "p3:nothing here")
    assert again == multiple_choice.parse_multi_choice("nothing here", MMMU_OPTIONS, "p3:nothing here")


GEO3K_RESPONSES = ["B", "(b)", "Answer: C", "I think a is wrong. Answer = b", "x = 6", "The value is 12",
                   "so x=6 (a side)", "nothing", "D) 12", "[C]"]


def test_geometry3k_prompt_and_grade_match_lmms_eval() -> None:
    utils = _lmms("geometry3k.utils")
    doc = {"problem": "Find x.", "choices": ["3", "6", "9", "12"], "ground_truth": "B"}
    item = _item("geometry3k", {"question": doc["problem"], "choices": doc["choices"], "ground_truth": "B"})
    assert geometry.geometry3k_prompt(item)[0]["content"] == "<image>" + utils.geometry3k_doc_to_text(doc)
    for response in GEO3K_RESPONSES:
        want = utils.geometry3k_process_results(doc, [response])["exact_match"]
        assert geometry.geometry3k_grade(item, response)["acc"] == want, response


def test_wemath_four_dimensions_match_the_official_script() -> None:
    """525 synthetic problems (360 two-step, 165 three-step, as in testmini) with random results: our rates and
    scores equal the official functions' (lmms-eval's verbatim copy), which hard-code 525 problems."""
    import pandas as pd

    utils = _lmms("wemath.wemath_utils")
    rng = random.Random(7)
    rows = []
    for steps, count in ((2, 360), (3, 165)):
        for n in range(1, count + 1):
            bias = rng.random()  # problems differ in difficulty, so every category is populated
            for key in [f"{steps}steps_{i}" for i in range(1, steps + 1)] + [f"{steps}steps_multi"]:
                rows.append({"ID": f"{steps}steps_{n}", "key": key, "joker": rng.random() < bias})
    frame = pd.DataFrame(rows)
    two, three = (utils.process_steps_data(frame[frame.key.str.startswith(f"{s}steps")].copy(), s) for s in (2, 3))
    counts, rates = utils.compute_final_scores(utils.calculate_metrics(two, three), total_count=525)
    official = utils.update_main_results_df(counts, rates)
    samples = [{"sample": 0, "correct": r["joker"], "tags": json.dumps({"ID": r["ID"], "key": r["key"]})}
               for r in rows]
    ours = wemath.four_dimensions(samples)["wemath"]

    def pct(text: str) -> float:
        return float(text.split("%")[0])

    assert ours["n_problems"] == 525
    assert f"{ours['score_strict']:.2f}" == f"{pct(official['Score (Strict)']):.2f}"
    assert f"{ours['score_loose']:.2f}" == f"{pct(official['Score (Loose)']):.2f}"
    for ours_key, theirs_key in (("IK", "InsufficientKnowledge_rate"), ("IG", "InadequateGeneralization_rate"),
                                 ("CM_strict", "CompleteMastery_strict_rate"),
                                 ("CM_loose", "CompleteMastery_loose_rate"),
                                 ("RM_strict", "RoteMemorization_strict_rate"),
                                 ("RM_loose", "RoteMemorization_loose_rate")):
        assert f"{ours[ours_key]:.2f}" == f"{pct(rates[theirs_key]):.2f}", ours_key


# ------------------------------------------------------------- end to end: prep -> evaluate --protocol community



SCRIPTS = Path(__file__).resolve().parents[1] / "examples" / "data_preprocess"
WE_Q = {"2steps_1": "Lengths OA and AB?", "2steps_2": "Area of the square?", "2steps_multi": "Area of OAB?"}

# benchmark -> rows (source layout) and, per row, the two sampled responses with whether the community rules
# count each correct (written by hand from each harness's rules)
CASES: dict[str, Any] = {
    "mathvista": ([
        {"pid": "1", "question": "What fraction is shaded?", "choices": ["3/11", "8/11", "6/11", "3/5"], "unit": "",
         "precision": None, "question_type": "multi_choice", "answer_type": "text", "answer": "8/11", "query": "q1"},
        {"pid": "2", "question": "What is the length?", "choices": None, "unit": "cm", "precision": 1.0,
         "question_type": "free_form", "answer_type": "float", "answer": "2.5", "query": "q2"},
    ], {"What fraction is shaded?": [("The answer is (B).", True), ("b", False)],  # "b": nearest choice is 3/5
        "What is the length?": [("2.5", True), ("<answer>2.54</answer>", True)]}),  # rounded to 1 decimal
    "mathverse": ([
        {"sample_index": "1", "problem_version": "Text Dominant", "question": "Angle B?\nChoices:\nA:30\nB:60",
         "query_wo": "Answer with the letter. Question: Angle B? Choices: A:30 B:60", "answer": "B",
         "question_for_eval": "Angle B? A:30 B:60", "question_type": "multi-choice"},
        {"sample_index": "2", "problem_version": "Vision Only", "question": "See the figure.",
         "query_wo": "Answer with the letter. Question: see the figure (angle C?)", "answer": "B",
         "question_for_eval": "Angle C? A:30 B:60", "question_type": "multi-choice"},
    ], {"Question: Angle B?": [("B", True), ("The answer is 30 degrees", False)],
        "(angle C?)": [("(A)", False), ("The answer is B", True)]}),
    "wemath": ([{"ID": f"2steps_{n}", "key": key, "question": f"[{n}] {text}", "option": "A. 12; B. 24; C. 36",
                 "answer": "B", "question number": i} for n in (1, 2) for i, (key, text) in enumerate(WE_Q.items())],
               # problem 1: sample 0 = IG (steps right, composite wrong), sample 1 = RM strict (a step wrong,
               # composite right); problem 2: sample 0 = CM, sample 1 = IK
               {"[1] Lengths": [("<answer>B</answer>", True), ("<answer>A</answer>", False)],
                "[1] Area of the square": [("<answer>B</answer>", True), ("<answer>B</answer>", True)],
                "[1] Area of OAB": [("<answer>C</answer>", False), ("\\boxed{B}", True)],
                "[2] Lengths": [("<answer>B.</answer>", True), ("<answer>A</answer>", False)],
                "[2] Area of the square": [("<answer>B</answer>", True), ("<answer>C</answer>", False)],
                "[2] Area of OAB": [("<answer>B</answer>", True), ("<answer>A</answer>", False)]}),
    "scienceqa": ([{"id": "s1", "question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1,
                    "hint": "Look closely."}],
                  {"Which is a mammal?": [("B", True), ("(B)", False)]}),  # LLaVA's rule: "(B)" is no answer
    "mmmu": ([{"id": "validation_Art_1", "question": "Look at <image 1>. Which?", "options": "['cat', 'dog']",
               "answer": "B", "question_type": "multiple-choice"},
              {"id": "validation_Math_2", "question": "Compute the sum in <image 1>.", "options": "[]",
               "answer": "12", "question_type": "open"}],
             {"Which?": [("B", True), ("(A)", False)],
              "Compute the sum": [("The answer is 12.", True), ("13", False)]}),
    "geometry3k": ([{"id": 7, "problem": "<image>Find x.", "answer": "6", "choices": ["3", "6", "9", "12"],
                     "ground_truth": "B"}],
                   {"Find x.": [("x = 6", True), ("The value is 12", False)]}),  # by choice text
    "geoqa": ([{"id": "g1", "question": "Angle CED is ()", "answer": "140"}],
              {"Angle CED": [("<think>180-40</think><answer>140</answer>", True), ("<answer>120</answer>", False)]}),
}


def _prepare(name: str, rows: list[dict[str, Any]], tmp: Path) -> Path:
    image = tmp / "images" / "fig.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (9, 90, 200)).save(image)
    for row in rows:
        row["image_1" if name == "mmmu" else "images" if name == "geometry3k" else "image"] = (
            ["images/fig.png"] if name == "geometry3k" else "images/fig.png")
    source = tmp / f"{name}.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "data" / f"{name}.parquet"
    script = {"geometry3k": "geometry3k", "geoqa": "geoqa"}.get(name, "eval_sets")
    spec = importlib.util.spec_from_file_location(f"protocol_prep_{script}", SCRIPTS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--input", str(source), "--output", str(out)] + ([] if script != "eval_sets" else ["--benchmark", name])
    module.main(args + (["--split", "test"] if name == "geometry3k" else []))
    return out


class KeyedBackend:
    """Answers each prompt with the two scripted responses of the case whose key the prompt contains."""

    def __init__(self, processor: Any, responses: dict[str, list[str]]) -> None:
        self.processor, self.responses, self.prompts = processor, responses, []

    def generate(self, requests: list[Any]) -> list[list[str]]:
        self.prompts += [r.prompt for r in requests]
        return [next(v for k, v in self.responses.items() if k in r.prompt) for r in requests]


def _judge_answer(prompt: str) -> str:
    """MathVista: the answer a careful extractor gives; MathVerse: 1 iff the prediction is exactly the letter B."""
    if prompt.endswith("Extracted answer: "):
        response = prompt.rsplit("Model response: ", 1)[1].split("\n\nExtracted answer: ")[0]
        return {"The answer is (B).": "B", "b": "B", "2.5": "2.5", "<answer>2.54</answer>": "2.54"}[response]
    prediction = prompt.split("# Model prediction\n```\n")[1].split("\n```")[0]
    return "1" if prediction.strip() in ("B", "The answer is B") else "0"


@pytest.fixture(scope="module")
def community_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from calibrl_verl.tiny import model_dir
    from calibrl_verl.tiny.build import build

    tmp = tmp_path_factory.mktemp("community")
    build(tmp / "tiny", n_train=2, n_val=2, warmstart_steps=0, eval_samples=0)
    files = [_prepare(name, rows, tmp) for name, (rows, _) in CASES.items()]
    responses = {k: [r for r, _ in v] for _, (_, by_key) in CASES.items() for k, v in by_key.items()}
    processor = generation.load_processor(str(model_dir(tmp / "tiny")))
    return {"tmp": tmp, "files": files, "model": model_dir(tmp / "tiny"), "backend": KeyedBackend(processor, responses)}


def _evaluate(run: dict[str, Any], out: Path, *extra: str) -> tuple[dict[str, Any], Any]:
    import pandas as pd

    args = evaluate.parse_args(["--model", str(run["model"]), "--data", *map(str, run["files"]), "--out", str(out),
                                "--protocol", "community", "--n-samples", "2", *extra])
    evaluate.run(args, backend_factory=lambda max_images: run["backend"])
    return json.loads((out / "summary.json").read_text()), pd.read_parquet(out / "samples.parquet")


def test_community_protocol_end_to_end_prompts_grades_and_figures(community_run: dict[str, Any]) -> None:
    summary, samples = _evaluate(community_run, community_run["tmp"] / "rules")
    assert {name: s["rules"] for name, s in summary.items()} == {name: name for name in CASES}
    assert all(s["protocol"] == "community" for s in summary.values())
    prompts = "\n".join(community_run["backend"].prompts)
    for expected in ("Hint: Please answer the question requiring a floating-point number with one decimal place",
                     "Question: What is the length? (Unit: cm)", "Context: Look closely.\nWhich is a mammal?",
                     "Answer with the letter. Question: Angle B?", wemath.SYSTEM,
                     "[1] Lengths OA and AB?\nA. 12; B. 24",
                     "Find x.\nA. 3\nB. 6\nC. 9\nD. 12\nAnswer with the option's letter",
                     "Angle CED is () A conversation between User and Assistant.",
                     "Compute the sum in <image 1>.\n\nAnswer the question using a single word or phrase."):
        assert expected in prompts, expected
    assert "You FIRST think" not in prompts  # the training instruction is not the community prompt

    # every scripted response got the grade written beside it (matched by benchmark, sample index and response)
    for name, (_, by_key) in CASES.items():
        for k in (0, 1):
            want = sorted((pairs[k][0], pairs[k][1]) for pairs in by_key.values())
            part = samples[(samples.benchmark == name) & (samples["sample"] == k)]
            assert sorted(zip(part.response, part.correct.map(bool), strict=True)) == want, (name, k)
    for name, s in summary.items():
        part = samples[samples.benchmark == name]
        assert s["accuracy"] == pytest.approx(100 * part.correct.mean()), name
        assert s["coverage"] == pytest.approx(100 * part.groupby("id").correct.any().mean()), name
        assert sum(s["extraction"].values()) == pytest.approx(100.0)

    # WeMath: by hand (module docstring of the test cases), then with the official functions from samples.parquet
    assert summary["wemath"]["wemath"] == pytest.approx({"n_problems": 2, "IK": 25, "IG": 25, "CM_strict": 25,
                                                         "CM_loose": 50, "RM_strict": 50, "RM_loose": 0,
                                                         "score_strict": 37.5, "score_loose": 62.5})
    we = samples[samples.benchmark == "wemath"]
    tags = we.tags.map(json.loads)
    frame = we.assign(ID=tags.map(lambda t: t["ID"]), key=tags.map(lambda t: t["key"]), joker=we.correct)
    utils = lmms_reference.load("wemath.wemath_utils")
    if utils is not None:
        strict = []
        for k in (0, 1):
            run = frame[frame["sample"] == k][["ID", "key", "joker"]]
            two = utils.process_steps_data(run.copy(), 2)
            three = utils.process_steps_data(run.iloc[0:0].copy(), 3)
            counts, _ = utils.compute_final_scores(utils.calculate_metrics(two, three), total_count=2)
            strict.append(100 * (2 - 0.5 * counts["InadequateGeneralization"] - counts["RoteMemorization_strict"]
                                 - counts["InsufficientKnowledge"]) / 2)
        assert summary["wemath"]["wemath"]["score_strict"] == pytest.approx(sum(strict) / 2)
    # MathVerse: accuracy per problem version, recomputed from the tags
    verse = samples[samples.benchmark == "mathverse"]
    versions = verse.tags.map(lambda t: json.loads(t)["problem_version"])
    assert summary["mathverse"]["accuracy_by_version"] == pytest.approx(
        {v: 100 * verse[versions == v].correct.mean() for v in versions.unique()})


def test_community_judge_scores_beside_the_rules_and_a_rerun_asks_nothing(community_run: dict[str, Any],
                                                                         judge_env: None) -> None:
    server = ScriptedJudge(answer=_judge_answer)
    try:
        out = community_run["tmp"] / "judged"
        flags = ("--judge-base-url", server.url, "--judge-model", "judge-4o", "--judge-api-key-env", KEY_ENV)
        summary, samples = _evaluate(community_run, out, *flags)
        assert len(server.log) == 8  # MathVista and MathVerse: 2 rows x 2 samples each; no other benchmark asks
        vista, verse = summary["mathvista"], summary["mathverse"]
        assert vista["accuracy"] == 75.0 and vista["judge"]["accuracy"] == 100.0  # "b" is B to the judge
        assert verse["judge"]["accuracy"] == 50.0 and verse["judge"]["model"] == "judge-4o"
        assert vista["judge"]["judge_requests"] == 8 and vista["judge"]["judge_cached"] == 0
        assert "judge" not in summary["scienceqa"]
        judged = samples[samples.benchmark == "mathvista"]
        assert judged.judge_correct.tolist() == [True] * 4
        assert vista["judge"]["accuracy"] == pytest.approx(100 * judged.judge_correct.mean())
        assert KEY not in (out / "judge_cache.jsonl").read_text()

        server.log.clear()
        again, _ = _evaluate(community_run, out, *flags)
        assert server.log == [] and again["mathvista"]["judge"]["judge_cached"] == 8
        assert again["mathvista"]["judge"]["accuracy"] == 100.0

        # the comparison table shows the judge's verdicts beside the rules' run (which has none)
        rules = community_run["tmp"] / "rules_only"
        _evaluate(community_run, rules)
        table = community_run["tmp"] / "compare"
        evaluate_compare.main([str(rules), str(out), "--names", "rules", "judged", "--metric", "judge:accuracy",
                               "--benchmarks", "mathvista", "--out", str(table), "--no-references"])
        text = (table / "comparison.md").read_text()
        assert "| mathvista [^1] | n/a | 100.0 |" in text and "rules: no judge verdicts" in text
    finally:
        server.stop()


def test_community_rules_name_a_missing_field() -> None:
    from calibrl_verl.protocols import get_protocol
    from calibrl_verl.protocols.base import ProtocolError

    item = Item("mathvista", [], "8/11", None, meta={"question": "q"}, where="mv.parquet: row 4")
    with pytest.raises(ProtocolError, match=r"mv.parquet: row 4.*extra_info.meta\['question_type'\].*eval_sets.py"):
        get_protocol("community").prompt(item)


# ------------------------------------------------------------------ rule sets without an importable reference

# MathVision: lmms-eval 0.7.3's own mathvision_process_results gave these grades to these (response, truth, options),
# run in a separate environment with latex2sympy2 (its evaluator's dependency, which pins an antlr4 runtime that
# conflicts with latex2sympy2_extended, a math-verify dependency of ours)
MATHVISION_CASES = [
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", [], True),
    ("\\boxed{C}", "C", ["1", "2", "3"], True),
    ("The answer is B.", "B", ["1", "2", "3"], True),
    ("B.", "B", ["1", "2", "3"], True),
    ("so x = 5 cm", "5cm", [], True),
    ("\\boxed{30^\\circ}", "30", [], True),
    ("The answer is 3.0", "3", [], True),
    ("\\boxed{(1, 2)}", "(1,2)", [], True),
    ("\\boxed{2\\sqrt{2}}", "2.83", [], False),  # 0.7.3's evaluator has no sqrt: no value, no match
    ("the answer is \\boxed{4} or \\boxed{5}", "5", [], True),  # the last box
    ("I cannot tell.", "7", [], False),
    ("The answer is 2", "B", ["1", "2", "3"], True),  # the option's text counts for multiple choice
    ("The final answer is 12.\nThen we stop.", "12", [], True),
    ("(B)\nbecause it fits", "B", ["1", "2", "3"], True),
    ("so x=\\frac{3}{4}", "0.75", [], True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", [], True),
    ("The answer is (C).", "C", ["1", "2", "3"], True),
    ("\\boxed{(a)}", "A", ["1", "2"], True),
    ("The answer should be 45 degrees", "45", [], False),  # "degrees" stays: only ^\circ and a few units go
    ("It is 7.", "7", [], True),
    ("\\boxed{\\pi}", "3.14", [], False),
    ("The answer is 1,000", "1000", [], True),
]


@pytest.mark.parametrize(("response", "truth", "options", "want"), MATHVISION_CASES)
def test_mathvision_rules_grade_as_the_harness(response: str, truth: str, options: list[str], want: bool) -> None:
    from calibrl_verl.protocols import mathvision

    item = _item("mathvision", {"question": "q", "choices": options, "answer": truth})
    assert mathvision.grade(item, response)["acc"] == float(want)


def test_mathvision_prompt_is_the_harness_text() -> None:
    from calibrl_verl.protocols import mathvision

    item = _item("mathvision", {"question": "Which one?", "choices": ["1", "2"], "answer": "A"})
    assert mathvision.prompt(item)[0]["content"] == (
        '<image>Please solve the problem step by step and put your answer in one "\\boxed{}".Which one?\n'
        "Choices: A. 1\nB. 2\nAnswer the question with the option's letter from the given choices directly.")


@pytest.mark.parametrize(("response", "truth", "want"), [
    ("<answer>140</answer>", "140", True), ("<think>180-40</think><answer>140</answer>", "140", True),
    ("140", "140", True), ("<answer>120</answer>", "140", False), ("<answer>\\frac{1}{2}</answer>", "0.5", True),
    ("<answer>9^9^9^9</answer>", "140", False),  # unsafe for sympy: exact match only
])
def test_geoqa_easyr1_rules(response: str, truth: str, want: bool) -> None:
    item = _item("geoqa", {}, truth)
    assert geometry.geoqa_grade(item, response)["acc"] == float(want)
    assert geometry.geoqa_prompt(_item("geoqa", {"question": "Angle?"}, truth))[0]["content"].startswith(
        "<image>Angle? A conversation between User and Assistant.")


def test_generic_rules_grade_any_answer_format() -> None:
    from calibrl_verl.protocols.community import generic_grade, generic_prompt

    item = _item("math500", {}, "\\frac{1}{2}", n_images=0, question="What is 1/2?")
    assert generic_prompt(item)[0]["content"] == (
        "What is 1/2?\nPlease reason step by step, and put your final answer within \\boxed{}.")
    grades = [generic_grade(item, r) for r in ("so \\boxed{0.5}", "<answer>1/2</answer>", "The answer is 2.", "")]
    assert [(g["acc"], g["route"]) for g in grades] == [(1.0, "boxed"), (1.0, "answer_tag"), (0.0, "answer_is"),
                                                         (0.0, "none")]
