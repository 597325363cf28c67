"""CalibRL reward: r = acc + 0.1 * format; the authors' format/extraction rules by default, ours when strict."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from calibrl_verl import reward
from calibrl_verl.reward import compute_score


def wrap(answer: str, think: str = "Let me work it out step by step.") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


def score(response: object, ground_truth: object, strict_format: bool = False) -> dict:
    return compute_score("geometry3k", response, ground_truth, extra_info={"index": 0}, strict_format=strict_format)


# --------------------------------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        "<think>reasoning</think><answer>5</answer>",
        "  \n<think>\nmulti\nline\n</think>\n\n<answer> 5 </answer>\n  ",
        "<think></think><answer>5</answer>",
        "<think>a < b and b > c</think> <answer>x</answer>",
    ],
)
def test_format_accepts_exact_think_answer(response: str) -> None:
    assert reward.format_reward(response) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "<answer>5</answer>",  # missing think
        "<think>r</think>",  # missing answer
        "<think>r</think><answer>5</answer> I am confident.",  # text after </answer>
        "Sure! <think>r</think><answer>5</answer>",  # text before <think>
        "<think>r</think> so the answer is <answer>5</answer>",  # text between the blocks
        "<think>r</think><answer>4</answer><answer>5</answer>",  # two answers
        "<think>a</think><think>b</think><answer>5</answer>",  # two thinks
        "<think>a <answer>4</answer></think><answer>5</answer>",  # answer nested in think
        "<answer>5</answer><think>r</think>",  # wrong order
        "<think>r<answer>5</answer>",  # unclosed think
        "<think>r</think><answer>5",  # unclosed answer
        "<THINK>r</THINK><ANSWER>5</ANSWER>",  # tags are case sensitive
        "",
    ],
)
def test_format_rejects_malformed(response: str) -> None:
    assert reward.format_reward(response) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# the authors' rules (default) against the strict rules (strict_format=True): every case where they differ
# --------------------------------------------------------------------------------------------------------------------

AUTHORS_VS_STRICT = [
    # (response, ground truth, authors' (acc, format), strict (acc, format))
    # any text between </think> and <answer> is allowed by the authors' format
    ("<think>r</think> so the answer is <answer>5</answer>", "5", (1.0, 1.0), (1.0, 0.0)),
    # several answer blocks: the authors grade the first one; strict grades none and rejects the format
    ("<think>r</think><answer>5</answer><answer>6</answer>", "5", (1.0, 1.0), (0.0, 0.0)),
    ("<think>r</think><answer>6</answer><answer>5</answer>", "5", (0.0, 1.0), (0.0, 0.0)),
    # an answer block inside <think> comes first, so the authors grade it
    ("<think>maybe <answer>5</answer></think><answer>6</answer>", "5", (1.0, 1.0), (0.0, 0.0)),
    # an empty first block is skipped by the authors' pattern, the next one is graded
    ("<think>r</think><answer></answer><answer>5</answer>", "5", (1.0, 1.0), (0.0, 0.0)),
    # a second think block
    ("<think>a</think><think>b</think><answer>5</answer>", "5", (1.0, 1.0), (1.0, 0.0)),
    # the authors do not strip the response: outer whitespace costs the format reward
    ("\n<think>r</think>\n<answer>5</answer>\n", "5", (1.0, 0.0), (1.0, 1.0)),
    ("  <think>r</think><answer>5</answer>", "5", (1.0, 0.0), (1.0, 1.0)),
    # the authors' pattern skips an answer that contains "<", so an inequality is never graded there
    ("<think>r</think><answer>x<3</answer>", "x<3", (0.0, 1.0), (1.0, 1.0)),
    ("<think>r</think><answer>x<3</answer><answer>x<4</answer>", "x<3", (0.0, 1.0), (0.0, 0.0)),
]


@pytest.mark.parametrize(("response", "ground_truth", "authors", "strict"), AUTHORS_VS_STRICT)
def test_authors_rules_by_default_strict_rules_on_request(
    response: str, ground_truth: str, authors: tuple[float, float], strict: tuple[float, float]
) -> None:
    for strict_format, (acc, fmt) in ((False, authors), (True, strict)):
        expected = {"score": pytest.approx(acc + 0.1 * fmt), "acc": acc, "format": fmt}
        assert score(response, ground_truth, strict_format=strict_format) == expected, (strict_format, response)
    default = compute_score("geometry3k", response, ground_truth)
    assert (default["acc"], default["format"]) == authors


@pytest.mark.parametrize(
    ("response", "authors", "strict"),
    [
        ("<think>r</think><answer>5</answer>", 1.0, 1.0),
        ("<think>r</think> text <answer>5</answer>", 1.0, 0.0),
        ("<think>a</think><think>b</think><answer>5</answer>", 1.0, 0.0),
        ("<think>a <answer>4</answer></think><answer>5</answer>", 1.0, 0.0),
        ("<think>r</think><answer>5</answer>\n", 0.0, 1.0),
        ("<think>r</think><answer>5</answer> tail", 0.0, 0.0),
        ("lead <think>r</think><answer>5</answer>", 0.0, 0.0),
        ("<answer>5</answer><think>r</think>", 0.0, 0.0),
        ("<think>r<answer>5</answer>", 0.0, 0.0),
    ],
)
def test_format_helpers(response: str, authors: float, strict: float) -> None:
    assert reward.authors_format_reward(response) == authors
    assert reward.format_reward(response) == strict


def test_answer_extraction_helpers() -> None:
    assert reward.first_answer("<answer> 5 </answer><answer>6</answer>") == "5"
    assert reward.first_answer("<answer>x<3</answer><answer>4</answer>") == "4"
    assert reward.first_answer("<answer>x<3</answer>") is None
    assert reward.first_answer("no tags") is None
    assert reward.extract_answer("<answer> 5 </answer><answer>6</answer>") is None
    assert reward.extract_answer("<answer>x<3</answer>") == "x<3"


def test_strict_format_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="strict_format"):
        compute_score("geometry3k", "<think>r</think><answer>5</answer>", "5", strict_format="false")


def test_verl_passes_strict_format_from_reward_kwargs() -> None:
    """The switch as a run sets it: verl's own loader merges reward.custom_reward_function.reward_kwargs."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    response = "<think>r</think><answer>5</answer><answer>6</answer>"
    fns = {}
    for strict in (False, True):
        fn_cfg = {"path": "pkg://calibrl_verl.reward", "name": "compute_score", "reward_kwargs": {}}
        if strict:
            fn_cfg["reward_kwargs"] = {"strict_format": True}
        fns[strict] = get_custom_reward_fn(OmegaConf.create({"reward": {"custom_reward_function": fn_cfg}}))
    call = {"data_source": "geometry3k", "solution_str": response, "ground_truth": "5", "extra_info": {}}
    assert fns[False](**call) == {"score": pytest.approx(1.1), "acc": 1.0, "format": 1.0}
    assert fns[True](**call) == {"score": 0.0, "acc": 0.0, "format": 0.0}


