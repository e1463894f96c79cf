"""Prompt ids: the published checkpoint's Llama-3 format, chat templates, training labels."""

import pytest

from llama_omni.model.prompt import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    SPEECH_TOKEN_INDEX,
    Turn,
    build_prompt_ids,
    build_training_ids,
)
from llama_omni.packaged import PackagedAssetError, llama31_tokenizer_dir, smollm2_dir

# Qwen2-Instruct's ChatML template: a default system message when none is given.
QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

OMNI = dict(
    style="llama3-omni", system_prompt=DEFAULT_SYSTEM_PROMPT, instruction=DEFAULT_INSTRUCTION
)

# The published checkpoint's inference prompt with the real Llama-3.1 tokenizer.
LLAMA31_OMNI_PROMPT = [
    128000, 128000, 128006, 9125, 128007, 271,  # BOS (tokenizer) + BOS (template), system
    2675, 527, 264, 11190, 4221, 323, 8982, 18328, 13, 1472, 527, 3025, 311, 3619, 279,
    8982, 2262, 430, 279, 1217, 5825, 11, 323, 7945, 279, 1217, 449, 264, 8205, 315, 9256,
    1701, 5933, 4221, 13, 128009,  # system prompt, <|eot_id|>
    128006, 882, 128007, 271, -200,  # user header, "\n\n", speech slot
    198, 5618, 6089, 4320, 279, 4860, 304, 279, 1217, 596, 8982, 13, 128009,  # "\n" + request
    128006, 78191, 128007, 271,  # assistant header
]  # fmt: skip


def _load_tokenizer(directory_fn):
    from transformers import AutoTokenizer

    try:
        directory = directory_fn()
    except PackagedAssetError as e:
        pytest.skip(f"packaged asset missing: {e}")
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def llama31():
    return _load_tokenizer(llama31_tokenizer_dir)


@pytest.fixture(scope="module")
def smollm2():
    return _load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def qwen2_style():
    tokenizer = _load_tokenizer(smollm2_dir)
    tokenizer.chat_template = QWEN2_TEMPLATE
    return tokenizer


