"""The next-sentence task of benchmarks/next_sentence.py: deterministic, the gold choice is the sentence that
really follows the passage, choices distinct, distractors from other articles, no heading text anywhere."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

from losa_cli.runtime import resolve_tasks

MODULE = Path(__file__).resolve().parents[1] / "benchmarks" / "next_sentence.py"
WORDS = ("river", "castle", "engine", "winter", "market", "poet", "harbour", "treaty", "signal", "garden", "copper",
         "island", "theory", "battle", "railway", "opera", "planet", "forest", "bishop", "cotton")


@pytest.fixture(scope="module")
def next_sentence():
    spec = importlib.util.spec_from_file_location("next_sentence", MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def articles_text(articles: int = 8, seed: int = 0) -> tuple[str, dict[str, str]]:
    """Wiki-style articles: ``= Title =``, section headings, a caption line, paragraphs of numbered sentences
    (each sentence unique); and the article title of every sentence."""
    rng = random.Random(seed)
    lines, serial, article_of = [], 0, {}
    for a in range(articles):
        lines += [f"= Article {a} =", ""]
        for section in range(2):
            lines += [f"== Section {section} ==", "", f"A caption of article {a} without a full stop", "",
                      f"thumb|a caption of article {a}, a picture of its river and castle.", ""]
            for _ in range(2):
                sentences = []
                for _ in range(rng.randint(6, 9)):
                    serial += 1
                    words = [rng.choice(WORDS) for _ in range(rng.randint(7, 14))]
                    sentences.append(f"Item{serial} " + " ".join(words) + ".")
                    article_of[sentences[-1]] = f"Article {a}"
                lines += [" ".join(sentences), ""]
    return "\n".join(lines), article_of


def words(text: str) -> int:
    return len(text.split())


def test_questions_are_deterministic_and_gold_is_the_next_sentence(next_sentence, tmp_path):
    text, article_of = articles_text()
    questions = next_sentence.build_questions(text, words, questions=12, seed=3)
    assert len(questions) == 12
    assert questions == next_sentence.build_questions(text, words, questions=12, seed=3)
    assert questions != next_sentence.build_questions(text, words, questions=12, seed=4)
    paragraphs = {line for line in text.splitlines() if line.startswith("Item")}
    assert len({q.gold for q in questions}) > 1  # the gold position is drawn, not fixed
    for q in questions:
        assert len(q.choices) == 4 and len(set(q.choices)) == 4
        answer = q.choices[q.gold]
        # the query and the gold choice are consecutive in one paragraph of the source
        assert any(f"{q.query} {answer}" in paragraph for paragraph in paragraphs), q
        assert 60 <= words(q.query) <= 150
        assert article_of[answer] == q.article
        assert all(article_of[c] != q.article for i, c in enumerate(q.choices) if i != q.gold)
        for piece in [q.query, *q.choices]:
            assert "=" not in piece and "caption" not in piece


def test_the_task_file_is_what_losa_eval_reads(next_sentence, tmp_path):
    questions = next_sentence.build_questions(articles_text()[0], words, questions=5, seed=0)
    path = next_sentence.write_task(questions, tmp_path / "next_sentence.jsonl")
    (task,) = resolve_tasks([str(path)])
    assert task.name == "next_sentence"
    assert task.rows == [q.row() for q in questions]


def test_sentences_split_at_ends_not_at_initials(next_sentence):
    line = 'In 1901 A. S. Neill met Dr. Smith. He left. "It rained." Then c. 1910 it ended.'
    assert next_sentence.split_sentences(line) == ["In 1901 A. S. Neill met Dr. Smith.", "He left.",
                                                   '"It rained."', "Then c. 1910 it ended."]