# --------------------------------------------------------------------------------------------------------------------
# accuracy: extraction traps
# --------------------------------------------------------------------------------------------------------------------


def test_answer_outside_tags_is_not_graded() -> None:
    result = score("<think>The answer is 5.</think> 5", "5")
    assert result == {"score": 0.0, "acc": 0.0, "format": 0.0}


def test_two_answer_blocks_get_no_accuracy_even_if_one_is_right() -> None:
    """Strict rules only: the authors' default grades the first block (test_authors_rules_by_default_...)."""
    for response in (
        "<think>r</think><answer>5</answer><answer>6</answer>",
        "<think>r</think><answer>6</answer><answer>5</answer>",
        "<think>maybe <answer>5</answer></think><answer>5</answer>",
    ):
        assert score(response, "5", strict_format=True) == {"score": 0.0, "acc": 0.0, "format": 0.0}, response


def test_single_answer_block_with_trailing_text_keeps_accuracy_but_loses_format() -> None:
    result = score("<think>r</think><answer>5</answer> Done.", "5")
    assert result == {"score": 1.0, "acc": 1.0, "format": 0.0}


def test_missing_think_keeps_accuracy_but_loses_format() -> None:
    result = score("<answer>5</answer>", "5")
    assert result == {"score": 1.0, "acc": 1.0, "format": 0.0}


