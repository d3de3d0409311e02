"""A character-level ``tokenizers`` tokenizer: one token per character, spaces and newlines included.

Ids: the special tokens first (``<pad>`` = 0, ``<bos>``, ``<eos>``, ``<ph>`` the latent placeholder,
``<sep>``), then the task's symbols in sorted order. Unknown characters raise instead of mapping to an
unknown token, so a vocabulary that misses a symbol fails loudly.

    >>> tok = char_tokenizer("+0123456789=")
    >>> encode(tok, "12+3=")
    [7, 8, 5, 9, 16]
    >>> decode(tok, encode(tok, "12+3="))
    '12+3='
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

__all__ = ["BOS", "EOS", "PAD", "PLACEHOLDER", "SEP", "SPECIAL_TOKENS", "char_tokenizer", "decode", "encode"]

PAD, BOS, EOS, PLACEHOLDER, SEP = "<pad>", "<bos>", "<eos>", "<ph>", "<sep>"
SPECIAL_TOKENS = (PAD, BOS, EOS, PLACEHOLDER, SEP)


def char_tokenizer(symbols: str) -> Tokenizer:
    """A WordLevel tokenizer over the special tokens plus every distinct character of ``symbols``.

    Example: ``char_tokenizer(PHop().symbols).get_vocab_size() == 10``
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in sorted(set(symbols)):
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # [\s\S] rather than "." so that newlines are tokens too
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # concatenate, without the default space between tokens
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, one per character (a special token written out is one id).

    Example: ``encode(tok, "a b") == [id_a, id_space, id_b]``
    """
    return tokenizer.encode(text, add_special_tokens=False).ids


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The exact text of ``ids``; special tokens are kept as their literal text.

    Example: ``decode(tok, encode(tok, text)) == text``
    """
    return tokenizer.decode(ids, skip_special_tokens=False)
