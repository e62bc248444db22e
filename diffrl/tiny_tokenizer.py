"""A real CLIP byte-level BPE tokenizer, trained offline on a small embedded corpus.

The built-in ``tiny`` model must load with no download, so instead of the 49k-token OpenAI vocabulary we learn a few
hundred BPE merges over the words our demo prompts use. The algorithm, pre-tokenisation, byte-to-unicode table and the
``</w>`` end-of-word marker are CLIP's, so ``CLIPTokenizer`` treats it exactly like the real one.
"""

from __future__ import annotations

import collections
import functools

from transformers import CLIPTokenizer

CORPUS = """
a an the of with and in on at photo painting drawing picture image of
cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard beetle
ant butterfly fish shark whale dolphin squirrel mouse frog duck chicken owl penguin panda elephant giraffe camel
red orange yellow green blue purple pink black white brown gray grey bright dark light colorful vivid
circle square triangle star heart shape shapes small large big tiny background plain sunny sky night day
beautiful portrait landscape mountain river forest city street house garden flower tree beach ocean lake sunset
riding bike playing chess washing dishes reading book wearing hat sitting standing running
""".split()

NUM_MERGES = 400
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties broken lexicographically)."""
    words_as_symbols = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
    merges = []
    for _ in range(num_merges):
        pair_counts: collections.Counter = collections.Counter()
        for symbols, count in words_as_symbols.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        merged = collections.Counter()
        for symbols, count in words_as_symbols.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words_as_symbols = merged
    return merges


@functools.lru_cache(maxsize=4)
def _vocab_and_merges(corpus: tuple[str, ...], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = list(bytes_to_unicode().values())
    merges = learn_merges(list(corpus), num_merges)
    tokens = base + [c + "</w>" for c in base] + ["".join(pair) for pair in merges] + list(SPECIAL_TOKENS)
    vocab = {}
    for token in tokens:  # a merge can recreate an existing token; keep the first id
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tiny_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    return build_bpe_tokenizer(CORPUS, NUM_MERGES, model_max_length)


def build_bpe_tokenizer(corpus: list[str], num_merges: int, model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose BPE merges are learned from `corpus` (words; repeats weigh a word more)."""
    vocab, merges = _vocab_and_merges(tuple(corpus), num_merges)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
