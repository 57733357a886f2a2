"""ASD (methods.md §4.1): determinism, style shares, MCQ options, grading, unconvertible rows."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cladapt.data.rows import Example
from cladapt.train.asd import RFP, asd, grade, to_jsonl_rows
from cladapt.train.asd_explain import ExplainRequest, base_model_generator, clean_explanation, normalize_answer

LABELS = ["Company", "Artist", "Film", "Plant", "Village", "Album"]


def rows(n: int, labels: list[str] = LABELS, *, file: str = "task.jsonl") -> list[Example]:
    out = []
    for i in range(n):
        msgs = [
            {"role": "user", "content": f"What is the topic of the following paragraph?\nText: item number {i}"},
            {"role": "assistant", "content": labels[i % len(labels)]},
        ]
        out.append(Example(msgs, file, i + 1, {"task": "topics"}))
    return out


def fake_generator(requests: list[ExplainRequest]) -> list[str | None]:
    return [f"the text describes a {r.gold.lower()} in about {r.words} words of detail here." for r in requests]


def converted(result) -> list[Example]:  # noqa: ANN001
    return [e for e in result.examples if "style" in e.meta]


def test_same_seed_byte_identical_other_seed_differs() -> None:
    data = rows(120)
    a = asd(data, seed=3, generator=fake_generator, generator_id="fake")
    b = asd(data, seed=3, generator=fake_generator, generator_id="fake")
    c = asd(data, seed=4, generator=fake_generator, generator_id="fake")
    assert to_jsonl_rows(a.examples) == to_jsonl_rows(b.examples)
    assert a.report.to_json() == b.report.to_json()
    assert to_jsonl_rows(a.examples) != to_jsonl_rows(c.examples)


@pytest.mark.parametrize(("n", "percent"), [(200, 20), (37, 20), (101, 35), (13, 50)])
def test_style_shares_equal(n: int, percent: float) -> None:
    result = asd(rows(n), percent=percent, seed=1, generator=fake_generator, generator_id="fake")
    k = round(n * percent / 100)
    counts = Counter(e.meta["style"] for e in converted(result))
    assert set(counts) <= {"YN", "MCQ", "BE", "DE"} and sum(counts.values()) == k
    for style in ("YN", "MCQ", "BE", "DE"):
        assert abs(counts[style] - k / 4) <= 1, (style, counts)
    assert result.report.counts == {s: counts[s] for s in ("YN", "MCQ", "BE", "DE")}
    assert result.report.to_json()["converted"] == k


def test_unconverted_rows_untouched_and_order_kept() -> None:
    data = rows(50)
    result = asd(data, seed=0, generator=fake_generator, generator_id="fake")
    assert len(result.examples) == len(data)
    for before, after in zip(data, result.examples, strict=True):
        assert (after.file, after.line) == (before.file, before.line)
        if "style" not in after.meta:
            assert after is before
        else:
            assert after.meta["gold"] == before.answer and after.meta["task"] == "topics"
            assert after.prompt_text.endswith(RFP[after.meta["style"]])
    assert asd(data, percent=0).examples == data


def test_native_style_is_excluded() -> None:
    result = asd(rows(80), percent=50, seed=0, original_style="MCQ", generator=fake_generator, generator_id="f")
    assert set(result.report.counts) == {"YN", "SA", "BE", "DE"}


def test_mcq_has_exactly_one_correct_option() -> None:
    result = asd(rows(300), percent=100, seed=2, generator=fake_generator, generator_id="fake")
    mcq = [e for e in converted(result) if e.meta["style"] == "MCQ"]
    assert len(mcq) == 75
    for e in mcq:
        info = e.meta["meta"]["asd"]
        opts = info["options"]
        assert len(opts) == 4 and len({normalize_answer(o) for o in opts}) == 4
        assert sum(normalize_answer(o) == normalize_answer(e.meta["gold"]) for o in opts) == 1
        assert opts["ABCD".index(e.answer)] == e.meta["gold"]
        for letter, opt in zip("ABCD", opts, strict=True):
            assert f"\n{letter}. {opt}\n" in e.prompt_text
    # the gold's position is spread over the letters
    assert len(Counter(e.answer for e in mcq)) == 4


def test_mcq_with_few_labels_uses_fewer_options() -> None:
    result = asd(rows(40, ["yes", "no"]), percent=100, seed=0, generator=None)
    mcq = [e for e in converted(result) if e.meta["style"] == "MCQ"]
    assert mcq and all(len(e.meta["meta"]["asd"]["options"]) == 2 for e in mcq)


def test_every_converted_row_grades_correct_on_its_target() -> None:
    result = asd(rows(400), percent=100, seed=5, generator=fake_generator, generator_id="fake")
    styles = Counter()
    for e in converted(result):
        style = e.meta["style"]
        styles[style] += 1
        assert grade(style, e.answer, e.meta), (style, e.answer)
        assert grade(style, "  " + e.answer + "\n", e.meta)
    assert set(styles) == {"YN", "MCQ", "BE", "DE"}
    yn = Counter(e.answer for e in converted(result) if e.meta["style"] == "YN")
    assert yn["Yes"] > 30 and yn["No"] > 30


def test_wrong_replies_grade_incorrect() -> None:
    result = asd(rows(200), percent=100, seed=5, generator=fake_generator, generator_id="fake")
    for e in converted(result):
        style, info = e.meta["style"], e.meta["meta"]["asd"]
        if style == "MCQ":
            wrong = next(letter for letter in "ABCD" if letter != e.answer)
            assert not grade(style, wrong, e.meta)
            assert grade(style, f"The answer is {e.answer}.", e.meta)
            assert grade(style, e.meta["gold"], e.meta)  # the option text itself
        elif style == "YN":
            assert not grade(style, "No" if e.answer == "Yes" else "Yes", e.meta)
            assert not grade(style, "Maybe", e.meta)
        else:
            other = next(lab for lab in LABELS if lab != e.meta["gold"])
            assert not grade(style, f"{other}. because of reasons", e.meta)
            assert info["target"] == e.answer


def test_grading_rules() -> None:
    mcq = {"gold": "Film", "meta": {"asd": {"letter": "B", "options": ["Album", "Film", "Plant", "Artist"]}}}
    assert grade("MCQ", "I think B", mcq)  # 'I' is not an option letter
    assert grade("MCQ", "B. Film", mcq) and not grade("MCQ", "(C)", mcq)
    assert grade("MCQ", "film", mcq)
    yn = {"gold": "Film", "meta": {"asd": {"target": "No"}}}
    assert grade("YN", "no, it is not", yn) and not grade("YN", "Not really", yn)
    assert grade("BE", "St. Louis. It is a city.", {"gold": "St. Louis"})
    assert grade("BE", "film\nbecause", {"gold": "Film"})
    assert grade("SA", " The  FILM! ", {"gold": "the film"}) and not grade("SA", "film", {"gold": "the film"})
    with pytest.raises(ValueError):
        grade("XX", "a", {"gold": "a"})


def test_no_generator_redistributes_be_de() -> None:
    n = 100
    result = asd(rows(n), percent=20, seed=0, generator=None)
    counts = Counter(e.meta["style"] for e in converted(result))
    assert set(counts) == {"YN", "MCQ"} and all(abs(c - 10) <= 1 for c in counts.values())
    report = result.report.to_json()
    assert report["redistributed"] == {"from": ["BE", "DE"], "to": ["YN", "MCQ"]}
    assert report["generator"] == "none"


def test_unconvertible_rows_are_reported() -> None:
    data = rows(60)
    long_gold = " ".join(["word"] * 70)
    for i in range(0, 60, 3):
        data[i].messages[-1]["content"] = long_gold

    def flaky(requests: list[ExplainRequest]) -> list[str | None]:
        return [None if k % 2 else "a fine explanation of the answer." for k in range(len(requests))]

    result = asd(data, percent=100, seed=0, generator=flaky, generator_id="flaky")
    reasons = Counter(s.reason.split(" (")[0].split(":")[0] for s in result.report.skipped)
    assert reasons["gold answer longer than 64 tokens"] > 0 and reasons["generator failure"] > 0
    for s in result.report.skipped:
        line = int(s.where.rsplit(":", 1)[1])
        assert s.where == f"task.jsonl:{line}"
        kept = result.examples[line - 1]
        assert "style" not in kept.meta  # the row keeps its original style
        if s.reason.startswith("gold answer longer"):
            assert s.style in ("MCQ", "YN") and kept.answer == long_gold
    assert sum(result.report.counts.values()) + len(result.report.skipped) == 60
    single = asd(rows(20, ["same"]), percent=100, seed=0, generator=None)
    assert {s.reason for s in single.report.skipped} == {"fewer than 2 distinct candidate answers for MCQ",
                                                         "fewer than 2 distinct candidate answers for YN"}


def test_token_counter_and_explicit_labels() -> None:
    data = rows(40)
    result = asd(data, percent=100, seed=0, generator=None, count_tokens=lambda s: 100 if s == "Film" else 1,
                 labels=["Company", "Artist", "Film", "Plant", "Village", "Album", "Building"])
    assert result.report.label_set == {"kind": "given", "size": 6, "too_long": 1}
    for e in converted(result):
        assert e.meta["gold"] != "Film"
        assert "Film" not in e.meta["meta"]["asd"].get("options", [])


def test_only_previews_a_subset_with_the_same_plan() -> None:
    data = rows(100)
    full = asd(data, seed=9, generator=fake_generator, generator_id="f")
    picked = [i for i, e in enumerate(full.examples) if "style" in e.meta][:5]
    part = asd(data, seed=9, generator=fake_generator, generator_id="f", only=picked)
    for i in picked:
        assert part.examples[i].messages == full.examples[i].messages
    assert sum(part.report.counts.values()) == 5


def test_clean_explanation() -> None:
    assert clean_explanation("  It is\na film.  The plot", 8) == "It is a film."
    assert clean_explanation("no end here at all", 20) == "no end here at all."
    assert clean_explanation("", 20) is None and clean_explanation("too short", 20) is None


def test_base_model_generator_is_batched_and_deterministic(tiny_loaded) -> None:  # noqa: ANN001
    model, tok, _ = tiny_loaded
    calls = []
    gen = base_model_generator(model, tok, batch_size=4)

    def counting(requests):  # noqa: ANN001, ANN202
        calls.append(len(requests))
        return gen(requests)

    data = rows(30)
    a = asd(data, percent=40, seed=0, generator=counting, generator_id="tiny")
    b = asd(data, percent=40, seed=0, generator=gen, generator_id="tiny")
    assert calls == [6]  # one call with every BE/DE row (batched inside)
    assert to_jsonl_rows(a.examples) == to_jsonl_rows(b.examples)
    assert a.report.counts["BE"] + a.report.counts["DE"] + len(a.report.skipped) == 6


def test_plan_is_stable_under_row_edits() -> None:
    data = rows(60)
    a = asd(data, seed=0, generator=None)
    edited = list(data)
    edited[0] = Example([dict(m) for m in data[0].messages], "task.jsonl", 1, {})
    edited[0].messages[0]["content"] += " (edited)"
    b = asd(edited, seed=0, generator=None)
    same = [i for i in range(1, 60) if a.examples[i].messages == b.examples[i].messages]
    assert len(same) == 59


def test_global_random_state_untouched() -> None:
    state = random.getstate()
    asd(rows(40), seed=0, generator=fake_generator, generator_id="f")
    assert random.getstate() == state


def test_explanations_that_contradict_or_copy_are_rejected() -> None:
    data = rows(40)

    def contrary(requests: list[ExplainRequest]) -> list[str | None]:
        out: list[str | None] = []
        for k, r in enumerate(requests):
            wrong = next(lab for lab in LABELS if lab != r.gold)
            copied = " ".join(r.question.split()[:14])
            out.append([f"it is clearly about a {wrong.lower()} here.", copied, f"a {r.gold} it is."][k % 3])
        return out

    result = asd(data, percent=100, seed=0, generator=contrary, generator_id="contrary")
    reasons = {s.reason.split(" (")[0] for s in result.report.skipped}
    assert reasons == {"generator failure: the explanation names another answer",
                       "generator failure: the explanation copies the question"}
    kept = [e for e in converted(result) if e.meta["style"] in ("BE", "DE")]
    assert kept and all(e.answer.startswith(f"{e.meta['gold']}. a {e.meta['gold']} it is.") for e in kept)


def test_looping_explanation_is_rejected() -> None:
    from cladapt.train.asd_explain import explanation_problem

    loop = "Film because sports, sports, sports, sports, sports, sports."
    assert explanation_problem(loop, "q", "Film", []) == "generator failure: the explanation repeats itself"
    assert explanation_problem("Film, since it is a film about a film.", "q", "Film", []) is None
