"""What labelers are asked, per task, in the spirit of the paper's instructions (spec §5.3).

The paper's labelers saw a query and four samples and picked the best: the most positive
continuation (sentiment), the most vividly descriptive one (descriptiveness), or the best
summary (TL;DR, CNN/Daily Mail). A comparison's `task` field picks the text; `enqueue` sets it
from the config file's name.
"""

from __future__ import annotations

INSTRUCTIONS = {
    "sentiment": (
        "Which continuation is the most positive?",
        "The query is the start of a passage from a book; each sample continues it. Pick the "
        "continuation whose tone is the most positive and happy. Judge the sentiment of the "
        "continuation, not of the query, and not its grammar, unless a sample is unreadable. "
        "If several are equally positive, pick any one of them.",
    ),
    "descriptiveness": (
        "Which continuation is the most vividly descriptive?",
        "The query is the start of a passage from a book; each sample continues it. Pick the "
        "continuation that best lets you see, hear, smell or feel what is happening: concrete, "
        "physical detail of people, places and things. A long list of adjectives is not "
        "vivid by itself; a sample that is off topic or unreadable is worse than a plain one.",
    ),
    "tldr": (
        "Which is the best summary of the post?",
        "The query is a Reddit post; each sample is a short summary of it (a TL;DR). Pick the "
        "summary a reader of the post would find best: accurate (it says nothing the post "
        "does not say), covering the most important points, and coherent. Prefer a faithful "
        "summary to a fluent but wrong one; do not prefer a sample because it copies the post "
        "unless what it copies is the main point.",
    ),
    "cnndm": (
        "Which is the best summary of the article?",
        "The query is a news article; each sample is a summary of it. Pick the summary that is "
        "accurate (no claim the article does not support), covers the article's main points, "
        "and reads clearly. Copying sentences from the article is fine only when they are the "
        "important ones.",
    ),
}
DEFAULT = (
    "Which sample is the best?",
    "Read the query and the samples, then pick the sample that best does what the task asks.",
)
KEYS_HELP = "Press 1-{n} or click a sample to pick it, s to skip, f to flag broken or offensive samples."


def instructions(task: str) -> tuple[str, str]:
    """(question, explanation) for a task name; a generic pair for unknown names."""
    return INSTRUCTIONS.get(task, DEFAULT)


def instructions_text(task: str) -> str:
    """The instructions as one plain string (for the JSON API)."""
    question, explanation = instructions(task)
    return f"{question} {explanation}"
