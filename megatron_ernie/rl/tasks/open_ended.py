"""Name words of a category ("three fruit:" -> "fig,plum,pear"), scored by a rubric with partial credit.

The open-ended domain of the post-training pipeline (issue 12, general RL): a
prompt has many right answers and answers are more or less right, so the
reward is not an exact match but a rubric, the quantity a learned judge is
trained to predict. The rubric (`rubric_score`) is deterministic:

    items = the comma-separated, non-empty entries of the response's first line
    valid = the number of DISTINCT items that are words of the category
    score = min(valid, count) / max(count, len(items))           in [0, 1]

so each right word earns 1/count, a repeated or off-category word earns
nothing, and listing more than `count` items dilutes the score (writing the
whole vocabulary never pays). Examples for count 3, fruit: "fig,plum,pear" 1,
"fig,plum,cat" 2/3, "fig,fig,fig" 1/3, "fig,plum,pear,kiwi" 3/4, "" 0.

Words are short and lowercase, so the task's character alphabet (letters,
",", ":" and " ") stays small for tiny character models. The reference holds
the category's word list itself ("three fruit:apple,fig,..."), which keeps
the reward self-contained and puts every letter an answer needs into the
alphabet that rl/task_tokenizer.py collects from prompts and references.

options: count (1..5, default 3): how many words to name;
         categories (default all of CATEGORIES): the categories prompts draw from.
"""

from __future__ import annotations

import random

from megatron_ernie.config.errors import ConfigError
from megatron_ernie.rl.reward.verifiers import Verdict
from megatron_ernie.rl.tasks.registry import Demo, TaskExample, register_task

CATEGORIES = {
    "fruit": ("apple", "pear", "fig", "plum", "kiwi", "grape", "peach", "lemon", "mango", "melon", "cherry", "lime"),
    "animal": ("cat", "dog", "cow", "pig", "fox", "owl", "bat", "rat", "hen", "bee", "ant", "yak"),
    "color": ("red", "blue", "green", "pink", "gray", "black", "white", "gold", "tan", "teal", "cyan", "brown"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "zero", "twelve"),
    "body": ("arm", "leg", "eye", "ear", "nose", "hand", "foot", "lip", "toe", "knee", "chin", "neck"),
    "tool": ("saw", "axe", "hammer", "drill", "rake", "hoe", "pliers", "wrench", "chisel", "spade", "awl", "vise"),
}
COUNT_WORDS = ("", "one", "two", "three", "four", "five")
DEFAULTS = {"count": 3, "categories": tuple(CATEGORIES)}


def check_options(options: dict) -> dict:
    """Options merged over DEFAULTS; ConfigError for unknown keys or bad values."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise ConfigError("rl.tasks.options", sorted(unknown), f"open_ended accepts only {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    if not isinstance(merged["count"], int) or not 1 <= merged["count"] <= 5:
        raise ConfigError("rl.tasks.options.count", merged["count"], "use an integer from 1 to 5")
    cats = merged["categories"]
    if isinstance(cats, str) or not cats or set(cats) - set(CATEGORIES):
        raise ConfigError("rl.tasks.options.categories", cats, f"use a non-empty list from {list(CATEGORIES)}")
    return {**merged, "categories": tuple(sorted(set(cats)))}


def make_example(seed: int, index: int, options: dict) -> TaskExample:
    opts = check_options(options)
    category = random.Random(f"open_ended:{seed}:{index}").choice(opts["categories"])
    head = f"{COUNT_WORDS[opts['count']]} {category}:"
    return TaskExample(prompt=head, reference=head + ",".join(CATEGORIES[category]))


def parse_reference(reference: str) -> tuple[int, frozenset[str]]:
    """(count, accepted words) from "three fruit:apple,fig,..."."""
    head, _, words = reference.partition(":")
    count_word, _, _category = head.partition(" ")
    if count_word not in COUNT_WORDS[1:] or not words:
        raise ValueError(f"reference {reference!r} is not 'COUNT CATEGORY:word,word,...'")
    return COUNT_WORDS.index(count_word), frozenset(words.split(","))


def response_items(response: str) -> list[str]:
    """The comma-separated, non-empty entries of the response's first line, stripped."""
    first_line = response.strip().split("\n", 1)[0] if response.strip() else ""
    return [item.strip() for item in first_line.split(",") if item.strip()]


def rubric_score(response: str, count: int, words: frozenset[str]) -> float:
    """min(distinct right words, count) / max(count, items listed): see the module docstring."""
    items = response_items(response)
    valid = len({item for item in items if item in words})
    return min(valid, count) / max(count, len(items))


def reward(response: str, reference: str, sandbox=None) -> Verdict:
    count, words = parse_reference(reference)
    items = response_items(response)
    if not items:
        return Verdict(0.0, "no_answer", "no comma-separated words")
    score = rubric_score(response, count, words)
    right = len({item for item in items if item in words})
    return Verdict(score, "ok" if score > 0 else "wrong", f"{right} right of {len(items)} listed, {count} asked")


def demo(seed: int, index: int, options: dict, wrong: bool = False) -> Demo:
    """`count` distinct words of the category in a seeded order; wrong: words of another category (score 0)."""
    opts = check_options(options)
    category = make_example(seed, index, opts).prompt.split(" ")[1].rstrip(":")
    rng = random.Random(f"open_ended-demo:{seed}:{index}")
    source = category
    if wrong:
        source = rng.choice(sorted(set(CATEGORIES) - {category}))
    return Demo.answer(",".join(rng.sample(CATEGORIES[source], opts["count"])))


register_task("open_ended", make_example, reward, description=__doc__.splitlines()[0], demo=demo,
              deterministic=True, inline=True)
