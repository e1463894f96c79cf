"""Units: merging, k-means assignment and files, deterministic extraction, the CLI functions."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

from llama_omni.cli.resynth import resynth
from llama_omni.cli.units import units_extract, units_train
from llama_omni.model.vocoder import UnitVocoder, VocoderConfig, save_vocoder
from llama_omni.packaged import PackagedAssetError
from llama_omni.units.extract import UnitExtractor, UnitsConfig, merge_repeats
from llama_omni.units.kmeans import KMeansCodebook, train_kmeans


def test_merge_repeats_gives_units_and_run_lengths():
    units, durations = merge_repeats([5, 5, 1, 2, 2, 2, 5])
    assert units.tolist() == [5, 1, 2, 5]
    assert durations.tolist() == [2, 1, 3, 1]
    empty_units, empty_durations = merge_repeats([])
    assert empty_units.size == 0 and empty_durations.size == 0


def test_assign_is_the_nearest_centroid():
    gen = torch.Generator().manual_seed(0)
    centroids, x = torch.randn(7, 5, generator=gen), torch.randn(100, 5, generator=gen)
    expected = torch.cdist(x, centroids).argmin(dim=1)
    assert torch.equal(KMeansCodebook(centroids).assign(x, batch=13), expected)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        KMeansCodebook(centroids).assign(torch.zeros(3, 4))


def test_train_kmeans_is_deterministic_for_a_seed():
    x = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    a, b = train_kmeans(x, 6, seed=3), train_kmeans(x, 6, seed=3)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.assign(torch.from_numpy(x)), b.assign(torch.from_numpy(x)))


def test_codebook_files(tmp_path):
    codebook = KMeansCodebook(torch.randn(4, 3))
    codebook.save(tmp_path / "km.safetensors")
    assert torch.equal(KMeansCodebook.load(tmp_path / "km.safetensors").centroids,
                       codebook.centroids)
    from sklearn.cluster import KMeans

    fitted = KMeans(n_clusters=4, n_init=1, random_state=0).fit(np.random.rand(40, 3))
    with open(tmp_path / "km.bin", "wb") as f:  # fairseq / textless files are joblib pickles
        pickle.dump(fitted, f)
    with pytest.raises(ValueError, match="trust_pickle"):
        KMeansCodebook.load(tmp_path / "km.bin")
    loaded = KMeansCodebook.load(tmp_path / "km.bin", trust_pickle=True)
    np.testing.assert_allclose(loaded.centroids.numpy(), fitted.cluster_centers_, rtol=1e-6)


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Noise through changing resonances: enough structure for distinct frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
    wave = np.sin(2 * np.pi * np.cumsum(f0) / 16000) * (1 + np.sin(2 * np.pi * 3 * t))
    return (0.3 * wave + 0.05 * rng.normal(size=t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("audio")
    for i in range(3):
        sf.write(directory / f"utt{i}.wav", _speechlike(1.5 + i * 0.5, i), 16000)
    return directory


@pytest.fixture(scope="module")
def units_model(audio_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("units")
    try:
        units_train([audio_dir], out=out, layer=2, k=8, max_frames=1000, seed=1, threads=1)
    except PackagedAssetError as err:
        pytest.skip(f"packaged Whisper base not installed: {err}")
    return out


def test_unit_extraction_is_deterministic_for_a_seed(audio_dir, units_model, tmp_path):
    again = tmp_path / "again"
    units_train([audio_dir], out=again, layer=2, k=8, max_frames=1000, seed=1, threads=1)
    first, second = UnitExtractor.load(units_model), UnitExtractor.load(again)
    assert torch.equal(first.codebook.centroids, second.codebook.centroids)
    audio = _speechlike(2.0, 7)
    ids = first.frame_ids(audio)
    assert np.array_equal(ids, first.frame_ids(audio))
    assert len(ids) == (len(audio) // 160 + 1) // 2  # one id per 20 ms
    units, durations = first(audio)
    assert durations.sum() == len(ids) and (units[1:] != units[:-1]).all()


def test_units_extract_writes_jsonl_and_npz(audio_dir, units_model, tmp_path):
    units_extract([audio_dir], out=tmp_path / "u.jsonl", units_model=units_model, threads=1)
    rows = [json.loads(line) for line in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["utt0", "utt1", "utt2"]
    units_extract([audio_dir], out=tmp_path / "u.npz", units_model=units_model, threads=1)
    with np.load(tmp_path / "u.npz") as frames:
        for row in rows:
            units, durations = merge_repeats(frames[row["id"]])
            assert row["units"] == units.tolist() and row["durations"] == durations.tolist()
            assert all(0 <= u < 8 for u in row["units"])


def test_resynth_round_trip(audio_dir, units_model, tmp_path):
    torch.manual_seed(0)
    config = VocoderConfig.preset("tiny-istft-test").replace(num_units=8)
    save_vocoder(UnitVocoder(config).eval(), tmp_path / "voc")
    out = tmp_path / "out.wav"
    resynth(audio_dir / "utt0.wav", out=out, units_model=units_model, vocoder=tmp_path / "voc",
            true_durations=True, threads=1)
    wave, rate = sf.read(out)
    assert rate == 16000 and len(wave) == ((24000 // 160 + 1) // 2) * 320
    mismatched = tmp_path / "voc9"
    save_vocoder(UnitVocoder(config.replace(num_units=9)), mismatched)
    with pytest.raises(Exception, match="9 units"):
        resynth(audio_dir / "utt0.wav", out=out, units_model=units_model, vocoder=mismatched)


def test_units_config_validates():
    with pytest.raises(ValueError, match="num_units"):
        UnitsConfig(num_units=1)


def test_hubert_features_through_transformers(tmp_path):
    from transformers import HubertConfig, HubertModel

    from llama_omni.units.features import feature_extractor

    config = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, conv_dim=(16,) * 7,
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    HubertModel(config).save_pretrained(tmp_path)
    features = feature_extractor(f"hubert:{tmp_path}", layer=2)
    frames = features.frames(_speechlike(1.0, 0))
    assert frames.shape == (49, 32)  # HuBERT's conv stack: 320 samples per frame
    with pytest.raises(ValueError, match="layer must lie"):
        feature_extractor(f"hubert:{tmp_path}", layer=3)
