"""Episode builders: the task generators' test problems, cut into the turns an agent would hear them in.

* `depo_episodes` (retrieval, `spec/tasks.md` §2): the edges of a hidden cycle arrive a few per turn, interleaved with
  *distractor* turns carrying the edges of a decoy cycle over other names; after a sleep has evicted everything, k-hop
  questions ``HOP_k name ANS`` start on hidden-cycle nodes and the agent answers with a name. Hidden and decoy cycles
  together are one permutation of distinct names, so the k-hop computation is the one the model was trained on.
* `gsm_episodes` (math, §3.3): the statements of a symbolic problem arrive one to a few per turn (the noise statements,
  whose values are undetermined, are the distractors); the question comes last (``Q V017 ; A``) or, as the paper
  prefers, first (``Q V017 ;`` opens the episode and the last turn is the answer cue ``A``).
* `stateful_gsm_episodes` (§4.1): reasoning-gym's English problems, every sentence but the last as context, a sleep,
  then the last sentence as the question — rendered into a symbolic checkpoint's vocabulary (digits and operators
  survive, words become ``<unk>``): a plumbing check scored by reasoning-gym's own scorer, not a capability test.
* `english_episodes` (readable): the English tasks' test rows (`family`: reasoning-gym family stories; `gsm_english`:
  its stateful GSM problems) as one message per sentence, small-talk distractors among them, a sleep, then the
  question in plain English; the answer is a word (or a number), scored by reasoning-gym's own ``score_answer``.

Every builder is a pure function of (task config, n, seed); ids are the task tokenizer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agentsleep.episodes.types import Episode, Question, Turn
from agentsleep.errors import InvalidInput
from agentsleep.tasks import depo, family, gsm, gsm_english
from agentsleep.tasks.base import EOS, UNK, seed_sequence
from agentsleep.tasks.depo import DepoConfig
from agentsleep.tasks.family import FamilyConfig
from agentsleep.tasks.gsm import GSMSymbolicConfig
from agentsleep.tasks.gsm_english import GSMEnglishConfig

_EPISODE_STREAM = 7  # seed sub-stream of the episode layout (turn sizes, interleaving), disjoint from the generators'

Name = tuple[int, ...]


def _rng(task_id: int, seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence(task_id, "test", seed, _EPISODE_STREAM, index, stream)))


def _chunks(items: Sequence[Any], rng: np.random.Generator, sizes: tuple[int, int]) -> list[list[Any]]:
    """Consecutive groups of ``sizes[0]..sizes[1]`` items (the last may be smaller)."""
    lo, hi = sizes
    if not 1 <= lo <= hi:
        raise InvalidInput(f"turn sizes must satisfy 1 <= lo <= hi, got {sizes}")
    out, i = [], 0
    while i < len(items):
        k = int(rng.integers(lo, hi + 1))
        out.append(list(items[i : i + k]))
        i += k
    return out


def _interleave(a: list[Any], b: list[Any], rng: np.random.Generator) -> list[tuple[int, Any]]:
    """A uniformly random merge of two lists that keeps each list's order; items tagged 0 (from a) or 1 (from b)."""
    tags = rng.permutation(np.array([0] * len(a) + [1] * len(b), dtype=np.int64)).tolist()
    ia, ib = iter(a), iter(b)
    return [(t, next(ia) if t == 0 else next(ib)) for t in tags]


# --------------------------------------------------------------------------------------------------- Depo


def _split_names(ids: Sequence[int], mini_vocab: int) -> list[Name]:
    """Concatenated names back into names: a name ends at its final token (ids above ``mini_vocab``)."""
    names, cur = [], []
    for t in ids:
        cur.append(int(t))
        if t > mini_vocab:
            names.append(tuple(cur))
            cur = []
    if cur:
        raise InvalidInput("token stream ends inside a name")
    return names


def parse_depo_row(tokens: np.ndarray, cfg: DepoConfig) -> tuple[list[tuple[Name, Name]], list[tuple[int, Name, Name]]]:
    """A generated Depo row back into its edges ``(u, succ(u))`` (emission order) and queries ``(k, start, answer)``."""
    block = [int(t) for t in tokens[: cfg.block] if t != cfg.pad_id]
    names = _split_names(block, cfg.mini_vocab)
    edges = [(names[i], names[i + 1]) for i in range(0, len(names), 2)]
    queries, qa = [], [int(t) for t in tokens[cfg.block :] if t != cfg.pad_id]
    i = 0
    while i < len(qa):
        k = qa[i] - cfg.hop_id0 + 1
        j = qa.index(cfg.ans_id, i)
        start = tuple(qa[i + 1 : j])
        end = j + 1
        while qa[end] <= cfg.mini_vocab:
            end += 1
        queries.append((k, start, tuple(qa[j + 1 : end + 1])))
        i = end + 1
    return edges, queries


