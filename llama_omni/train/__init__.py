"""Training: the default voice's corpus (voice_corpus.py) and the unit vocoder
(vocoder.py: loop and checkpoints, vocoder_data.py: batches, discriminators.py: GAN side)."""
