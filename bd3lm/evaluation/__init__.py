"""Evaluation of trained models: pure PyTorch functions that the ``eval/`` CLIs wrap.

- :func:`likelihood`: the NELBO perplexity bound with its standard error (``full`` and ``official`` protocols);
- :func:`load_judge`, :func:`sample_quality`, :func:`score_texts`: generative perplexity under a local judge LM;
- :func:`long_documents`: quality and speed of samples past the training context;
- :func:`length_statistics`: lengths and stop reasons of EOS-stopped samples;
- :func:`speed`: generated tokens per second;
- :func:`load_checkpoint`, :func:`validation_chunks`, :func:`chunks_from_file`: what they read.
"""

from bd3lm.evaluation.corpora import chunks_from_file, load_checkpoint, validation_chunks
from bd3lm.evaluation.judge import Judge, load_judge, sliding_window_nll, windows
from bd3lm.evaluation.lengths import length_statistics
from bd3lm.evaluation.likelihood import PROTOCOLS, LikelihoodResult, Protocol, likelihood
from bd3lm.evaluation.long_documents import long_documents
from bd3lm.evaluation.sample_quality import SampleQuality, sample_quality, score_texts, to_judge_ids, unigram_entropy
from bd3lm.evaluation.speed import SpeedResult, speed

__all__ = [
    "PROTOCOLS", "Judge", "LikelihoodResult", "Protocol", "SampleQuality", "SpeedResult", "chunks_from_file",
    "length_statistics", "likelihood", "load_checkpoint", "load_judge", "long_documents", "sample_quality",
    "score_texts", "sliding_window_nll", "speed", "to_judge_ids", "unigram_entropy", "validation_chunks", "windows",
]
