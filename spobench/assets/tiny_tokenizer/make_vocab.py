"""Generate the tiny backbone's CLIP tokenizer files (run once; the outputs are committed).

    python spobench/assets/tiny_tokenizer/make_vocab.py

Why a hand-made vocabulary: the real CLIP vocabulary has 49k tokens, which would make the tiny text
encoder's embedding table ~50x larger than the rest of it. The tiny world only ever says the words in
``spobench.toyworld.words.WORDS``, so the vocabulary here is

* the 256 byte-level base characters and their ``</w>`` (end-of-word) forms, in CLIP's order, so
  that ANY text tokenises (byte fallback) exactly as CLIP's BPE would split unknown words;
* one whole-word token ``word</w>`` for every tiny-world word, built by a chain of merges that
  always joins a character onto the word's ``</w>``-terminated suffix (``d</w>`` -> ``ed</w>`` ->
  ``red</w>``). Every merge's right side ends in ``</w>``, so within a word only the last pair can
  ever merge and each word collapses to a single token whatever the merge ranks are. The
  intermediate suffixes are added to the vocabulary because the ``tokenizers`` BPE model requires
  every merge result to be a token;
* ``<|startoftext|>`` and ``<|endoftext|>`` last, as in CLIP.

The output is deterministic (ordered by WORDS), so re-running it reproduces the committed files.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_MAX_LENGTH = 32


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode map (the ``ByteLevel`` pre-tokenizer's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build(words) -> tuple[dict[str, int], list[str]]:
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    seen_merges: set[str] = set()
    known = set(vocab_list)
    byte_map = bytes_to_unicode()
    for word in words:
        chars = [byte_map[b] for b in word.lower().encode("utf-8")]
        suffix = chars[-1] + "</w>"
        for ch in reversed(chars[:-1]):
            merge = f"{ch} {suffix}"
            suffix = ch + suffix
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            if suffix not in known:
                known.add(suffix)
                vocab_list.append(suffix)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def main(out: Path = HERE) -> None:
    import sys

    sys.path.insert(0, str(HERE.parents[2]))  # run from a checkout without installing
    from spobench.toyworld.words import WORDS

    vocab, merges = build(WORDS)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
              "do_lower_case": True, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main()
