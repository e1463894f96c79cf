"""Which instructions are worth speaking: length, language, code, math, duplicates.

The paper keeps instructions a person would plausibly say aloud; code and math questions
are dropped (they cannot be read naturally, and the evaluation set excludes them too).
Each rule returns a short reason so the summary report can count rejections by reason.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from llama_omni.configbase import ConfigBase, require
from llama_omni.data.sources import Instruction

# Frequent English function words: a cheap, dependency-free language check for short texts.
_ENGLISH_WORDS = frozenset(
    "the a an and or but of to in on at for with from by about as is are was were be been "
    "do does did have has had i you he she it we they me my your our their this that these "
    "those what which who whom how why when where can could would should will shall may "
    "might must not no yes if then than so there here some any all more most very just".split()
)
_CODE_RE = re.compile(
    r"```|`[^`]+`|\b(?:def|class|import|return|public|static|void|const|var|let|function|"
    r"lambda|printf|println|console\.log|SELECT|#include)\b\s*[\w(<{]|[{};]\s*$|</?\w+[^>]*>|"
    r"\w+\([^)]*\)\s*[{;:]|\b\w+_\w+\b|==|!=|=>|->|\+\+|\w+\.\w+\(|(?:^|\s)/\w+/\w+",
    re.MULTILINE,
)
_CODE_WORDS_RE = re.compile(
    r"\b(?:code|coding|program(?:ming)?|python|javascript|typescript|java|c\+\+|c#|golang|rust|"
    r"js|coffeescript|nginx|sql|html|css|regex|api|json|yaml|bash|shell script|function|"
    r"compile[rd]?|debug|script|"
    r"github|repository|dataframe|pandas|numpy|react|django|flask|docker|kubernetes|linux "
    r"command|algorithm|variable|array)\b",
    re.IGNORECASE,
)
_MATH_RE = re.compile(
    r"\\(?:frac|sqrt|sum|int|cdot)|\$[^$]+\$|\d\s*[-+*/^×÷]\s*\d|\b[a-z]\s*[\^=]\s*\d|"
    r"\b(?:solve|equation|integral|derivative|calculate|compute|theorem|prove that|probability"
    r" of|factorial|logarithm|matrix|polynomial)\b",
    re.IGNORECASE,
)


@dataclass
class FilterConfig(ConfigBase):
    """Rules an instruction must pass; a rule is off when its threshold is None/False."""

    min_words: int = 3
    max_words: int | None = 60
    max_chars: int | None = 400
    english: bool = True
    drop_code: bool = True
    drop_math: bool = True
    dedupe: bool = True
    exclude_eval_heldout: bool = True  # the evaluation's ShareGPT hold-out never trains

    def __post_init__(self) -> None:
        require(self.min_words >= 0, f"filters.min_words must be >= 0, got {self.min_words}")
        require(self.max_words is None or self.max_words >= self.min_words,
                f"filters.max_words ({self.max_words}) must be >= min_words ({self.min_words})")


def is_english(text: str) -> bool:
    """Mostly Latin letters and, for texts of five words or more, some English function words."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) / len(letters) < 0.95:
        return False
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) < 5 or sum(w in _ENGLISH_WORDS for w in words) / len(words) >= 0.12


def looks_like_code(text: str) -> bool:
    return bool(_CODE_RE.search(text) or _CODE_WORDS_RE.search(text))


def looks_like_math(text: str) -> bool:
    return bool(_MATH_RE.search(text))


def dedupe_key(text: str) -> str:
    """Case, punctuation and spacing do not make a different instruction."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def reject_reason(text: str, config: FilterConfig) -> str | None:
    """The first rule `text` fails, or None when it passes them all (duplicates aside)."""
    words = len(text.split())
    if words < config.min_words:
        return "too_short"
    if config.max_words is not None and words > config.max_words:
        return "too_long"
    if config.max_chars is not None and len(text) > config.max_chars:
        return "too_long"
    if config.english and not is_english(text):
        return "not_english"
    if config.drop_code and looks_like_code(text):
        return "code"
    if config.drop_math and looks_like_math(text):
        return "math"
    return None


def apply_filters(items: Iterable[Instruction], config: FilterConfig,
                  rejected: Counter | None = None) -> Iterator[Instruction]:
    """Yield the items that pass; count the others by reason in `rejected`."""
    from llama_omni.eval.sets import is_heldout  # here: eval.sets imports this module

    seen: set[str] = set()
    for item in items:
        reason = reject_reason(item.text, config)
        if reason is None and config.exclude_eval_heldout and is_heldout(item):
            reason = "eval_heldout"
        if reason is None and config.dedupe:
            key = dedupe_key(item.text)
            reason = "duplicate" if key in seen else None
            seen.add(key)
        if reason is None:
            yield item
        elif rejected is not None:
            rejected[reason] += 1