def _fresh_names(rng: np.random.Generator, lengths: Sequence[int], taken: set[Name], mini_vocab: int) -> list[Name]:
    """Distinct names of the given lengths that avoid ``taken`` (drawn like the generator's: last token shifted)."""
    out: list[Name] = []
    for n in lengths:
        while True:
            body = rng.integers(1, mini_vocab + 1, size=n).tolist()
            body[-1] += mini_vocab
            name = tuple(int(t) for t in body)
            if name not in taken:
                taken.add(name)
                out.append(name)
                break
    return out


def default_split(n_max: int) -> tuple[int, int]:
    """(hidden, decoy) node counts that together fill the trained node bound: 3/8 of it are decoys (>= 3, or none).

    E.g. 25 -> (16, 9), 8 -> (5, 3). A decoy cycle needs 3 nodes, and so does the hidden one.
    """
    decoys = (3 * n_max) // 8
    if decoys < 3 or n_max - decoys < 3:
        return n_max, 0
    return n_max - decoys, decoys


def depo_episodes(
    config: DepoConfig,
    n: int,
    seed: int = 0,
    *,
    hidden: int | None = None,
    decoys: int | None = None,
    edges_per_turn: tuple[int, int] = (1, 3),
) -> list[Episode]:
    """``n`` retrieval episodes.

    Args:
        config: the checkpoint's Depo config (ids, K, test k values; ``n_max`` is overridden per cycle).
        hidden: nodes of the hidden cycle the questions are about (its edges and queries are the generator's test
            rows at ``n_max = hidden``).
        decoys: nodes of the decoy cycle whose edges arrive as distractor turns (0: none). Its names are re-drawn so
            they are disjoint from the hidden cycle's. ``hidden + decoys <= config.n_max`` keeps the episode within
            the node count the model was trained on.
        edges_per_turn: how many edges one turn carries.

    ``hidden`` and ``decoys`` default to `default_split` of the checkpoint's ``n_max``.
    """
    if hidden is None or decoys is None:
        hidden = default_split(config.n_max)[0] if hidden is None else hidden
        decoys = (config.n_max - hidden if hidden <= config.n_max - 3 else 0) if decoys is None else decoys
    if hidden < 3:
        raise InvalidInput(f"a hidden cycle needs at least 3 nodes, got {hidden}")
    h_cfg = config.with_overrides(n_max=hidden)
    h_batch = depo.generate("test", n, seed, h_cfg)
    d_batch = depo.generate("test", n, seed + 1_000_003, config.with_overrides(n_max=decoys)) if decoys else None
    mv = config.mini_vocab
    finals = tuple(range(mv + 1, 2 * mv + 1))
    variant = "decoys" if decoys else "no_decoys"
    episodes = []
    for i in range(n):
        edges, queries = parse_depo_row(h_batch.tokens[i], h_cfg)
        rng = _rng(config.task_id, seed, i, hidden * 1000 + decoys)
        hidden_turns = _chunks(edges, rng, edges_per_turn)
        decoy_turns: list[list[tuple[Name, Name]]] = []
        if d_batch is not None:
            d_edges, _ = parse_depo_row(d_batch.tokens[i], config.with_overrides(n_max=decoys))
            old = [u for u, _ in d_edges]
            taken = {u for u, _ in edges}
            rename = dict(zip(old, _fresh_names(rng, [len(u) for u in old], taken, mv)))
            decoy_turns = _chunks([(rename[u], rename[v]) for u, v in d_edges], rng, edges_per_turn)
        turns = [
            Turn(ids=tuple(t for u, v in group for t in u + v), role="fact" if tag == 0 else "distractor")
            for tag, group in _interleave(hidden_turns, decoy_turns, rng)
        ]
        questions = []
        for q, (k, start, answer) in enumerate(queries):
            questions.append(
                Question(expected=answer, group=f"k={k}", answer=config_decode(config, answer), meta={"k": k})
            )
            turns.append(
                Turn(
                    ids=(config.hop_id0 + k - 1, *start, config.ans_id),
                    reply=config.max_len,
                    question=q,
                    sleep_before=q == 0,  # everything the questions need has been evicted: it lives only in S
                    role="question",
                )
            )
        episodes.append(
            Episode(
                id=f"depo-{variant}-h{hidden}d{decoys}-s{seed}-{i}",
                kind="depo",
                variant=variant,
                turns=tuple(turns),
                questions=tuple(questions),
                stop_ids=finals,
                stop_text=".",  # every name-final token is spelt with a trailing "." (DepoConfig.build_vocab)
                reserve=config.max_len,
                meta={"hidden": hidden, "decoys": decoys, "seed": seed, "index": i},
            )
        )
    return episodes


