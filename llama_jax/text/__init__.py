"""Text: tokenizers (SentencePiece models, Hugging Face tokenizer.json) behind one interface, the conversion of a
SentencePiece model to tokenizer.json, and Jinja chat templates rendered as transformers renders them."""