def _plain(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_llama3_omni_single_turn_matches_published_prompt(llama31):
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    bos, sh, eh, eot = llama31.convert_tokens_to_ids(specials)
    assert (bos, sh, eh, eot) == (128000, 128006, 128007, 128009)
    nl2, nl = _plain(llama31, "\n\n"), _plain(llama31, "\n")
    assert (nl2, nl) == ([271], [198])

    def header(role):
        return [sh, *_plain(llama31, role), eh, *nl2]

    expected = (
        [bos, bos]
        + header("system") + _plain(llama31, DEFAULT_SYSTEM_PROMPT) + [eot]
        + header("user") + [SPEECH_TOKEN_INDEX] + nl + _plain(llama31, DEFAULT_INSTRUCTION) + [eot]
        + header("assistant")
    )  # fmt: skip
    ids = build_prompt_ids(llama31, [Turn.user()], **OMNI)
    assert ids == expected
    assert ids == LLAMA31_OMNI_PROMPT


def test_llama3_omni_multi_turn_closes_answers_with_eot(llama31):
    turns = [Turn.user(), Turn.assistant(" Paris. "), Turn.user()]
    ids = build_prompt_ids(llama31, turns, **OMNI)
    first = ids.index(SPEECH_TOKEN_INDEX)
    second = ids.index(SPEECH_TOKEN_INDEX, first + 1)
    request = [198, *_plain(llama31, DEFAULT_INSTRUCTION), 128009]
    between = request + [128006, 78191, 128007, 271, *_plain(llama31, "Paris."), 128009]
    between += [128006, 882, 128007, 271]
    assert ids[: first + 1] == LLAMA31_OMNI_PROMPT[: first + 1]
    assert ids[first + 1 : second] == between
    assert ids[second:] == LLAMA31_OMNI_PROMPT[first:]
    assert ids.count(128000) == 2


def test_user_text_replaces_instruction_and_text_only_turns(llama31):
    assistant_header = [128006, 78191, 128007, 271]
    ids = build_prompt_ids(llama31, [Turn.user("Translate it.")], **OMNI)
    tail = [198, *_plain(llama31, "Translate it."), 128009, *assistant_header]
    assert ids[ids.index(SPEECH_TOKEN_INDEX) + 1 :] == tail
    ids = build_prompt_ids(llama31, [Turn.user("Hi there", speech=False)], **OMNI)
    tail = [128006, 882, 128007, 271, *_plain(llama31, "Hi there"), 128009, *assistant_header]
    assert SPEECH_TOKEN_INDEX not in ids
    assert ids[-len(tail) :] == tail


def test_llama3_omni_no_system_prompt(llama31):
    ids = build_prompt_ids(llama31, [Turn.user()], **{**OMNI, "system_prompt": ""})
    assert ids[:7] == [128000, 128000, 128006, 882, 128007, 271, SPEECH_TOKEN_INDEX]


def test_chat_template_smollm2(smollm2):
    kw = dict(style="chat-template", system_prompt="Be brief.", instruction="Answer.")
    ids = build_prompt_ids(smollm2, [Turn.user()], **kw)
    before = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    after = "\nAnswer.<|im_end|>\n<|im_start|>assistant\n"
    assert ids == _plain(smollm2, before) + [SPEECH_TOKEN_INDEX] + _plain(smollm2, after)
    im_start, im_end = smollm2.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert (im_start, im_end) == (1, 2)
    assert ids[0] == im_start and ids[1] != im_start  # no BOS added on top of the template
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2


def test_chat_template_qwen2_default_system(qwen2_style):
    ids = build_prompt_ids(
        qwen2_style, [Turn.user()], style="chat-template", system_prompt="", instruction="Answer."
    )
    before = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    after = "\nAnswer.<|im_end|>\n<|im_start|>assistant\n"
    assert ids == _plain(qwen2_style, before) + [SPEECH_TOKEN_INDEX] + _plain(qwen2_style, after)


def test_chat_template_with_llama3_template_keeps_one_bos(llama31):
    ids = build_prompt_ids(
        llama31, [Turn.user()], style="chat-template", system_prompt="S", instruction="I"
    )
    assert ids == [
        128000, 128006, 9125, 128007, 271, *_plain(llama31, "S"), 128009,
        128006, 882, 128007, 271, SPEECH_TOKEN_INDEX, 198, *_plain(llama31, "I"), 128009,
        128006, 78191, 128007, 271,
    ]  # fmt: skip


def test_training_labels_llama3_omni(llama31):
    answer = "The capital of France is Paris."
    ids, labels = build_training_ids(llama31, [Turn.user(), Turn.assistant(answer)], **OMNI)
    n = len(LLAMA31_OMNI_PROMPT)
    assert ids[:n] == LLAMA31_OMNI_PROMPT
    assert ids[n:] == _plain(llama31, answer) + [128009]
    assert labels == [IGNORE_INDEX] * n + ids[n:]


def test_training_labels_multi_turn(llama31):
    turns = [Turn.user(), Turn.assistant("Paris."), Turn.user(), Turn.assistant("Yes!")]
    ids, labels = build_training_ids(llama31, turns, **OMNI)
    assert len(ids) == len(labels)
    assert [t for t in labels if t != IGNORE_INDEX] == [
        *_plain(llama31, "Paris."), 128009, *_plain(llama31, "Yes!"), 128009
    ]  # fmt: skip
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(ids, labels))


@pytest.mark.parametrize("fixture", ["smollm2", "qwen2_style"])
def test_training_labels_chat_template(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    turns = [Turn.user(), Turn.assistant("Paris."), Turn.user(), Turn.assistant("Yes!")]
    kw = dict(style="chat-template", system_prompt="S", instruction="I")
    ids, labels = build_training_ids(tokenizer, turns, **kw)
    prompt = build_prompt_ids(tokenizer, turns[:1], **kw)
    assert ids[: len(prompt)] == prompt
    answers = [*_plain(tokenizer, "Paris."), 2, *_plain(tokenizer, "Yes!"), 2]  # 2 = <|im_end|>
    assert [t for t in labels if t != IGNORE_INDEX] == answers
    assert labels[-1] == IGNORE_INDEX  # the newline after the last <|im_end|> is format


def test_invalid_inputs(llama31, smollm2):
    with pytest.raises(ValueError, match="role"):
        Turn("system", "x")
    with pytest.raises(ValueError, match="needs text"):
        Turn.user(speech=False)
    with pytest.raises(ValueError, match="answer text"):
        Turn("assistant")
    with pytest.raises(ValueError, match="last turn"):
        build_prompt_ids(llama31, [Turn.user(), Turn.assistant("a")], **OMNI)
    with pytest.raises(ValueError, match="end with an assistant"):
        build_training_ids(llama31, [Turn.user()], **OMNI)
    with pytest.raises(ValueError, match="Llama-3 tokenizer"):
        build_prompt_ids(smollm2, [Turn.user()], **OMNI)
    with pytest.raises(ValueError, match="unknown prompt style"):
        build_prompt_ids(llama31, [Turn.user()], **{**OMNI, "style": "vicuna"})
    with pytest.raises(ValueError, match="must not contain"):
        build_prompt_ids(llama31, [Turn.user()], **{**OMNI, "instruction": "<speech>"})