@pytest.mark.parametrize("answer", ["", "   ", "$$", "\\boxed{}", "\\text{}"])
def test_empty_answer_is_wrong(answer: str) -> None:
    result = score(wrap(answer), "5")
    assert result["acc"] == 0.0
    assert result["score"] == pytest.approx(0.1 * result["format"])


def test_unclosed_answer_is_wrong() -> None:
    assert score("<think>r</think><answer>5", "5")["acc"] == 0.0


# --------------------------------------------------------------------------------------------------------------------
# accuracy: multiple choice
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "ground_truth", "expected"),
    [
        ("A", "A", 1.0),
        ("(A) 12", "A", 1.0),
        ("A.", "A", 1.0),
        ("(A)", "A", 1.0),
        ("A. 12", "A", 1.0),
        ("A", "(A)", 1.0),
        ("A", "A.", 1.0),
        ("A", "A) 12", 1.0),
        ("\\boxed{C}", "C", 1.0),
        ("$D$", "D", 1.0),
        ("\\text{(B)}", "B", 1.0),
        ("Answer: B", "B", 1.0),
        ("The correct option is (E)", "E", 1.0),
        ("B", "A", 0.0),
        ("(B) 12", "A", 0.0),
        ("12", "A", 0.0),  # the option text alone is not the letter
        ("A B", "A", 0.0),  # several letters
        ("(A) (B)", "A", 0.0),
        ("A rectangle", "A", 0.0),  # a word starting with the letter is not an option
        ("a", "A", 0.0),  # option letters are upper case
        ("(J)", "J", 1.0),  # letters run A-K, as in the authors' code
        ("K. 12", "K", 1.0),
        ("I", "(I)", 1.0),
        ("Answer: K", "K", 1.0),
        ("(J)", "K", 0.0),
    ],
)
def test_multiple_choice_compares_option_letters(answer: str, ground_truth: str, expected: float) -> None:
    assert score(wrap(answer), ground_truth)["acc"] == expected


def test_option_letter_parsing() -> None:
    assert reward.option_letter("(C) 3\\sqrt{2}") == "C"
    assert reward.option_letter("D: 45°") == "D"
    assert reward.option_letter("C") == "C"
    assert reward.option_letter("Cat") is None
    assert reward.option_letter("12") is None
    assert reward.option_letter("(K) 7") == "K"
    assert reward.option_letter("(L) 7") is None


# --------------------------------------------------------------------------------------------------------------------
# accuracy: math normalisation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "ground_truth"),
    [
        ("1/2", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "1/2"),
        ("\\tfrac{1}{2}", "0.5"),
        ("$\\frac{1}{2}$", "1/2"),
        ("-\\frac{3}{4}", "-0.75"),
        ("30^\\circ", "30"),
        ("30^{\\circ}", "30"),
        ("30°", "30"),
        ("30 degrees", "30"),
        ("30", "30^\\circ"),
        ("12 cm", "12"),
        ("12\\text{ cm}", "12"),
        ("12 \\mathrm{cm}^2", "12"),
        ("12", "12 cm"),
        ("5 m", "5"),
        ("25\\%", "25"),
        ("25%", "25\\%"),
        ("\\text{Yes}", "yes"),
        ("7.", "7"),
        ("7.0", "7"),
        ("\\boxed{7}", "7"),
        ("$\\boxed{7}$", "7"),
        ("x = 7", "7"),
        ("\\angle ABC = 40", "40"),
        ("1,000", "1000"),
        ("2 \\sqrt{3}", "2\\sqrt{3}"),
        ("\\sqrt{12}", "2\\sqrt{3}"),
        ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"),
        ("4\\pi", "4 \\pi"),
        ("y^2 + x^2", "x^2+y^2"),
        ("\\left(3, 4\\right)", "(3,4)"),
    ],
)
def test_equivalent_answers_are_correct(answer: str, ground_truth: str) -> None:
    result = score(wrap(answer), ground_truth)
    assert result == {"score": 1.1, "acc": 1.0, "format": 1.0}


