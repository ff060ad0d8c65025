"""Paper tables as recipes: the recipe schema and the runner."""
