"""Recipes: one data file (TOML) per table or ablation of the paper."""
