"""Hand-made but real tokenizers for offline models: a byte-level BPE in CLIP's format and a WordPiece vocab in BERT's, and a tiny CLIP text config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

# Words that get a token of their own. Prompts may use any other word: it is split into pieces.
WORDS = """
a an the and of on in with to at by next under over behind above below near beside its his her their is are
photography photo picture image painting drawing sitting standing lying flying holding wearing
red blue green yellow orange purple pink brown black white gray grey golden silver
wooden metal glass plastic leather fluffy shiny striped spotted
big small large tiny tall short round square long old new
car bus truck bike bicycle boat train plane chair table sofa bed lamp cup mug bowl plate bottle vase book
clock phone laptop bag hat shirt dress shoe umbrella ball kite flower tree house door window road street sky
wall grass sea beach mountain river field cake apple banana orange pizza sandwich
dog cat bird horse cow sheep bear elephant zebra giraffe mouse rabbit fish duck lion tiger monkey
circle triangle cube sphere cone star heart
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-unicode table (GPT-2 style), so every byte has a base token.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_bpe(folder: Path, words: Sequence[str] = WORDS) -> tuple[Path, Path]:
    """Write vocab.json + merges.txt of a byte-level BPE in CLIP's layout (base bytes, word-end bytes, merges,
    specials). Each word of ``words`` is built by a left-to-right chain of merges, and every intermediate piece is
    in the vocab, so any merge result is a valid token."""
    base = list(_bytes_to_unicode().values())
    vocab: list[str] = base + [c + "</w>" for c in base]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        piece = symbols[0]
        for nxt in symbols[1:]:
            pair = (piece, nxt)
            piece = piece + nxt
            if piece not in known:
                merges.append(pair)
                vocab.append(piece)
                known.add(piece)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_file, merges_file


def clip_tokenizer(folder: Path, pad_token: str, model_max_length: int = 77, words: Sequence[str] = WORDS):
    """The hand-made CLIP BPE tokenizer over ``words``, saved to ``folder`` (SD pads to ``model_max_length``: 77 in
    CLIP)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_bpe(folder / "_bpe", words)
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length, pad_token=pad_token)
    tok.save_pretrained(folder)
    shutil.rmtree(folder / "_bpe")
    return tok


def bert_tokenizer(folder: Path, words: Sequence[str] = WORDS):
    """A BERT WordPiece tokenizer over ``words`` (others are spelled in letters) with BLIP's ``[DEC]`` start token;
    its vocab.txt is written to ``folder``."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_bert_vocab(words)) + "\n")
    return BertTokenizer(str(vocab_file), bos_token="[DEC]", model_max_length=512)


def _bert_vocab(words: Sequence[str] = WORDS) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    punct = list(".,!?;:'\"-()/&")
    return (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
        + list(dict.fromkeys(words))
        + list(letters)
        + ["##" + c for c in letters]
        + punct
    )


def text_encoder_config(vocab_size: int, tok, projection_dim: int = 32, hidden_size: int = 32, max_position_embeddings: int = 77):
    """A 2-layer, 4-head CLIP text tower (MLP 2x wide) with ``tok``'s special token ids."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        projection_dim=projection_dim,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
