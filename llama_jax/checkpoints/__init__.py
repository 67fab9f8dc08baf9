"""Checkpoints: the one loader (load.py) over every kind a user may have: training run directories (Orbax, run_dir.py),
Hugging Face Llama directories (hf.py) and llama2.c files (llama2c.py)."""
