"""What every trainer's sampling shares: the DDIM step and its log-prob (``ddim``), CFG trajectories
and per-row noise (``rollout``), and the step scorers that judge samples (``scoring``). An algorithm's
own sampling (SPO's candidate pools) lives with the algorithm in ``spobench.trainers``."""