def config_decode(config: DepoConfig | GSMSymbolicConfig, ids: Sequence[int]) -> str:
    vocab = config.vocab()
    return " ".join(vocab[int(t)] for t in ids)


# --------------------------------------------------------------------------------------------------- GSM


def _answer_budget(config: GSMSymbolicConfig) -> int:
    """Reply tokens a value answer can need: sign + digits of the largest |value| + <eos>."""
    deepest = config.ops[1] + config.core_extra
    return 1 + len(str(config.root_max + deepest)) + 1


def gsm_episodes(
    config: GSMSymbolicConfig, n: int, seed: int = 0, *, statements_per_turn: tuple[int, int] = (1, 3)
) -> list[Episode]:
    """``n`` math episodes from the symbolic generator's test split, laid out as ``config.question_position`` says.

    Question last: statement turns, then ``Q V ; A`` (answer). Question first: ``Q V ;``, statement turns, then ``A``.
    """
    if config.form != "value":
        raise InvalidInput("math episodes use the value form (one integer answer)")
    batch = gsm.generate("test", n, seed, config)
    index = config.token_index()
    q_id, a_id, semi, eos = index["Q"], index["A"], index[";"], index[EOS]
    budget = _answer_budget(config)
    episodes = []
    for i, meta in enumerate(batch.meta):
        body = batch.tokens[i, meta["left_pad"] : meta["left_pad"] + meta["n_tokens"]].tolist()
        q_at, a_at = body.index(q_id), body.index(a_id)
        question = body[q_at : body.index(semi, q_at) + 1]
        context = body[len(question) : a_at] if config.question_position == "first" else body[:q_at]
        statements, cur = [], []
        for t in context:
            cur.append(t)
            if t == semi:
                statements.append(cur)
                cur = []
        rng = _rng(config.task_id, seed, i, 0)
        turns = [Turn(ids=tuple(question), role="question")] if config.question_position == "first" else []
        turns += [
            Turn(ids=tuple(t for s in group for t in s)) for group in _chunks(statements, rng, statements_per_turn)
        ]
        ask = (a_id,) if config.question_position == "first" else (*question, a_id)
        turns.append(Turn(ids=ask, reply=budget, question=0, role="question"))
        expected = tuple(body[a_at + 1 :])
        if expected[-1] != eos:
            raise InvalidInput("a GSM row must end with its answer and <eos>")
        episodes.append(
            Episode(
                id=f"gsm-{config.question_position}-s{seed}-{i}",
                kind="gsm",
                variant=f"question_{config.question_position}",
                turns=tuple(turns),
                questions=(
                    Question(
                        expected=expected,
                        group=f"op={meta['op']}",
                        answer=meta["answer"],
                        meta={"op": meta["op"], "answer_value": meta["answer_value"], "n_noise": meta["n_noise"]},
                    ),
                ),
                stop_ids=(eos,),
                stop_text=EOS,
                reserve=budget,
                meta={"seed": seed, "index": i, "n_statements": len(statements)},
            )
        )
    return episodes


def parse_gsm_reply(config: GSMSymbolicConfig, reply: Sequence[int]) -> str:
    """The integer a reply spells (``- 1 2 <eos>`` -> ``-12``); the digits and sign before the stop, joined."""
    vocab = config.vocab()
    out = []
    for t in reply:
        s = vocab[int(t)] if 0 <= int(t) < len(vocab) else ""
        if s == EOS:
            break
        if s.isdigit() or s == "-":
            out.append(s)
    return "".join(out)


# --------------------------------------------------------------------------------------------------- reasoning-gym


