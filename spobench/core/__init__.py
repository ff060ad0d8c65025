"""What every part of spobench shares: names and registries, config checks, files and folders, weights, checkpoints."""
