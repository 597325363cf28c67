"""Data preparation helpers: convert public multimodal math datasets into verl RL parquet (docs/algorithm.md §6)."""
