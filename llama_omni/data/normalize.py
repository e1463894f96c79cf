"""Text normalization for TTS: what a voice cannot read becomes words it can.

Numbers, currency, percentages, ordinals, times and common symbols are spelled out;
markdown (fences, emphasis, bullets, headers, links) and brackets are removed, because
neither the instruction voices nor the response voice read them sensibly. The same
rules serve the rule-based rewriter and the cleanup of LLM replies, and ASR-WER scoring
(`normalize_english`), so "$5" in a text and "five dollars" in its transcript agree.
"""

from __future__ import annotations

import re
import unicodedata

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth",
                  "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_FRACTIONS = {(1, 2): "one half", (1, 3): "one third", (2, 3): "two thirds",
              (1, 4): "one quarter", (3, 4): "three quarters"}
_CURRENCIES = {"$": ("dollar", "dollars"), "€": ("euro", "euros"), "£": ("pound", "pounds"),
               "¥": ("yen", "yen")}
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "=": " equals ", "@": " at ",
            "°": " degrees ", "~": " about ", "<": " less than ", ">": " greater than ",
            "×": " times ", "÷": " divided by ", "→": " to ", "…": "...", "–": ", ", "—": ", "}


def number_to_words(n: int) -> str:
    """Cardinal English words: 1234 -> 'one thousand two hundred thirty four'."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_to_words(rest)}" if rest else "")
    for scale, name in _SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            return f"{number_to_words(high)} {name}" + (f" {number_to_words(rest)}" if rest else "")
    raise AssertionError("unreachable")


def ordinal_words(n: int) -> str:
    """21 -> 'twenty first'."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def year_words(n: int) -> str:
    """Years are read in pairs: 1984 -> 'nineteen eighty four', 2005 -> 'two thousand five'."""
    high, low = divmod(n, 100)
    if 2000 <= n < 2010 or low == 0 and n % 1000 == 0:
        return number_to_words(n)
    if low == 0:
        return f"{number_to_words(high)} hundred"
    return f"{number_to_words(high)} {'oh ' if low < 10 else ''}{number_to_words(low)}"


def _digits(s: str) -> str:
    return " ".join(_ONES[int(d)] for d in s)


def _decimal(whole: str, frac: str | None) -> str:
    digits = whole.replace(",", "")
    # past a trillion nobody reads the number: codes, serials, phone numbers go digit by digit
    words = _digits(digits) if len(digits) > 13 else number_to_words(int(digits))
    return f"{words} point {_digits(frac)}" if frac else words


_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_DATE_RE = re.compile(r"\b(1[0-2]|0?[1-9])/(3[01]|[12]\d|0?[1-9])/(\d{4})\b")


def _date(m: re.Match) -> str:
    """US order month/day/year: 12/25/2019 -> 'December twenty fifth, twenty nineteen'."""
    return f"{_MONTHS[int(m.group(1)) - 1]} {ordinal_words(int(m.group(2)))}, {m.group(3)}"


_NUM = r"\d{1,3}(?:,\d{3})+|\d+"
_CURRENCY_RE = re.compile(
    rf"([$€£¥])\s?({_NUM})(?:\.(\d+))?(\s?(?:thousand|million|billion|[kKmMbB]\b))?")
_PERCENT_RE = re.compile(rf"({_NUM})(?:\.(\d+))?\s?%")
_ORDINAL_RE = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_TIME_RE = re.compile(r"\b(\d{1,2}):(\d{2})\b")
_FRACTION_RE = re.compile(r"\b(\d+)/(\d+)\b")
_RANGE_RE = re.compile(rf"\b({_NUM})\s?[-–]\s?({_NUM})\b")
_DECADE_RE = re.compile(r"\b(1[1-9]|20)(\d)0'?s\b")
_YEAR_RE = re.compile(r"(?<!\d)(?<!\d[.,])(1[1-9]\d\d|20\d\d)(?!\d|[.,]\d|\s?%)")
_NUMBER_RE = re.compile(rf"(?<![\w.])(-)?({_NUM})(?:\.(\d+))?(?!\w)")
_SCALE_SUFFIX = {"k": "thousand", "m": "million", "b": "billion"}


def _currency(m: re.Match) -> str:
    single, plural = _CURRENCIES[m.group(1)]
    amount = int(m.group(2).replace(",", ""))
    scale = (m.group(4) or "").strip()
    if scale:
        scale = _SCALE_SUFFIX.get(scale.lower(), scale)
        return f"{_decimal(m.group(2), m.group(3))} {scale} {plural}"
    words = f"{number_to_words(amount)} {single if amount == 1 else plural}"
    cents = m.group(3)
    if cents and int(cents):
        words += f" and {number_to_words(int(cents[:2].ljust(2, '0')))} cents"
    return words


def _fraction(m: re.Match) -> str:
    a, b = int(m.group(1)), int(m.group(2))
    if (a, b) in _FRACTIONS:
        return _FRACTIONS[(a, b)]
    return f"{number_to_words(a)} over {number_to_words(b)}"


def _decade(m: re.Match) -> str:
    year = year_words(int(m.group(1) + m.group(2) + "0"))
    return year[:-1] + "ies" if year.endswith("y") else year + "s"


