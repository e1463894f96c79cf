"""Prompt ids for the LLM stage M: chat turns with `<speech>` slots, as token ids.

A user turn carries one speech segment, written as the placeholder `<speech>` in the
rendered text. The text is split at each placeholder, the pieces are tokenized
separately and joined with `SPEECH_TOKEN_INDEX` (-200), an id outside every vocabulary
that `SpeechLLM.embed_prompt` later replaces with the adaptor output.

Two styles:
- "llama3-omni": the Llama-3 chat format exactly as the published LLaMA-Omni checkpoint
  was trained and evaluated. Its quirks are kept on purpose: the text starts with the
  literal `<|begin_of_text|>` and every piece is tokenized with the tokenizer's special
  tokens, so the ids start with the BOS id twice; the BOS the tokenizer adds to every
  later piece is dropped.
- "chat-template": the backbone tokenizer's own chat template (ChatML for SmolLM2 and
  Qwen2, ...). The template already writes every special token, so the pieces are
  tokenized without adding any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SPEECH_TOKEN_INDEX = -200
SPEECH_PLACEHOLDER = "<speech>"
IGNORE_INDEX = -100  # label value that the cross-entropy loss skips
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech "
    "content that the user provides, and assist the user with a variety of tasks using "
    "natural language."
)
DEFAULT_INSTRUCTION = "Please directly answer the questions in the user's speech."
PROMPT_STYLES = ("llama3-omni", "chat-template")

_LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass
class Turn:
    """One conversation turn.

    role "user": a speech segment (`speech=True`, the default for users) followed by
    `text`; text None means the configured instruction. A user turn without speech
    must have text. role "assistant": the answer `text` (speech is always False).
    """

    role: str
    text: str | None = None
    speech: bool | None = None  # None: True for "user", False for "assistant"

    def __post_init__(self) -> None:
        if self.role not in ("user", "assistant"):
            raise ValueError(f"Turn.role must be 'user' or 'assistant', got {self.role!r}")
        if self.speech is None:
            self.speech = self.role == "user"
        if self.role == "assistant" and (self.speech or self.text is None):
            raise ValueError("an assistant Turn holds answer text and no speech")
        if self.role == "user" and not self.speech and not self.text:
            raise ValueError("a user Turn without speech needs text")
        if self.text is not None and SPEECH_PLACEHOLDER in self.text:
            raise ValueError(f"Turn.text must not contain {SPEECH_PLACEHOLDER!r}; use speech=True")

    @classmethod
    def user(cls, text: str | None = None, *, speech: bool = True) -> Turn:
        return cls("user", text, speech)

    @classmethod
    def assistant(cls, text: str) -> Turn:
        return cls("assistant", text, False)


@dataclass
class _Rendered:
    """Prompt text with placeholders, plus the character ranges [start, end) to train on."""

    text: str
    answer_spans: list[tuple[int, int]]


def build_prompt_ids(
    tokenizer: Any,
    turns: list[Turn],
    *,
    style: str,
    system_prompt: str,
    instruction: str,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of the conversation, with SPEECH_TOKEN_INDEX at each user speech slot.

    With add_generation_prompt (the inference case) the last turn must be a user turn and
    the ids end with the assistant header, ready for the answer.
    """
    if add_generation_prompt and turns and turns[-1].role != "user":
        raise ValueError("add_generation_prompt needs the last turn to be a user turn")
    rendered = _render(tokenizer, turns, style, system_prompt, instruction, add_generation_prompt)
    ids, _ = _tokenize(tokenizer, rendered, style)
    return ids


