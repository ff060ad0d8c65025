"""Trainers (installed as ``spobench.trainers``): one algorithm per file, all on the shared engine."""
