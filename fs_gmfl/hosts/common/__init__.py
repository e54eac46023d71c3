"""Code both hosts share: datasets, models, evaluation, client/batch sampling, state files, thread counts."""