def build_training_ids(
    tokenizer: Any,
    turns: list[Turn],
    *,
    style: str,
    system_prompt: str,
    instruction: str,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of a whole conversation ending with an assistant answer.

    labels equal ids on every assistant answer token, including the end-of-turn token
    that closes the answer (so the model learns to stop), and IGNORE_INDEX elsewhere
    (system, user turns, speech slots, headers). ids are not shifted: the loss shifts.
    """
    if not turns or turns[-1].role != "assistant":
        raise ValueError("training turns must end with an assistant answer")
    rendered = _render(tokenizer, turns, style, system_prompt, instruction, False)
    return _tokenize(tokenizer, rendered, style)


def _render(
    tokenizer: Any,
    turns: list[Turn],
    style: str,
    system_prompt: str,
    instruction: str,
    add_generation_prompt: bool,
) -> _Rendered:
    if not turns:
        raise ValueError("a prompt needs at least one turn")
    if SPEECH_PLACEHOLDER in system_prompt + instruction:
        raise ValueError(f"system_prompt and instruction must not contain {SPEECH_PLACEHOLDER!r}")
    if style == "llama3-omni":
        _check_llama3_vocab(tokenizer)
        return _render_llama3(turns, system_prompt, instruction, add_generation_prompt)
    if style == "chat-template":
        return _render_chat_template(
            tokenizer, turns, system_prompt, instruction, add_generation_prompt
        )
    raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}")


def _user_content(turn: Turn, instruction: str) -> str:
    text = instruction if turn.text is None else turn.text
    lines = ([SPEECH_PLACEHOLDER] if turn.speech else []) + ([text] if text else [])
    return "\n".join(lines)


def _render_llama3(
    turns: list[Turn], system_prompt: str, instruction: str, add_generation_prompt: bool
) -> _Rendered:
    """The published checkpoint's Llama-3 format; message texts are stripped as there."""

    def header(role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    segments = [("<|begin_of_text|>", False)]  # (text, is_answer)
    if system_prompt:
        segments.append((header("system") + system_prompt + "<|eot_id|>", False))
    for turn in turns:
        segments.append((header(turn.role), False))
        if turn.role == "user":
            segments.append((_user_content(turn, instruction).strip() + "<|eot_id|>", False))
        else:
            segments.append((turn.text.strip() + "<|eot_id|>", True))
    if add_generation_prompt:
        segments.append((header("assistant"), False))
    text, spans, start = "", [], 0
    for piece, is_answer in segments:
        if is_answer:
            spans.append((start, start + len(piece)))
        text += piece
        start += len(piece)
    return _Rendered(text, spans)


def _render_chat_template(
    tokenizer: Any,
    turns: list[Turn],
    system_prompt: str,
    instruction: str,
    add_generation_prompt: bool,
) -> _Rendered:
    """Render with the tokenizer's template; answer spans come from incremental renders.

    The span of assistant message k is what rendering messages[:k+1] adds after the
    generation prompt of messages[:k], without trailing whitespace (ChatML's newline
    after <|im_end|> belongs to the format, not to the answer).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "prompt style 'chat-template' needs a tokenizer with a chat template; this one has "
            "none (set tokenizer.chat_template or use prompt style 'llama3-omni')"
        )
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for turn in turns:
        content = _user_content(turn, instruction) if turn.role == "user" else turn.text
        messages.append({"role": turn.role, "content": content})

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(messages, add_generation_prompt)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = render(messages[:k], True), render(messages[: k + 1], False)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                "the chat template does not render conversations incrementally (a prefix of "
                "the conversation is not a prefix of the text), so answer tokens cannot be "
                "located; use prompt style 'llama3-omni' or a ChatML-like template"
            )
        spans.append((len(before), len(upto.rstrip())))
    return _Rendered(text, spans)


def _tokenize(tokenizer: Any, rendered: _Rendered, style: str) -> tuple[list[int], list[int]]:
    """Tokenize the text piece by piece around placeholders; label tokens inside answers."""
    with_special = style == "llama3-omni"
    want_offsets = bool(rendered.answer_spans)
    ids: list[int] = []
    labels: list[int] = []
    start = 0  # character offset of the current piece in rendered.text
    for i, piece in enumerate(rendered.text.split(SPEECH_PLACEHOLDER)):
        if i:
            ids.append(SPEECH_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
        enc = tokenizer(piece, add_special_tokens=with_special, return_offsets_mapping=want_offsets)
        piece_ids = list(enc["input_ids"])
        offsets = list(enc["offset_mapping"]) if want_offsets else [(0, 0)] * len(piece_ids)
        if i and with_special and piece_ids[:1] == [tokenizer.bos_token_id]:
            piece_ids, offsets = piece_ids[1:], offsets[1:]
        for token, (lo, hi) in zip(piece_ids, offsets):
            ids.append(token)
            in_answer = _in_spans(start + lo, start + hi, rendered.answer_spans)
            labels.append(token if in_answer else IGNORE_INDEX)
        start += len(piece) + len(SPEECH_PLACEHOLDER)
    return ids, labels


def _in_spans(lo: int, hi: int, spans: list[tuple[int, int]]) -> bool:
    """Whether token characters [lo, hi) overlap a span; added special tokens are empty."""
    return hi > lo and any(a < hi and lo < b for a, b in spans)


def _check_llama3_vocab(tokenizer: Any) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in _LLAMA3_SPECIAL:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == unk:
            raise ValueError(
                f"prompt style 'llama3-omni' needs a Llama-3 tokenizer, but {token!r} is not "
                "in this tokenizer's vocabulary; use prompt style 'chat-template'"
            )
