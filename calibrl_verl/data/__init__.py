"""Data preparation helpers: convert public multimodal math datasets into verl RL parquet (SPEC section 6)."""