def spell_numbers(text: str) -> str:
    """Replace every digit sequence by words (currency, percent, ordinal, year, decimal, ...)."""
    text = re.sub(r"#(?=\s?\d)", "number ", text)
    text = re.sub(r"(?<=\d)\s?[x*×]\s?(?=\d)", " times ", text)
    text = re.sub(r"(?<=\w)\s?\^\s?(?=\w)", " to the power of ", text)
    text = _DATE_RE.sub(_date, text)
    text = _CURRENCY_RE.sub(_currency, text)
    text = _PERCENT_RE.sub(lambda m: f"{_decimal(m.group(1), m.group(2))} percent", text)
    text = _ORDINAL_RE.sub(lambda m: ordinal_words(int(m.group(1))), text)
    text = _TIME_RE.sub(lambda m: f"{number_to_words(int(m.group(1)))} "
                        f"{'o clock' if m.group(2) == '00' else _minutes(int(m.group(2)))}", text)
    text = _FRACTION_RE.sub(_fraction, text)
    text = _RANGE_RE.sub(lambda m: f"{m.group(1)} to {m.group(2)}", text)
    text = _DECADE_RE.sub(_decade, text)
    text = _YEAR_RE.sub(lambda m: year_words(int(m.group(1))), text)
    text = _NUMBER_RE.sub(
        lambda m: ("minus " if m.group(1) else "") + _decimal(m.group(2), m.group(3)), text)
    return re.sub(r"\d", lambda m: f" {_ONES[int(m.group())]} ", text)  # digits glued to letters


def _minutes(n: int) -> str:
    return f"oh {number_to_words(n)}" if n < 10 else number_to_words(n)


_FENCE_RE = re.compile(r"```.*?(```|$)", re.DOTALL)
_LINK_RE = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_URL_RE = re.compile(r"https?://\S+|www\.\S+")
_LIST_MARK_RE = re.compile(r"^\s*(?:[-*•+]|\d+[.)])\s+", re.MULTILINE)
_INLINE_ENUM_RE = re.compile(r"(^|[.!?:]\s+)\d{1,2}[.)]\s+")  # "Tips: 1. Sleep. 2. Eat."
_HEADER_RE = re.compile(r"^\s*#+\s*", re.MULTILINE)
_EMOJI_RE = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F]")


def strip_markup(text: str) -> str:
    """Remove code fences, markdown emphasis, bullets, headers, links, URLs, emoji, brackets."""
    text = _FENCE_RE.sub(" ", text)
    text = _LINK_RE.sub(r"\1", text)
    text = _URL_RE.sub(" a link ", text)
    text = _HEADER_RE.sub("", text)
    text = _LIST_MARK_RE.sub("", text)  # before emphasis: "* item" is a bullet, not emphasis
    text = _INLINE_ENUM_RE.sub(r"\1", text)
    text = re.sub(r"[*_`]+", "", text)
    text = _EMOJI_RE.sub("", text)
    text = re.sub(r"\s*[(\[{]\s*", ", ", text)
    text = re.sub(r"\s*[)\]}]", ",", text)
    text = text.replace("\\", " ")
    return text


def spell_symbols(text: str) -> str:
    text = re.sub(r"(?<=\w)/(?=\w)", " or ", text)  # and/or, he/she
    for symbol, words in _SYMBOLS.items():
        text = text.replace(symbol, words)
    return re.sub(r"[#|^<>]", " ", text)


def tidy(text: str) -> str:
    """Collapse whitespace and the punctuation debris earlier rules leave behind."""
    text = re.sub(r"[\"“”]", "", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r",(\s*[,.;:!?])+", lambda m: m.group(1)[-1] if m.group(1).strip() else ",",
                  text)
    text = re.sub(r"([.!?])\s*,", r"\1", text)
    return text.strip(" ,;:")


def normalize_for_tts(text: str) -> str:
    """Written text -> what a TTS voice should read (one line, words only)."""
    text = strip_markup(re.sub(r"(?<=\d)\s?\*\s?(?=\d)", " times ", text))
    # a line that ends without punctuation ends a sentence
    text = re.sub(r"(?<=\w)[ \t]*\n\s*", ". ", text)
    return tidy(spell_symbols(spell_numbers(text)))


def unreadable(text: str) -> str | None:
    """Why a TTS voice would stumble over `text` (digits, markup), or None if it is clean."""
    if re.search(r"\d", text):
        return "digits"
    if re.search(r"[*#`_\[\]{}()<>|\\]", text):
        return "markup"
    return None


# Scoring: the words of a text and of its transcript, compared by ASR-WER
_ANNOTATION = re.compile(r"\[[^\]]*\]|<[^>]*>")  # ASR tags like [music], <unk>: not speech
_SEPARATORS = re.compile(r"[-_/]")
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")
_FILLERS = frozenset(["uh", "um", "umm", "uhm", "hmm", "hm", "mm", "mhm", "er", "erm", "ah"])


def normalize_english(text: str) -> str:
    """Lower-case words for scoring, so only what a listener hears differs.

    Markup goes, numbers, currency and symbols become words (the same rules that prepare
    text for our TTS, so "$5" and "five dollars" agree), accents and punctuation go
    (apostrophes inside words stay), hyphens and slashes split words, and hesitation
    fillers ("uh", "um") are dropped.
    """
    text = _ANNOTATION.sub(" ", text.replace("\u2019", "'").replace("\u2018", "'"))
    text = normalize_for_tts(text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = _NOT_WORD.sub(" ", _SEPARATORS.sub(" ", text.lower()))
    words = (w.strip("'") for w in text.split())
    return " ".join(w for w in words if w and w not in _FILLERS)
