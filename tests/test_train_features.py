"""The content-keyed cache of frozen-encoder features and stage-2 LLM states."""

import pytest
import torch

from llama_omni.audio import load_audio
from llama_omni.model.encoder import encode_audio
from llama_omni.train import features as features_module
from llama_omni.train import stage2 as stage2_module
from llama_omni.train.features import TensorCache, cache_encoder_features, encoder_namespace
from llama_omni.train.model_setup import prepare_model
from llama_omni.train.run import build_stage
from llama_omni.train.stage2 import states_namespace
from train_helpers import one_thread, tiny_config, write_manifest, write_wav  # noqa: F401


def counting(monkeypatch, module, name):
    """Wrap module.name to count how many items it is called on."""
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_features_cached_reused_and_invalidated(tmp_path, tiny_model, monkeypatch):
    encoder, config = tiny_model.encoder, tiny_model.config.encoder
    audio = [("a", write_wav(tmp_path / "a.wav", 0.5, 1)), ("b", write_wav(tmp_path / "b.wav", 0.7, 2))]
    cache = TensorCache(tmp_path / "cache", encoder_namespace(encoder, config, torch.float32))
    calls = counting(monkeypatch, features_module, "encode_audio")

    def run():
        return cache_encoder_features(encoder, config, audio, cache, batch_size=4,
                                      dtype=torch.float32, progress=False)

    keys = run()
    assert len(calls) == 1 and len(calls[0][1]) == 2
    expected, lengths = encode_audio(encoder, [load_audio(tmp_path / "a.wav")], config)
    torch.testing.assert_close(cache.load(keys[audio[0][1]])["features"], expected[0, : int(lengths[0])])

    assert run() == keys and len(calls) == 1  # reused: nothing encoded
    write_wav(tmp_path / "b.wav", 0.7, 3)  # same name, new content
    new_keys = run()
    assert len(calls) == 2 and len(calls[1][1]) == 1  # only the changed file
    assert new_keys[audio[0][1]] == keys[audio[0][1]] and new_keys[audio[1][1]] != keys[audio[1][1]]
    assert not list(cache.root.rglob(".tmp-*"))

    with torch.no_grad():
        encoder.conv1.bias.add_(1e-3)  # another encoder: another namespace
    assert encoder_namespace(encoder, config, torch.float32) != cache.root.name
    assert encoder_namespace(encoder, config, torch.float16) != encoder_namespace(encoder, config, torch.float32)


def test_unreadable_audio_names_item(tmp_path, tiny_model):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    cache = TensorCache(tmp_path / "cache", "x")
    with pytest.raises(ValueError, match=r"item 'it-7'.*bad\.wav"):
        cache_encoder_features(tiny_model.encoder, tiny_model.config.encoder, [("it-7", bad)], cache,
                               batch_size=1, dtype=torch.float32, progress=False)


def test_stage2_states_cached_and_keyed_by_llm(tmp_path, tiny_llm_dir, monkeypatch):
    data = write_manifest(tmp_path / "data", items=3)
    cfg = tiny_config(tmp_path, tiny_llm_dir, data, "stage2")
    torch.manual_seed(0)
    model = prepare_model(cfg)
    calls = counting(monkeypatch, stage2_module, "answer_states")
    first = build_stage(cfg, model)
    assert sum(len(c[2].ids) for c in calls) == 3
    second = build_stage(cfg, model)
    assert sum(len(c[2].ids) for c in calls) == 3  # all three answers reused
    assert [e.state_key for e in first.train.examples] == [e.state_key for e in second.train.examples]
    namespace = first.train.states.root.name
    with torch.no_grad():
        model.llm.model.model.norm.weight.mul_(1.5)
    assert states_namespace(model, "features-x", torch.float32) != namespace


def test_shards_cover_everything_in_any_order(tmp_path, tiny_model):
    """Processes split the full list, so a late process still does its own share."""
    audio = [(f"i{n}", write_wav(tmp_path / f"{n}.wav", 0.3, n)) for n in range(6)]
    cache = TensorCache(tmp_path / "cache", "ns")
    for rank in (1, 0):  # process 1 finishes before process 0 looks at the cache
        keys = cache_encoder_features(tiny_model.encoder, tiny_model.config.encoder, audio, cache,
                                      batch_size=4, dtype=torch.float32, shard=(rank, 2),
                                      progress=False)
    assert all(cache.has(key) for key in keys.values())