@pytest.mark.parametrize(
    ("answer", "ground_truth"),
    [
        ("6", "5"),
        ("0.55", "\\frac{1}{2}"),
        ("0.33", "1/3"),
        ("3.46", "2\\sqrt{3}"),  # rounded decimal is not the exact value
        ("31^\\circ", "30"),
        ("120 cm", "12"),
        ("no", "yes"),
        ("x = 5", "x = 6"),
        ("(4, 3)", "(3,4)"),
        ("-5", "5"),
    ],
)
def test_different_answers_are_wrong(answer: str, ground_truth: str) -> None:
    result = score(wrap(answer), ground_truth)
    assert result == {"score": pytest.approx(0.1), "acc": 0.0, "format": 1.0}


def test_ground_truth_with_wrappers_and_numbers() -> None:
    assert score(wrap("5"), "\\boxed{5}")["acc"] == 1.0
    assert score(wrap("5"), 5)["acc"] == 1.0
    assert score(wrap("2.5"), 2.5)["acc"] == 1.0
    assert score(wrap("5"), ["4", "5"])["acc"] == 1.0
    assert score(wrap("6"), ["4", "5"])["acc"] == 0.0


# --------------------------------------------------------------------------------------------------------------------
# robustness
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("response", [None, 5, 3.2, b"<think>r</think><answer>5</answer>", ["x"], {"a": 1}])
def test_non_string_response_scores_zero(response: object) -> None:
    assert score(response, "5") == {"score": 0.0, "acc": 0.0, "format": 0.0}


def test_none_ground_truth_gives_no_accuracy() -> None:
    assert score(wrap("5"), None) == {"score": pytest.approx(0.1), "acc": 0.0, "format": 1.0}


@pytest.mark.parametrize(
    "answer",
    [
        "9^{9^{9^{9}}}",
        "9**9**9**9",
        "99999999!",
        "10^{100000000}",
        "\\binom{100000000}{50000000}",
        "__import__('os').system('echo pwned')",
        "x" * 5000,
        "{" * 500 + "}" * 499,
        "\\frac{1}{0}",
        "1/0",
        "\\u0000\x00\udcff",
        "\\sqrt{",
        "}}}{{{",
    ],
)
def test_adversarial_answers_are_fast_and_wrong(answer: str) -> None:
    start = time.perf_counter()
    result = score(wrap(answer), "1")
    assert time.perf_counter() - start < 5.0
    assert result["acc"] == 0.0
    assert set(result) == {"score", "acc", "format"}


def test_score_is_acc_plus_tenth_of_format_for_many_cases() -> None:
    cases = [
        (wrap("5"), "5"),
        (wrap("4"), "5"),
        ("<answer>5</answer>", "5"),
        ("5", "5"),
        (wrap("(B)"), "B"),
        ("<think>r</think><answer>5</answer>tail", "5"),
    ]
    seen = set()
    for response, truth in cases:
        result = score(response, truth)
        assert result["acc"] in (0.0, 1.0) and result["format"] in (0.0, 1.0)
        assert result["score"] == pytest.approx(result["acc"] + 0.1 * result["format"])
        seen.add((result["acc"], result["format"]))
    assert seen == {(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)}


def test_symbolic_fallback_works_off_the_main_thread() -> None:
    """verl may call the reward from worker threads; math_verify's signal timeouts must be off there."""
    assert reward.math_verify is not None and reward.grade_answer is not None

    def run() -> tuple[bool, bool, str]:
        return (
            reward._math_verify_equal("\\sqrt{12}", "2\\sqrt{3}"),
            score(wrap("\\sqrt{12}"), "2\\sqrt{3}")["acc"] == 1.0,
            threading.current_thread().name,
        )

    with ThreadPoolExecutor(max_workers=1) as pool:
        verified, correct, thread_name = pool.submit(run).result(timeout=30)
    assert thread_name != threading.main_thread().name
    assert verified and correct
    assert reward._math_verify_equal("\\sqrt{12}", "3") is False


def test_to_number_parses_without_eval() -> None:
    assert reward.to_number("\\frac{3}{4}") == pytest.approx(0.75)
    assert reward.to_number("-\\frac{3}{4}") == pytest.approx(-0.75)
    assert reward.to_number("1,234.5") == pytest.approx(1234.5)
    assert reward.to_number("3 / 6") == pytest.approx(0.5)
    assert reward.to_number("1/0") is None
    assert reward.to_number("2+3") is None
