"""Metric plugins (installed as ``spobench.metrics``). See ``base.py`` for the interface."""
