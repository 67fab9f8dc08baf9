"""`python -m llama_jax.tokenizer`: the tokenizer trainer's command line, which is llama_jax/cli/tokenizer.py."""
if __name__ == "__main__":
    from llama_jax.cli import run

    run("tokenizer")