def render_english(config: GSMSymbolicConfig, text: str) -> list[int]:
    """English into a symbolic checkpoint's ids: split like the zoo tokenizer (words, punctuation, single digits);
    digits and ``= + - ,`` keep their ids, everything else becomes ``<unk>``."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    index = config.token_index()
    unk = index[UNK]
    return [index.get(piece, unk) for piece, _ in split.pre_tokenize_str(text)]


def stateful_gsm_episodes(
    config: GSMSymbolicConfig, size: int = 20, seed: int = 1, *, max_turn_tokens: int | None = None
) -> list[Episode]:
    """reasoning-gym ``gsm_symbolic`` entries as stateful episodes (`agentsleep.tasks.stateful_gsm`): context sentence
    turns, a sleep, then the question sentence plus the answer cue ``A``. Needs reasoning-gym (the test extra).

    ``max_turn_tokens`` (default L/2) splits a long sentence over several turns.
    """
    from agentsleep.tasks.stateful_gsm import StatefulGSM

    gym = StatefulGSM(size=size, seed=seed)
    index = config.token_index()
    a_id, eos = index["A"], index[EOS]
    cap = max_turn_tokens or config.window // 2
    budget = 8  # GSM8K answers run to several digits
    episodes = []
    for ep in gym.episodes:
        turns = []
        for sentence in ep.context:
            ids = render_english(config, sentence)
            turns += [Turn(ids=tuple(ids[j : j + cap])) for j in range(0, len(ids), cap)]
        q_ids = render_english(config, ep.question)
        pieces = [q_ids[j : j + cap] for j in range(0, len(q_ids), cap)] or [[]]
        for j, piece in enumerate(pieces[:-1]):
            turns.append(Turn(ids=tuple(piece), role="question", sleep_before=j == 0))
        turns.append(
            Turn(
                ids=(*pieces[-1], a_id),
                reply=budget,
                question=0,
                role="question",
                sleep_before=len(pieces) == 1,  # the context is evicted before the question (spec §4.1 step 3)
            )
        )
        expected = (*(index.get(c, index[UNK]) for c in ep.answer), eos)
        episodes.append(
            Episode(
                id=f"stateful_gsm-s{seed}-{ep.index}",
                kind="stateful_gsm",
                variant="reasoning_gym",
                turns=tuple(turns),
                questions=(Question(expected=expected, group="all", answer=ep.answer, meta={"rg_index": ep.index}),),
                stop_ids=(eos,),
                stop_text=EOS,
                reserve=budget,
                meta={**gym.record(), "rg_index": ep.index, "rg_size": size},
            )
        )
    return episodes


# --------------------------------------------------------------------------------------------------- English


def english_episodes(config: FamilyConfig | GSMEnglishConfig, n: int, seed: int = 0) -> list[Episode]:
    """``n`` readable episodes from an English task's test split (the rows its checkpoint is scored on).

    Each sentence of the story (or problem) is one user message, with the row's small-talk distractors among them;
    the question is the last message, asked after a sleep (``sleep_before``: the facts live only in S), and the agent
    replies with at most ``config.reserve`` tokens, stopping at ``<eos>``. Because the task lays its rows out exactly
    as the runtime sleeps between messages, the windows the agent consolidates are the windows the model trained on.
    """
    if isinstance(config, FamilyConfig):
        kind, batch = "family", family.generate("test", n, seed, config)
        encode, group = config.encode, "hops"
    elif isinstance(config, GSMEnglishConfig):
        kind, batch = "gsm_english", gsm_english.generate("test", n, seed, config)
        encode, group = config.encode_lenient, "facts"
    else:
        raise InvalidInput(f"english_episodes needs a family or gsm_english config, got {type(config).__name__}")
    eos = config.eos_id
    episodes = []
    for i, meta in enumerate(batch.meta):
        turns = [Turn(ids=tuple(encode(m["text"])), role=m["role"]) for m in meta["messages"]]
        turns.append(
            Turn(
                ids=tuple(encode(meta["question"])),
                reply=config.reserve,
                question=0,
                sleep_before=True,  # the agent was idle between hearing the story and being asked
                role="question",
            )
        )
        expected = (*encode(meta["answer"]), eos)
        episodes.append(
            Episode(
                id=f"{kind}-s{seed}-{i}",
                kind=kind,  # type: ignore[arg-type]
                variant="chatter" if any(m["role"] == "distractor" for m in meta["messages"]) else "plain",
                turns=tuple(turns),
                questions=(
                    Question(
                        expected=expected,
                        group=f"{group}={meta['k']}",
                        answer=meta["answer"],
                        meta={"k": meta["k"], "question": meta["question"], "rg_seed": meta["rg_seed"]},
                    ),
                ),
                stop_ids=(eos,),
                stop_text=EOS,
                reserve=config.reserve,
                meta={"seed": seed, "index": i, "windows": meta["windows"]},
            )
        )
    return episodes


def english_score(episode: Episode, answer: str) -> float:
    """reasoning-gym's own score of a decoded answer to an English episode's question (1.0 = correct)."""
    expected = episode.questions[0].answer
    if episode.kind == "family":
        return family.score_answer(answer, expected)
    if episode.kind == "gsm_english":
        return gsm_english.score_answer(answer or None, expected)
    raise InvalidInput(f"{episode.id} is not an English episode")


__all__ = [
    "default_split",
    "depo_episodes",
    "english_episodes",
    "english_score",
    "gsm_episodes",
    "parse_depo_row",
    "parse_gsm_reply",
    "render_english",
    "stateful_gsm_episodes",
]
