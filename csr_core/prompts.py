"""Prompts for Instruct models: the user's text in the tokenizer's chat template, or raw text on request.

Works with transformers tokenizers and mlx-lm's `TokenizerWrapper` alike (both expose `chat_template` and
`apply_chat_template`)."""

from __future__ import annotations

import sys


def chat_prompt(tokenizer, text: str, *, chat: bool = True) -> str:
    """The text to feed the model: `text` as a user turn in the chat template with the assistant's turn
    opened; the raw text when `chat` is False, or, with a one-line notice, when the tokenizer has no template
    (a base model)."""
    if not chat:
        return text
    if not getattr(tokenizer, "chat_template", None):
        print("note: the tokenizer has no chat template (a base model?): sending the prompt as raw text", file=sys.stderr)
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, text: str, *, chat: bool = True):
    """(1, T) input ids of `chat_prompt` for a transformers tokenizer (the template brings its own special tokens)."""
    prompt = chat_prompt(tokenizer, text, chat=chat)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=prompt == text)["input_ids"]
