"""Judge training data: (prompt, response, verdict) examples labelled by a task's rubric.

A learned judge is a language model asked one question: given a task prompt
and a response, followed by SEPARATOR, is the next character "y" or "n"?
It is trained by ordinary SFT on text pairs

    SFT prompt   = task prompt + response + SEPARATOR       ("three fruit:fig,plum,pear\\n")
    SFT response = VERDICT_YES or VERDICT_NO                 ("y")

and in RL its score is p_judge("y" | SFT prompt) from one forward pass
(judge/scorer.py), the same text laid out the same way (`judge_text`).

Labels come from the task's rubric (rl/tasks/open_ended.py): "y" iff the
rubric score is >= `threshold` (default 1: only a fully right answer). So
the judge learns to predict the rubric from text, and the rubric stays
available in RL to check it (judge/rubric_reward next to judge/score: a
policy exploiting the judge shows the rubric falling while the score rises,
the over-optimisation Gao et al. 2022 measured for learned reward models).

Examples are balanced: even indices are right answers, odd indices cycle
through the negative kinds — off-category words, a repeated word, too few or
too many words, a near miss (one word of another category), a misspelt
word, pseudo-words only, and a partial answer (some right words, the rest
pseudo-words) — so the judge must read the words, not the length. The last
two are what a small character-level policy writes when it samples at T=1
("hawin,peal,awyewl" for "three tool:"); a judge that never saw them was at
chance on the policy's own samples after 15 steps of general RL. With them,
the benchmark's tiny judge still does not read words (mean p(y) of pseudo-
word answers 0.29 after 400 steps, 0.25 after 1200, right answers 0.67-0.70;
`judge_agreement`'s by-kind line shows it). Everything is a deterministic
function of (seed, task, index); the held-out examples use the indices
after the training ones (`split_indices`).

Per-item verdicts (`[sft] source = "judge-items"`, `--verdicts items`): the
judge is asked one question per listed item, "is ITEM a word of CATEGORY?",
laid out as judge_text("fruit:", "plum") = "fruit:plum\n" -> "y", and RL
aggregates its answers with the rubric's own counting rule
(ITEM_QUESTIONS): score = min(sum of p(y) over the distinct items, count)
/ max(count, items listed). The learned part is then the one the rubric
cannot give densely (which strings are words of the category); counting and
repeats are rules, so they cannot be exploited. A rubric-based checklist
reward of this kind is what "rubrics as rewards" judges do for open-ended
answers. Item kinds: a right word (even turns), a word of another category,
a pseudo-word, a misspelt word (odd turns, cycled: ITEM_NEGATIVE_KINDS).

Use: `ernie judge-data --tasks open_ended --out judge.jsonl --examples 2000
--valid 200` writes SFT JSONL (held-out lines last, as sft.valid_examples
expects), or `[sft] source = "judge"` (or "judge-items") draws the same
examples for the [[rl.tasks]] of an SFT config (the pipeline's judge stage
does that).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_ernie.config.errors import ConfigError

SEPARATOR = "\n"
VERDICT_YES, VERDICT_NO = "y", "n"
FIRST_INDEX = 2_000_000  # judge examples: RL prompts start at 0, SFT demos at 1M, evaluation at 10M
NEGATIVE_KINDS = ("off_category", "repeat", "too_few", "too_many", "near_miss", "misspelt", "pseudo", "partial")
ITEM_NEGATIVE_KINDS = ("other_category", "pseudo", "misspelt")
VERDICT_FORMATS = {"judge": "response", "judge-items": "items"}  # [sft] source -> what the judge is asked


def judge_text(prompt: str, response: str) -> str:
    """What the judge reads: the task prompt, the response, then the separator before its verdict."""
    return prompt + response + SEPARATOR


@dataclass(frozen=True)
class JudgeExample:
    task: str
    index: int
    prompt: str
    response: str
    rubric: float      # the task's rubric score of the response
    verdict: str       # VERDICT_YES iff rubric >= threshold
    kind: str          # "right" or one of NEGATIVE_KINDS

    def sft_record(self) -> dict:
        """One line of SFT JSONL (extra keys are ignored by `ernie sft`, kept for agreement checks)."""
        return {"prompt": judge_text(self.prompt, self.response), "response": self.verdict,
                "rubric": self.rubric, "kind": self.kind, "task": self.task, "index": self.index}


# ------------------------------------------------------------ open_ended responses
def _open_ended_response(kind: str, category: str, count: int, rng: random.Random) -> str:
    """A response of `kind` to "COUNT CATEGORY:" (see NEGATIVE_KINDS); falls back where count makes it moot."""
    from megatron_ernie.rl.tasks.open_ended import CATEGORIES

    words = list(CATEGORIES[category])
    other = CATEGORIES[rng.choice(sorted(set(CATEGORIES) - {category}))]
    right = rng.sample(words, min(count + 1, len(words)))
    if kind == "right":
        items = right[:count]
    elif kind == "off_category" or (count == 1 and kind in ("repeat", "too_few", "near_miss", "misspelt")):
        items = rng.sample(other, count)
    elif kind == "repeat":
        items = [right[0]] * count
    elif kind == "too_few":
        items = right[: count - 1]
    elif kind == "too_many":
        items = right[: count + 1]
    elif kind == "near_miss":
        items = right[: count - 1] + [rng.choice(other)]
    elif kind == "misspelt":  # one right word with a letter dropped (never another word of the category)
        items = right[: count - 1] + [_misspelt(right[count - 1], set(words), rng)]
    else:  # pseudo (no right word) or partial (1..count-1 right words), the rest pseudo-words
        keep = rng.randint(1, count - 1) if kind == "partial" and count > 1 else 0
        items = right[:keep] + [_pseudo_word(words, rng) for _ in range(count - keep)]
    rng.shuffle(items)
    return ",".join(items)


def _pseudo_word(words: list, rng: random.Random) -> str:
    """A word-like string that is no word of any category: the head of one category word spliced to the
    tail of another (how a character model's T=1 samples look), e.g. "pl" + "ach" -> "plach"."""
    from megatron_ernie.rl.tasks.open_ended import CATEGORIES

    every_word = {w for ws in CATEGORIES.values() for w in ws}
    while True:
        head, tail = rng.choice(words), rng.choice(words)
        candidate = head[: rng.randint(1, len(head))] + tail[rng.randint(1, len(tail) - 1):]
        if len(candidate) >= 2 and candidate not in every_word:
            return candidate


def _misspelt(word: str, valid: set, rng: random.Random) -> str:
    for cut in rng.sample(range(len(word)), len(word)):
        candidate = word[:cut] + word[cut + 1:]
        if candidate and candidate not in valid:
            return candidate
    return word + word[-1]


def open_ended_example(task_cfg, index: int, kind: str, seed: int, threshold: float) -> JudgeExample:
    """Judge example `index` of the open_ended task `task_cfg` (its options and seed pick the prompt)."""
    from megatron_ernie.rl.tasks.open_ended import check_options, make_example, parse_reference, rubric_score

    options = check_options(dict(task_cfg.options))
    example = make_example(task_cfg.seed, index, options)
    count, words = parse_reference(example.reference)
    category = example.prompt.split(" ", 1)[1].rstrip(":")
    response = _open_ended_response(kind, category, count, random.Random(f"judge-data:{seed}:{index}"))
    score = rubric_score(response, count, words)
    verdict = VERDICT_YES if score >= threshold else VERDICT_NO
    return JudgeExample(task_cfg.name, index, example.prompt, response, score, verdict, kind)


def _category(prompt: str) -> str:
    """"three fruit:" -> "fruit"."""
    return prompt.split(" ", 1)[-1].rstrip(":")


def open_ended_item_example(task_cfg, index: int, kind: str, seed: int, threshold: float) -> JudgeExample:
    """Per-item example `index`: "CATEGORY:" + one item, "y" iff the item is a word of the category."""
    from megatron_ernie.rl.tasks.open_ended import CATEGORIES, check_options, make_example

    options = check_options(dict(task_cfg.options))
    category = _category(make_example(task_cfg.seed, index, options).prompt)
    words, rng = list(CATEGORIES[category]), random.Random(f"judge-item:{seed}:{index}")
    if kind == "right":
        item = rng.choice(words)
    elif kind == "other_category":
        item = rng.choice(CATEGORIES[rng.choice(sorted(set(CATEGORIES) - {category}))])
    elif kind == "misspelt":
        item = _misspelt(rng.choice(words), set(words), rng)
    else:
        item = _pseudo_word(words, rng)
    rubric = float(item in CATEGORIES[category])
    verdict = VERDICT_YES if rubric >= threshold else VERDICT_NO
    return JudgeExample(task_cfg.name, index, f"{category}:", item, rubric, verdict, kind)


def open_ended_item_questions(prompt: str, response: str):
    """(questions, aggregate) for a per-item judge: one (prompt, item) question per distinct listed item,
    and the rubric's rule turning their p(y) into a score (rubric_score with soft membership)."""
    from megatron_ernie.rl.tasks.open_ended import COUNT_WORDS, response_items

    count_word = prompt.split(" ", 1)[0]
    count = COUNT_WORDS.index(count_word) if count_word in COUNT_WORDS[1:] else 1
    items = response_items(response)
    distinct = list(dict.fromkeys(items))
    questions = [(f"{_category(prompt)}:", item) for item in distinct]

    def aggregate(probabilities) -> float:
        return min(sum(probabilities), count) / max(count, len(items)) if items else 0.0

    return questions, aggregate


# Tasks whose reward is a rubric a judge can learn: name -> example maker, per verdict format; and the
# per-item decomposition of a response for the "items" format.
RUBRIC_TASKS = {"open_ended": open_ended_example}
ITEM_TASKS = {"open_ended": open_ended_item_example}
ITEM_QUESTIONS = {"open_ended": open_ended_item_questions}


def check_judge_tasks(tasks, field: str, verdicts: str = "response") -> None:
    known = ITEM_TASKS if verdicts == "items" else RUBRIC_TASKS
    for i, task_cfg in enumerate(tasks):
        if task_cfg.name not in known:
            raise ConfigError(f"{field}[{i}].name", task_cfg.name,
                              f"{verdicts} judge data is made for rubric tasks only: {sorted(known)}")


def example_kind(turn: int, negatives: tuple = NEGATIVE_KINDS) -> str:
    """Even turns are right answers, odd turns cycle through the negative kinds (balanced classes)."""
    return "right" if turn % 2 == 0 else negatives[(turn // 2) % len(negatives)]


def judge_examples(tasks, start: int, count: int, seed: int = 0, threshold: float = 1.0,
                   verdicts: str = "response") -> list[JudgeExample]:
    """`count` examples with indices start..: index i is task i % len(tasks), kind of turn i // len(tasks);
    verdicts "response" (one verdict on the whole answer) or "items" (one per item)."""
    check_judge_tasks(tasks, "rl.tasks", verdicts)
    makers, negatives = (ITEM_TASKS, ITEM_NEGATIVE_KINDS) if verdicts == "items" else (RUBRIC_TASKS, NEGATIVE_KINDS)
    out = []
    for index in range(start, start + count):
        task_cfg = tasks[index % len(tasks)]
        kind = example_kind(index // len(tasks), negatives)
        out.append(makers[task_cfg.name](task_cfg, index, kind, seed, threshold))
    return out


def split_indices(first_index: int, train: int) -> tuple[int, int]:
    """(first training index, first held-out index): held-out examples follow the training ones."""
    return first_index, first_index + train


# ---------------------------------------------------------------- SFT source
def judge_sft_examples(sft, tasks):
    """`[sft] source = "judge"` or "judge-items": (train, valid) SFTExamples of judge verdicts for the rubric
    tasks of rl.tasks."""
    from megatron_ernie.data.sft import SFTExample

    first, held_out = split_indices(sft.first_index, sft.num_examples)
    verdicts = VERDICT_FORMATS[sft.source]

    def convert(examples):
        return [SFTExample(judge_text(e.prompt, e.response), (("model", e.verdict),), f"judge:{e.task}")
                for e in examples]

    return (convert(judge_examples(tasks, first, sft.num_examples, sft.seed, verdicts=verdicts)),
            convert(judge_examples(tasks, held_out, sft.valid_examples, sft.seed, verdicts=verdicts)))


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie judge-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["open_ended"], help="rubric tasks (default options)")
    p.add_argument("--config", help="take the [[rl.tasks]] (names, options, seeds) of this TOML instead")
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--examples", type=int, default=2000, help="training examples")
    p.add_argument("--valid", type=int, default=200, help="held-out examples, written last (sft.valid_examples)")
    p.add_argument("--first-index", type=int, default=FIRST_INDEX)
    p.add_argument("--seed", type=int, default=0, help="picks the responses (the task seed picks the prompts)")
    p.add_argument("--threshold", type=float, default=1.0, help="rubric score from which the verdict is y")
    p.add_argument("--verdicts", choices=sorted(set(VERDICT_FORMATS.values())), default="response",
                   help="one verdict per whole answer, or one per listed item (train with source judge-items)")
    return p


def _tasks_from(args):
    from megatron_ernie import config as C
    from megatron_ernie.config.loader import build, read_toml
    from megatron_ernie.config.rl import TaskConfig

    if args.config:
        return build(C.ErnieConfig, read_toml(args.config)).rl.tasks
    return tuple(TaskConfig(name=name) for name in args.tasks)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.examples < 1 or args.valid < 1:
        raise ConfigError("--examples/--valid", (args.examples, args.valid), "use integers >= 1")
    if not 0 < args.threshold <= 1:
        raise ConfigError("--threshold", args.threshold, "use a rubric score in (0, 1]")
    tasks = _tasks_from(args)
    check_judge_tasks(tasks, "--tasks" if not args.config else "rl.tasks", args.verdicts)
    first, held_out = split_indices(args.first_index, args.examples)
    examples = judge_examples(tasks, first, args.examples, args.seed, args.threshold, args.verdicts)
    examples += judge_examples(tasks, held_out, args.valid, args.seed, args.threshold, args.verdicts)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.sft_record()) + "\n")
    yes = sum(e.verdict == VERDICT_YES for e in examples)
    print(f"wrote {len(examples)} judge examples to {args.out} ({yes} y, {len(examples) - yes} n); the last "
          f"{args.valid} are held out: train with [sft] source = \"{args.out}\", valid_examples = {args.valid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
