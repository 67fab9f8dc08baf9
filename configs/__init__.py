"""The YAML presets (`--config tiny`), installed with the package as llama_jax.configs (see pyproject.toml)."""
