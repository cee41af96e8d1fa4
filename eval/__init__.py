"""Evaluation CLIs and benchmarks (python -m eval.NAME): ppl, genppl, long_docs, lengths, speed, train_speed, sweep."""
