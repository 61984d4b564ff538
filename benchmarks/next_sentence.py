"""A local 4-choice next-sentence task from enwiki-articles.txt, scored through ``losa eval --tasks``.

Perplexity alone does not say whether a recovered model still *works*: a model can buy back
perplexity on frequent tokens and still lose track of what a text is about.  This task asks for
that: each question is a passage of consecutive sentences from one paragraph of a Wikipedia
article (the query, about 60-150 SmolLM2 tokens), and the choices are the sentence that really
follows it plus three distractors.  The model is scored exactly as ``losa eval --tasks FILE``
scores any local task (lm-eval: ``acc`` = highest summed log-likelihood of ``" " + choice``,
``acc_norm`` = highest per character).

How it is built (deterministic from ``--seed``; the text is read from ../shared/data and the
derived questions are written to a temporary folder, never into the repository):
* the text is split into articles at ``= Title =`` lines; section headings (``== ... ==``), list
  and table lines, and image-caption fragments (lines not ending in . ! or ?) are skipped;
* lines are split into sentences at . ! ? followed by a capital (not after initials such as
  "A. S." nor after Mr, Dr, St, c, ...);
* the answer is a sentence of 40-250 characters (no fragments, no run-ons), the passage the
  fewest preceding sentences of its line that reach 60 tokens (refused above 150);
* at most one question per article per round, articles in seeded order, so 100 questions
  spread over the 106 articles rather than coming from the longest few;
* distractors: three sentences of similar length (within 20% of the answer's characters) from
  *other* articles, distinct from each other and from the answer; the gold position is seeded.

Why distractors from other articles: the task then measures whether the model keeps the topic and
the entities of the passage (what heavy pruning loses first), with length (which ``acc`` is biased
by) held equal.  Measured on SmolLM2-135M, seed 0, 100 questions (2 busy CPU cores):
dense acc 0.65 +- 0.05 (acc_norm 0.75), one-shot Wanda 70% acc 0.31 +- 0.05 (acc_norm 0.38), chance
0.25: the dense model is far above chance and the pruned one near it, so recovery has the whole
0.31..0.65 range to show what it buys back.  Harder distractors (same article, further away) were
not needed, and would likely bring the dense model nearer chance.  Cost: 400 scored continuations
of about 115 tokens, about as many tokens as the 2 x 32 x 512 perplexity windows (4.3 CPU-minutes
here, 7-8.5 wall minutes with the machine loaded 6 deep on 2 cores).

    python benchmarks/next_sentence.py                       # build the file, print the losa eval command
    python benchmarks/next_sentence.py --model smollm2-135m  # ... and score a model (folder or name)
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "enwiki-articles.txt"
CHOICES = 4
PASSAGE_TOKENS = (60, 150)  # the query: fewest preceding sentences reaching the low end, refused above the high
ANSWER_CHARS = (40, 250)  # the true sentence, and so (within LENGTH_TOLERANCE) every distractor
LENGTH_TOLERANCE = 0.2
#: a period after these words (or after a single capital: initials) does not end a sentence
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "no", "c", "ca", "fl", "e.g", "i.e", "etc", "u.s",
                 "mt", "ft", "gen", "col", "lt", "sgt", "rev", "prof", "vol", "pp", "op", "cf"}
_BOUNDARY = re.compile(r"[.!?][\"'”’)]*\s+(?=[\"'“(]?[A-Z])")
_WHOLE = re.compile(r"[\"'“(]?[A-Z].*[.!?][\"'”’)]*", re.DOTALL)


@dataclass(frozen=True)
class Question:
    query: str
    choices: list[str]
    gold: int
    article: str

    def row(self) -> dict[str, Any]:
        """One line of a ``losa eval --tasks`` file (zeroshot.py: query, choices, gold)."""
        return {"query": self.query, "choices": self.choices, "gold": self.gold}


def is_heading(line: str) -> bool:
    """``= Title =`` (an article) or ``== Section ==`` (any depth)."""
    return line.startswith("=") and line.endswith("=")


def split_articles(text: str) -> list[tuple[str, list[str]]]:
    """(title, prose lines) per article; headings, list/table lines and caption fragments left out."""
    articles: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if re.fullmatch(r"= [^=].* =", line):
            articles.append((line.strip("= "), []))
        elif articles and line and not is_heading(line) and line[0] not in "*#|{:;!" and line[-1] in ".!?\"'”)":
            articles[-1][1].append(line)
    return [(title, lines) for title, lines in articles if lines]


def split_sentences(line: str) -> list[str]:
    """A paragraph's sentences: cut at . ! ? (and closing quotes) before a capital, except after an
    abbreviation or an initial."""
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(line):
        before = line[start:match.start() + 1].rsplit(None, 1)[-1].rstrip(".!?").lower()
        if line[match.start()] == "." and (before in ABBREVIATIONS or re.fullmatch(r"[a-z]", before)):
            continue
        sentences.append(line[start:match.end()].strip())
        start = match.end()
    sentences.append(line[start:].strip())
    return [s for s in sentences if s]


def _answer_fits(sentence: str) -> bool:
    """A whole sentence of answer length: a capital first, . ! or ? last (no caption, no heading)."""
    return (ANSWER_CHARS[0] <= len(sentence) <= ANSWER_CHARS[1] and _WHOLE.fullmatch(sentence) is not None
            and not is_heading(sentence))


def _passage_before(sentences: list[str], answer: int, count_tokens: Callable[[str], int]) -> str | None:
    """The fewest sentences right before ``answer`` that reach PASSAGE_TOKENS[0] tokens, or None."""
    for first in range(answer - 1, -1, -1):
        passage = " ".join(sentences[first:answer])
        tokens = count_tokens(passage)
        if tokens > PASSAGE_TOKENS[1]:
            return None
        if tokens >= PASSAGE_TOKENS[0]:
            return passage
    return None


def build_questions(text: str, count_tokens: Callable[[str], int], questions: int = 100, seed: int = 0
                    ) -> list[Question]:
    """``questions`` next-sentence questions from ``text`` (see the module docstring), the same for the
    same text, tokenizer and seed.  Fewer when the text has fewer usable passages."""
    rng = random.Random(seed)
    articles = split_articles(text)
    paragraphs = [[split_sentences(line) for line in lines] for _, lines in articles]
    pool = sorted(
        (len(s), s, index) for index, article in enumerate(paragraphs) for line in article for s in line
        if _answer_fits(s)
    )
    lengths = [length for length, _, _ in pool]
    # every (article, line, answer) a question could be made of, each article's in seeded order
    candidates = [
        [(li, si) for li, line in enumerate(article) for si in range(1, len(line)) if _answer_fits(line[si])]
        for article in paragraphs
    ]
    for options in candidates:
        rng.shuffle(options)
    order = list(range(len(articles)))
    rng.shuffle(order)
    made: list[Question] = []
    used_lines: set[tuple[int, int]] = set()
    while len(made) < questions and any(candidates):
        for index in order:  # one round: at most one question per article
            if len(made) == questions:
                break
            while candidates[index]:
                li, si = candidates[index].pop()
                if (index, li) in used_lines:
                    continue
                line = paragraphs[index][li]
                passage = _passage_before(line, si, count_tokens)
                if passage is None:
                    continue
                distractors = _distractors(line[si], index, pool, lengths, rng)
                if distractors is None:
                    continue
                used_lines.add((index, li))
                gold = rng.randrange(CHOICES)
                choices = distractors[:gold] + [line[si]] + distractors[gold:]
                made.append(Question(passage, choices, gold, articles[index][0]))
                break
    return made


def _distractors(answer: str, article: int, pool: list[tuple[int, str, int]], lengths: list[int],
                 rng: random.Random) -> list[str] | None:
    """CHOICES - 1 distinct sentences of similar length from other articles, or None when too few."""
    low = bisect.bisect_left(lengths, len(answer) * (1 - LENGTH_TOLERANCE))
    high = bisect.bisect_right(lengths, len(answer) * (1 + LENGTH_TOLERANCE))
    window = [sentence for _, sentence, where in pool[low:high] if where != article and sentence != answer]
    window = list(dict.fromkeys(window))
    if len(window) < CHOICES - 1:
        return None
    return rng.sample(window, CHOICES - 1)


def default_task_file(questions: int, seed: int) -> Path:
    """Where the task is written: a temporary folder (the derived text stays out of the repository); the
    file's stem, ``next_sentence``, is the task's name in lm-eval's and losa's output."""
    return Path(tempfile.gettempdir()) / "losa-next-sentence" / f"seed{seed}-q{questions}" / "next_sentence.jsonl"


def write_task(questions: list[Question], path: Path) -> Path:
    """The questions as a ``losa eval --tasks`` JSONL file (written whole, then moved into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(json.dumps(q.row(), ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    staging.replace(path)
    return path


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Tokens of a text without special tokens (the passage's length as the model sees it)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M's tokenizer alone (from the offline GGUF; the weights are not loaded)."""
    from transformers import AutoTokenizer

    from losa_cli.core.modeling import resolve_source

    source = resolve_source("smollm2-135m")
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


def ensure_task(questions: int = 100, seed: int = 0, tokenizer: Any = None, path: Path | None = None) -> Path:
    """The task file for (questions, seed), built from enwiki-articles.txt with ``tokenizer`` (default
    SmolLM2's); rebuilt every time (a second or two), so a stale file is never scored."""
    counter = token_counter(tokenizer if tokenizer is not None else smollm2_tokenizer())
    made = build_questions(TEXT.read_text(encoding="utf-8"), counter, questions, seed)
    return write_task(made, path or default_task_file(questions, seed))


def eval_command(model: str, task: Path, device: str = "cpu") -> str:
    """The ``losa eval`` command that gives the same numbers as ``next_sentence_accuracy``."""
    return f"losa eval --model {model} --tasks {task} --device {device}"


def next_sentence_accuracy(model: Any, questions: int = 100, seed: int = 0, device: str = "cpu",
                           task: Path | None = None, batch_size: int = 1) -> dict[str, Any]:
    """Accuracy on the next-sentence task through losa's zero-shot path: ``model`` is a model folder or
    name (scored by ``run_eval``, as ``losa eval --tasks`` does) or a loaded model (``LoadedModel`` or
    anything with ``.model`` and ``.tokenizer``; scored by ``run_zeroshot``, the function ``run_eval``
    calls once it has loaded the model).  ``task``: an existing task file; default: built now."""
    import torch

    from losa_cli.runtime import EvalConfig, resolve_tasks, run_eval, run_zeroshot

    tokenizer = getattr(model, "tokenizer", None)
    task = task or ensure_task(questions, seed, tokenizer)
    started = time.perf_counter()
    if isinstance(model, (str, Path)):
        result = run_eval(EvalConfig(model=str(model), tasks=[str(task)], device=device, batch_size=batch_size))
        zeroshot = result.zeroshot
    else:
        zeroshot = run_zeroshot(model.model, model.tokenizer, resolve_tasks([str(task)]), batch_size=batch_size,
                                device=torch.device(device))
    scores = zeroshot.tasks[0]
    return {
        "acc": scores.acc,
        "acc_norm": scores.acc_norm,
        "stderr": scores.acc_stderr,
        "acc_norm_stderr": scores.acc_norm_stderr,
        "questions": scores.samples,
        "seconds": time.perf_counter() - started,
        "task": str(task),
        "sha256": scores.sha256,
        "seed": seed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="which passages, distractors and gold positions")
    parser.add_argument("--out", type=Path, help="the task file (default: a temporary folder)")
    parser.add_argument("--model", action="append", default=[],
                        help="score this model folder or name (repeatable), e.g. smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", type=int, default=0, help="print the first N questions")
    args = parser.parse_args()
    task = ensure_task(args.questions, args.seed, path=args.out)
    rows = [json.loads(line) for line in task.read_text(encoding="utf-8").splitlines()]
    print(f"wrote {len(rows)} questions to {task}")
    for row in rows[: args.show]:
        print(json.dumps(row, ensure_ascii=False, indent=1))
    for model in args.model:
        print(eval_command(model, task, args.device), flush=True)
        scores = next_sentence_accuracy(model, args.questions, args.seed, args.device, task=task)
        print(json.dumps({"model": model, **scores}), flush=True)
    if not args.model:
        print(eval_command("MODEL", task, args.device))


if __name__ == "__main__":
    main()
