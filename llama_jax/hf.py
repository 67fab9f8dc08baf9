"""`python -m llama_jax.hf`: the Hugging Face converter's command line, which is llama_jax/cli/hf.py."""
if __name__ == "__main__":
    from llama_jax.cli import run

    run("hf")
