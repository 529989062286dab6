"""Measuring the model: Korean-aware ROUGE (morphemes and characters), answer-token perplexity of
reference answers, KorMedMCQA accuracy, and base-vs-fine-tune comparison reports.
docs/evaluation.md explains the metrics and their pitfalls."""
