"""Manifest format, Hugging Face `datasets` export, and the published LLaMA-Omni format reader."""

import json

import numpy as np
import pytest
import soundfile as sf

from llama_omni.data.export import import_published, read_published, to_hf_dataset
from llama_omni.data.manifest import read_manifest, validate_item, write_jsonl


def _tone(path, seconds=0.5, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


def _item(i, units=True):
    assistant = {"role": "assistant", "text": f"answer {i}", "audio": f"audio/response/{i}.flac",
                 "voice": "hibari:heart"}
    if units:
        assistant.update(units=[3, 1, 4], units_model="units-test")
    return {"id": str(i), "source": "test",
            "turns": [{"role": "user", "text": f"question {i}", "audio": f"audio/instruction/{i}.flac",
                       "voice": "flite:slt"}, assistant],
            "original": {"instruction": f"Question {i}?", "response": None}}


@pytest.fixture()
def dataset_dir(tmp_path):
    root = tmp_path / "ds"
    for i in range(3):
        _tone(root / f"audio/instruction/{i}.flac")
        _tone(root / f"audio/response/{i}.flac", 1.0)
    write_jsonl(root / "manifest.jsonl", [_item(0), _item(1), _item(2, units=False)])
    return root


def test_hf_export_round_trip(dataset_dir, tmp_path):
    import datasets

    ds = to_hf_dataset(dataset_dir, embed_audio=True)
    assert len(ds) == 3 and ds[0]["instruction"] == "question 0" and ds[0]["units"] == [3, 1, 4]
    assert ds[2]["units"] == [] and ds[2]["units_model"] is None
    ds.save_to_disk(str(tmp_path / "hf"))
    back = datasets.load_from_disk(str(tmp_path / "hf"))
    audio = back[1]["response_audio"]
    assert audio["bytes"][:4] == b"fLaC" and audio["path"].endswith("1.flac")
    by_path = to_hf_dataset(dataset_dir)[1]["response_audio"]
    assert by_path["bytes"] is None and by_path["path"] == str(dataset_dir / "audio/response/1.flac")
    assert back[1]["original_instruction"] == "Question 1?"


@pytest.mark.parametrize("change,message", [
    (lambda item: item["turns"].pop(), "even number"),
    (lambda item: item["turns"][0].update(role="assistant"), "role 'user'"),
    (lambda item: item["turns"][0].update(audio="/abs/path.flac"), "relative path"),
    (lambda item: item["turns"][1].update(units=["x"]), "list of ints"),
    (lambda item: item.pop("original"), "'original'"),
])
def test_manifest_validation(change, message):
    item = _item(0)
    change(item)
    with pytest.raises(ValueError, match=message):
        validate_item(item)


def test_published_format_reader(tmp_path):
    _tone(tmp_path / "wavs" / "q1.wav", rate=22050)
    _tone(tmp_path / "wavs" / "q2.wav")
    published = [
        {"id": "q1", "speech": "wavs/q1.wav",
         "conversations": [{"from": "human", "value": "<speech>\nPlease directly answer the questions in the user's speech."},
                           {"from": "gpt", "value": "Paris is the capital.", "tgt_units": "5 5 7 7 7 2 5"}]},
        {"id": "q2", "speech": str(tmp_path / "wavs" / "q2.wav"), "tgt_units": [1, 2, 2, 3],
         "transcript": "Say hello.",
         "conversations": [{"from": "human", "value": "<speech>"},
                           {"from": "gpt", "value": "Hello."}]},
    ]
    source = tmp_path / "data.json"
    source.write_text(json.dumps(published))
    records = list(read_published(source))
    assert records[0]["turns"][1] == {"role": "assistant", "text": "Paris is the capital.",
                                      "units": [5, 7, 2, 5]}  # repeats merged, as Y^U
    assert records[1]["turns"][1]["units"] == [1, 2, 3]
    assert records[0]["speech"] == str(tmp_path / "wavs" / "q1.wav")
    assert records[0]["transcript"] is None and records[1]["transcript"] == "Say hello."

    assert import_published(source, tmp_path / "imported") == 2
    items = list(read_manifest(tmp_path / "imported"))
    assert items[0]["turns"][1]["audio"] is None and items[0]["turns"][1]["units"] == [5, 7, 2, 5]
    assert [item["turns"][0]["text"] for item in items] == [None, "Say hello."]
    audio, rate = sf.read(tmp_path / "imported" / items[0]["turns"][0]["audio"])
    assert rate == 16000 and abs(len(audio) - 8000) < 10

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "speech": "a.wav",
                                "conversations": [{"from": "gpt", "value": "hi"}]}]))
    with pytest.raises(ValueError, match="alternate"):
        list(read_published(bad))
    bad.write_text(json.dumps([dict(published[0], transcript="  ")]))
    with pytest.raises(ValueError, match="'transcript' must be the speech's words"):
        list(read_published(bad))
