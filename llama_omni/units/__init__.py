"""Discrete speech units: encoder-layer features -> k-means ids -> merged units + durations.

features.py (Whisper layer / HuBERT features), kmeans.py (codebooks: training, our file,
joblib files), extract.py (the units model and `UnitExtractor`), quality.py (ASR-WER and
DNSMOS), selection.py (choosing the layer and K), corpus_features.py, inputs.py.
"""
