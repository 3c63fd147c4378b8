"""Sampling: one step's logits → the next token id.

Pure steps over numpy arrays (logits ``float32 [vocab]`` or ``[batch, vocab]``, finite or -inf), each
matching the transformers logits processor of the same name where one exists, and `TokenChooser`, the
per-sequence object that owns the request's parameters, its random generator and the few counters the
penalties need. Nothing here imports torch or transformers; the tests compare against them.

`TokenChooser.choose` runs the steps in this order (transformers' order — penalties, then warpers —
with the OpenAI-style penalties beside the other penalty, and the grammar mask before any warping so
that top-k/top-p only ever keep allowed tokens):

1. repetition penalty   multiplicative (transformers); over prompt + generated tokens
2. frequency/presence   additive (OpenAI); over generated tokens only
3. allowed mask         grammar-constrained decoding: disallowed tokens become -inf
4. temperature          0 = greedy: the argmax is taken here and steps 5-7 are skipped
5. top-k                keeps every token tied with the k-th largest (as transformers does)
6. top-p                the smallest most-probable set whose mass reaches top_p
7. sample               one uniform draw from the chooser's own generator

What the boundary values mean (the card allows 0 for all but top_k):

- ``temperature == 0``: greedy; ties go to the lowest token id (as ``torch.argmax``). A positive
  temperature that rounds to 0 in float32 (say 5e-324) is greedy too: that is its limit.
- ``top_k is None``: off. The card's range is 1..50; 1 keeps the argmax and its ties.
- ``top_p is None`` or ``top_p >= 1``: off. ``top_p == 0`` keeps exactly one token, the most probable
  (the nucleus rule with transformers' ``min_tokens_to_keep=1``), so sampling becomes greedy-like.
- ``repetition_penalty`` 1 or 0: off. The penalty divides positive logits, so 0 has no value of its
  own, and its limit would make any seen token with a positive logit infinitely likely; 0 is also
  what an unset proto3 field reads as. Any other value in (0, 2] is transformers' penalty exactly;
  one below float32's smallest positive value is taken as that value (its limit, without NaN).
- ``frequency_penalty`` / ``presence_penalty`` 0: off.

Whatever the parameters or logits, the distribution sampled from is finite and sums to 1: NaN logits
count as -inf, logits that a tiny repetition penalty overflows to +inf are clamped to the largest
float32, a temperature so small that the top logit overflows takes the argmax (its limit), and a step
with no finite logit left falls back to the first allowed token.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "PENALTY_MAX",
    "SEED_MAX",
    "SEED_MIN",
    "TEMPERATURE_MAX",
    "TOP_K_MAX",
    "TOP_P_MAX",
    "ParamError",
    "SamplingParams",
    "TokenChooser",
    "apply_frequency_presence",
    "apply_repetition_penalty",
    "apply_temperature",
    "choose_batch",
    "top_k_filter",
    "top_p_filter",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]
TokenIds = Sequence[int] | npt.NDArray[np.integer[Any]]

# The model card's ranges (seed/input.schema.json).
TEMPERATURE_MAX = 5.0
TOP_K_MAX = 50
TOP_P_MAX = 2.0
PENALTY_MAX = 2.0
SEED_MIN = 1
SEED_MAX = 9_999_999_999

DEFAULT_TEMPERATURE = 0.6  # what the card's publisher uses for Mistral-7B-Instruct-v0.2

_F32_MAX = np.float32(np.finfo(np.float32).max)
_F32_SMALLEST = np.finfo(np.float32).smallest_subnormal
_NEG_INF = np.float32(-np.inf)
_BLOCK = 256  # cumulative sums over more than 4 blocks go block-wise (_search_cumsum)


class ParamError(ValueError):
    """A sampling parameter out of its range; `field` names it as the API spells it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _check_range(field: str, value: float, lo: float, hi: float) -> None:
    # `not (lo <= v <= hi)` also rejects NaN.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value <= hi):
        raise ParamError(field, f"must be a number in [{lo:g}, {hi:g}], got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling parameters, checked against the card's ranges on construction.

    See the module docstring for what 0 and the other boundary values mean.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: drawn from OS entropy when the chooser is built

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, 0.0, TEMPERATURE_MAX)
        if self.top_k is not None and (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or not 1 <= self.top_k <= TOP_K_MAX
        ):
            raise ParamError("top_k", f"must be an integer in [1, {TOP_K_MAX}], got {self.top_k!r}")
        if self.top_p is not None:
            _check_range("top_p", self.top_p, 0.0, TOP_P_MAX)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, PENALTY_MAX)
        _check_range("frequency_penalty", self.frequency_penalty, 0.0, PENALTY_MAX)
        _check_range("presence_penalty", self.presence_penalty, 0.0, PENALTY_MAX)
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise ParamError("seed", f"must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small it rounds to 0 in float32: its limit is the argmax."""
        return bool(np.float32(self.temperature) == 0)

    @property
    def effective_top_p(self) -> float | None:
        """top_p when it filters anything, else None (unset or >= 1)."""
        return self.top_p if self.top_p is not None and self.top_p < 1.0 else None

    @property
    def effective_repetition_penalty(self) -> float | None:
        """The penalty when it changes anything, else None (1 or 0, see the module docstring)."""
        p = self.repetition_penalty
        if p in (0.0, 1.0):
            return None
        # A penalty that rounds to 0 in float32 would divide by zero: its limit, the smallest float32,
        # makes seen positive logits overflow to +inf (clamped later), never NaN.
        return max(p, float(_F32_SMALLEST))


# --- pure steps ---------------------------------------------------------------------------------


def _as_logits(logits: npt.ArrayLike) -> FloatArray:
    x = np.array(logits, dtype=np.float32, copy=True)  # pure: never write into the caller's array
    if x.ndim not in (1, 2):
        raise ValueError(f"logits must be [vocab] or [batch, vocab], got shape {x.shape}")
    return x


def _penalize_seen(x: FloatArray, ids: IntArray, penalty: np.float32) -> None:
    """In place on x [vocab]: transformers' repetition penalty over the token ids `ids` [n]."""
    v = x[ids]  # [n]; duplicates read the same original value, so each token is penalized once
    x[ids] = np.where(v < 0, v * penalty, v / penalty)


def apply_repetition_penalty(logits: npt.ArrayLike, token_ids: npt.ArrayLike, penalty: float) -> FloatArray:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: for each token in `token_ids`, a logit > 0
    is divided by `penalty` and one < 0 multiplied by it (penalty > 1 discourages repeats).

    logits ``[vocab]`` with token_ids ``[n]``, or ``[batch, vocab]`` with ``[batch, n]``. Duplicate ids
    are penalized once. ``penalty`` 1 or 0 leaves the logits unchanged (0 = off, module docstring).
    A tiny penalty can overflow a logit to +inf; `TokenChooser` clamps it, this step does not.
    """
    if not (penalty >= 0.0 and math.isfinite(penalty)):
        raise ParamError("repetition_penalty", f"must be >= 0, got {penalty!r}")
    x = _as_logits(logits)
    ids = np.asarray(token_ids, dtype=np.intp)
    if penalty in (0.0, 1.0) or ids.size == 0:
        return x
    if x.ndim == 2 and (ids.ndim != 2 or ids.shape[0] != x.shape[0]):
        raise ValueError(f"token_ids must be [batch, n] for logits {x.shape}, got {ids.shape}")
    rows, row_ids = (x[None], ids.reshape(1, -1)) if x.ndim == 1 else (x, ids)  # [batch, vocab], [batch, n]
    with np.errstate(over="ignore"):  # overflow gives +-inf, as in transformers
        for row, seen in zip(rows, row_ids):
            _penalize_seen(row, seen, np.float32(penalty))
    return x


def _penalize_generated(
    x: FloatArray, ids: IntArray, counts: npt.NDArray[np.integer[Any]], frequency: float, presence: float
) -> None:
    """In place on x [vocab]: logit -= count * frequency + presence for each generated id (count > 0)."""
    x[ids] -= counts.astype(np.float32) * np.float32(frequency) + np.float32(presence)


def apply_frequency_presence(
    logits: npt.ArrayLike, counts: npt.ArrayLike, frequency_penalty: float, presence_penalty: float
) -> FloatArray:
    """OpenAI's additive penalties: ``logit -= count * frequency_penalty + (count > 0) * presence_penalty``.

    counts (integer, the shape of logits) holds how often each token was *generated*; the prompt does
    not count. 0 turns either penalty off.
    """
    x = _as_logits(logits)
    c = np.asarray(counts)
    if c.shape != x.shape:
        raise ValueError(f"counts must have the logits' shape {x.shape}, got {c.shape}")
    if frequency_penalty == 0.0 and presence_penalty == 0.0:
        return x
    flat, cflat = x.reshape(-1), c.reshape(-1)  # views: the update lands in x
    ids = np.flatnonzero(cflat)  # [n_generated_distinct]
    _penalize_generated(flat, ids, cflat[ids], frequency_penalty, presence_penalty)
    return x


def apply_temperature(logits: npt.ArrayLike, temperature: float) -> FloatArray:
    """transformers' ``TemperatureLogitsWarper``: logits / temperature (temperature > 0; 0 is greedy and
    handled by the caller, never by dividing)."""
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ParamError("temperature", f"must be > 0 to scale logits, got {temperature!r}")
    x = _as_logits(logits)
    with np.errstate(over="ignore"):  # overflow gives +-inf, as in transformers
        x /= np.float32(temperature)
    return x


def top_k_filter(logits: npt.ArrayLike, top_k: int) -> FloatArray:
    """transformers' ``TopKLogitsWarper``: every logit below the k-th largest becomes -inf, so ties with
    the k-th largest are kept (more than k tokens may survive)."""
    if top_k < 1:
        raise ParamError("top_k", f"must be >= 1, got {top_k!r}")
    x = _as_logits(logits)
    vocab = x.shape[-1]
    if top_k >= vocab:
        return x
    kth = np.partition(x, vocab - top_k, axis=-1)[..., vocab - top_k, None]  # [..., 1], O(vocab)
    x[x < kth] = _NEG_INF
    return x


def _search_cumsum(
    w: npt.NDArray[np.floating[Any]], frac: float, side: Literal["left", "right"], total: float | None = None
) -> int:
    """np.searchsorted(cumsum(w), frac * total, side) for w [n] >= 0, clamped to n - 1; total defaults
    to sum(w). Sums run in float64.

    Two levels, block sums then one block, because a float64 cumsum over a 32000 vocab costs ~7x a
    block reduction.
    """
    n = w.shape[0]
    offset = 0
    if n > 4 * _BLOCK:
        bc = np.cumsum(np.add.reduceat(w, np.arange(0, n, _BLOCK), dtype=np.float64))  # [n_blocks]
        target = frac * (float(bc[-1]) if total is None else total)
        b = min(int(np.searchsorted(bc, target, side=side)), bc.size - 1)
        target -= float(bc[b - 1]) if b > 0 else 0.0
        offset = b * _BLOCK
        c = np.cumsum(w[offset : offset + _BLOCK], dtype=np.float64)  # [<= _BLOCK]
    else:
        c = np.cumsum(w, dtype=np.float64)  # [<= 4 * _BLOCK]
        target = frac * (float(c[-1]) if total is None else total)
    return offset + min(int(np.searchsorted(c, target, side=side)), c.size - 1)


def _nucleus(
    ids: IntArray, x_c: FloatArray, top: np.float32, top_p: float, total: float | None = None
) -> IntArray:
    """Of the candidate tokens `ids` [n] (ascending; finite logits x_c [n]; the row's largest logit
    `top`), those top-p keeps, ascending. `total`: the whole row's mass exp(x - top) when tokens
    outside the candidates carry some (they rank below every candidate), else the candidates' own.

    transformers drops a token when the ascending cumulative probability up to and including it is
    <= 1 - top_p, i.e. keeps it when the mass ranked strictly above it is < top_p; the most probable
    token always stays (min_tokens_to_keep=1). So the kept set is the first `keep` tokens by value,
    where `keep` - 1 is the first rank at which the inclusive cumulative mass reaches top_p.
    transformers breaks ties at the cut by an unstable sort; here the lower token id ranks first.
    Only the values are sorted (a value sort is ~6x faster than an argsort); sums run in float64.
    """
    s = np.sort(x_c)[::-1]  # [n] logits, largest first
    ws = np.exp(s - top)  # [n] float32 unnormalized probabilities
    keep = _search_cumsum(ws, top_p, "left", total) + 1  # the first rank reaching top_p is kept
    cut = s[keep - 1]  # the smallest kept value
    above = int(np.count_nonzero(s[:keep] > cut))
    kept = x_c > cut  # [n]
    kept[np.flatnonzero(x_c == cut)[: keep - above]] = True  # ties at the cut: lowest ids first
    kept_ids: IntArray = ids[kept]
    return kept_ids


def _nucleus_full(x: FloatArray, e: FloatArray, top: np.float32, top_p: float) -> IntArray:
    """top-p over a whole row x [vocab], with e = exp(x - top) [vocab].

    A peaked distribution (the usual case) reaches top_p within its first few hundred tokens: try
    those first (partition, O(vocab)) and sort the whole row only when they do not suffice.
    """
    vocab = x.shape[0]
    total = float(np.sum(e, dtype=np.float64))
    m = 256
    if m < vocab:
        kth = np.partition(x, vocab - m)[vocab - m]
        if kth > _NEG_INF:
            ids = np.flatnonzero(x >= kth)  # [>= m] the top m and every tie with the m-th
            if np.sum(e[ids], dtype=np.float64) >= top_p * total:
                return _nucleus(ids, x[ids], top, top_p, total)
    ids = np.flatnonzero(x > _NEG_INF)
    return _nucleus(ids, x[ids], top, top_p, total)


def top_p_filter(logits: npt.ArrayLike, top_p: float) -> FloatArray:
    """transformers' ``TopPLogitsWarper`` (min_tokens_to_keep=1): keep the smallest set of most probable
    tokens whose probability reaches top_p; the rest become -inf. top_p >= 1 is off; top_p == 0 keeps
    the single most probable token. Ties at the cut go to the lowest token id."""
    if not (top_p >= 0.0):
        raise ParamError("top_p", f"must be >= 0, got {top_p!r}")
    x = _as_logits(logits)
    if top_p >= 1.0:
        return x
    out = np.full_like(x, _NEG_INF)
    rows_in, rows_out = (x[None], out[None]) if x.ndim == 1 else (x, out)  # [batch, vocab] views
    for row, dst in zip(rows_in, rows_out):
        top = row.max()
        if top == _NEG_INF:  # nothing finite: nothing to keep
            continue
        with np.errstate(over="ignore"):  # a logit far below the top: exp(-inf) = 0, as intended
            kept = _nucleus_full(row, np.exp(row - top), top, top_p)  # exp: [vocab] float32, -inf → 0
        dst[kept] = row[kept]
    return out


# --- drawing ------------------------------------------------------------------------------------


def _draw(w: npt.NDArray[np.floating[Any]], u: float) -> int:
    """Index i of w [n] (w >= 0, some w > 0) with probability w[i] / sum(w), from u uniform in [0, 1).

    Inverse CDF: the first i whose cumulative weight exceeds u * total, so a zero weight is never
    picked; should float64 rounding run past the end, the last positive weight is taken.
    """
    i = _search_cumsum(w, u, "right")
    return i if w[i] > 0 else int(np.flatnonzero(w > 0)[-1])


# --- per-sequence chooser -----------------------------------------------------------------------


class TokenChooser:
    """Chooses one sequence's tokens, step by step (see the module docstring for the pipeline).

    Owns a `numpy.random.Generator` seeded from the request's seed, so the same seed, parameters,
    prompt and logits give the same tokens whatever else runs. A sampled step draws exactly one
    uniform number (even when only one token is left), so later draws do not shift when an earlier
    step's candidate set happens to collapse; greedy steps draw nothing.
    """

    def __init__(self, params: SamplingParams, prompt_ids: TokenIds, vocab_size: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.params = params
        self.vocab_size = vocab_size
        # The seed actually used: report it so that a request without one can be replayed.
        self.seed: int = params.seed if params.seed is not None else SEED_MIN + secrets.randbelow(SEED_MAX)
        self._rng = np.random.default_rng(self.seed)
        self._rep_penalty = params.effective_repetition_penalty
        self._top_p = params.effective_top_p
        self._top_k = params.top_k if params.top_k is not None and params.top_k < vocab_size else None
        # Greedy with nothing that changes the logits: the argmax alone decides (_plain_argmax).
        self._plain_greedy = (
            params.greedy
            and self._rep_penalty is None
            and not (params.frequency_penalty or params.presence_penalty)
        )
        # Repetition: prompt + generated, as a mask and as the list of distinct ids (so the penalty
        # touches only those logits, not the whole vocabulary).
        self._seen = np.zeros(vocab_size, dtype=np.bool_)  # [vocab]
        self._seen_ids = np.empty(vocab_size, dtype=np.intp)  # [vocab]; the first _n_seen are valid
        self._n_seen = 0
        # Frequency/presence: generated tokens only.
        self._counts = np.zeros(vocab_size, dtype=np.int32)  # [vocab]
        self._gen_ids = np.empty(vocab_size, dtype=np.intp)  # [vocab]; the first _n_gen are valid
        self._n_gen = 0
        self.generated = 0
        self._all_ids = np.arange(vocab_size, dtype=np.intp)  # [vocab], the candidates when nothing filters
        prompt = np.asarray(prompt_ids, dtype=np.intp).reshape(-1)  # [prompt_len]
        if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab_size):
            raise ValueError(f"prompt ids must be in [0, {vocab_size}), got {prompt.min()}..{prompt.max()}")
        distinct = np.unique(prompt)
        self._seen[distinct] = True
        self._seen_ids[: distinct.size] = distinct
        self._n_seen = int(distinct.size)

    @classmethod
    def from_params(cls, params: SamplingParams, prompt_ids: TokenIds, vocab_size: int) -> TokenChooser:
        return cls(params, prompt_ids, vocab_size)

    def record(self, token_id: int) -> None:
        """Account for a token of this sequence's output (choose() calls it; call it directly for a
        token decided elsewhere, e.g. forced by a grammar)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id must be in [0, {self.vocab_size}), got {token_id}")
        self.generated += 1
        if self._counts[token_id] == 0:
            self._gen_ids[self._n_gen] = token_id
            self._n_gen += 1
        self._counts[token_id] += 1
        if not self._seen[token_id]:
            self._seen[token_id] = True
            self._seen_ids[self._n_seen] = token_id
            self._n_seen += 1

    def choose(self, logits: npt.NDArray[np.floating[Any]], allowed_mask: BoolArray | None = None) -> int:
        """The next token for logits [vocab] (allowed_mask: bool [vocab], True = allowed), recorded."""
        top = self._plain_argmax(logits) if allowed_mask is None else None
        if top is not None:
            self.record(top)
            return top
        ids, w = self._distribution(logits, allowed_mask)
        if self.params.greedy:
            token = int(ids[0])
        else:
            u = float(self._rng.random())  # one draw per sampled step, always
            token = int(ids[0]) if ids.shape[0] == 1 else int(ids[_draw(w, u)])
        self.record(token)
        return token

    def probs(
        self, logits: npt.NDArray[np.floating[Any]], allowed_mask: BoolArray | None = None
    ) -> npt.NDArray[np.float64]:
        """The distribution choose() would draw from now, float64 [vocab] (one-hot when greedy); records
        nothing and draws nothing."""
        ids, w = self._distribution(logits, allowed_mask)
        out = np.zeros(self.vocab_size, dtype=np.float64)
        out[ids] = w
        out /= out.sum()
        return out

    def _distribution(
        self, logits: npt.NDArray[np.floating[Any]], allowed_mask: BoolArray | None
    ) -> tuple[IntArray, npt.NDArray[np.floating[Any]]]:
        """Token ids [n] (ascending) and their unnormalized probabilities [n], all finite, sum > 0."""
        with np.errstate(over="ignore"):  # overflow is expected and handled (clamped, or exp → 0)
            return self._distribution_unchecked(logits, allowed_mask)

    def best(
        self, logits: npt.NDArray[np.floating[Any]], allowed_mask: BoolArray | None = None
    ) -> int | None:
        """The greedy choice from logits [vocab]: the argmax after the penalties among the tokens
        allowed_mask allows (lowest id among ties), or None when none of those logits is finite.
        Records nothing.

        Without a mask it serves a constrained greedy row: when the grammar allows this token, it is
        also the best allowed one, and the mask need not be computed."""
        top = self._plain_argmax(logits) if allowed_mask is None else None
        if top is not None:
            return top
        with np.errstate(over="ignore"):
            x = self._penalized(logits, writable=False)  # [vocab]
        if allowed_mask is None:
            top = int(np.argmax(x))
        else:
            ids = _allowed_ids(self._checked(allowed_mask))  # [allowed] ascending
            top = int(ids[np.argmax(x[ids])])
        return top if x[top] != _NEG_INF else None

    def _plain_argmax(self, logits: npt.NDArray[np.floating[Any]]) -> int | None:
        """The greedy token in one pass when nothing changes the logits (greedy, no penalties), else
        None (the whole pipeline decides). argmax returns the first NaN if there is one, so a finite
        maximum means every logit is finite or -inf, and then it is the pipeline's answer."""
        if not self._plain_greedy or logits.shape != (self.vocab_size,):
            return None
        # The array's own methods and math: this runs between two forward passes, where numpy's
        # function wrappers cost several microseconds each.
        top = int(logits.argmax())
        return top if math.isfinite(logits[top]) else None

    def _penalized(self, logits: npt.NDArray[np.floating[Any]], *, writable: bool = True) -> FloatArray:
        """Steps 1-2: logits [vocab] as float32, NaN as -inf and +inf as the largest float32. A copy
        when `writable` or when anything changed; otherwise possibly the caller's array itself."""
        x = np.asarray(logits, dtype=np.float32)  # [vocab]
        if x.shape != (self.vocab_size,):
            raise ValueError(f"logits must be [{self.vocab_size}], got shape {x.shape}")
        p = self.params
        penalize_seen = self._rep_penalty is not None and self._n_seen
        penalize_generated = (p.frequency_penalty or p.presence_penalty) and self._n_gen
        top_val = x.max()
        nonfinite = np.isnan(top_val) or top_val == np.inf  # max propagates NaN: one check covers both
        if writable or nonfinite or penalize_seen or penalize_generated:
            x = np.array(x, copy=True)  # never write into the caller's logits
        if nonfinite:
            np.nan_to_num(x, copy=False, nan=-np.inf, posinf=float(_F32_MAX), neginf=-np.inf)
        if penalize_seen:
            _penalize_seen(x, self._seen_ids[: self._n_seen], np.float32(self._rep_penalty))
        if penalize_generated:
            gen = self._gen_ids[: self._n_gen]
            _penalize_generated(x, gen, self._counts[gen], p.frequency_penalty, p.presence_penalty)
        return x

    def _checked(self, allowed_mask: BoolArray) -> BoolArray:
        if allowed_mask.shape != (self.vocab_size,):
            raise ValueError(f"allowed_mask must be [{self.vocab_size}], got shape {allowed_mask.shape}")
        return allowed_mask

    def _distribution_unchecked(
        self, logits: npt.NDArray[np.floating[Any]], allowed_mask: BoolArray | None
    ) -> tuple[IntArray, npt.NDArray[np.floating[Any]]]:
        p = self.params
        if p.greedy:
            greedy = self.best(logits, allowed_mask)
            top = greedy if greedy is not None else _first_allowed(allowed_mask)
            return np.array([top], dtype=np.intp), np.ones(1)
        x = self._penalized(logits)  # [vocab]
        if allowed_mask is not None:
            np.copyto(x, _NEG_INF, where=~self._checked(allowed_mask))

        top = int(np.argmax(x))  # lowest id among ties, as torch.argmax
        if x[top] == _NEG_INF:
            # No finite logit left (NaN/-inf logits, or the mask allows only -inf ones): fall back to
            # the first allowed token rather than dividing 0 by 0.
            return np.array([_first_allowed(allowed_mask)], dtype=np.intp), np.ones(1)

        overflowed_before = x[top] == np.inf  # a tiny repetition penalty did it
        x /= np.float32(p.temperature)
        if x[top] == np.inf:
            if not overflowed_before:
                # A temperature so small that the top logit overflows: the limit T -> 0, greedy.
                return np.array([top], dtype=np.intp), np.ones(1)
            np.minimum(x, _F32_MAX, out=x)  # keep the order of the rest, stay finite
        top_val = x[top]

        if self._top_k is not None:
            vocab = self.vocab_size
            kth = np.partition(x, vocab - self._top_k)[vocab - self._top_k]
            ids = np.flatnonzero(x >= kth)  # [>= k] ties with the k-th are kept, as in transformers
            if kth == _NEG_INF:  # fewer than k finite logits
                ids = ids[x[ids] > _NEG_INF]
            if self._top_p is not None:
                ids = _nucleus(ids, x[ids], top_val, self._top_p)
            return ids, np.exp(x[ids] - top_val)

        e = np.exp(x - top_val)  # [vocab] float32; -inf → 0, the top → 1
        if self._top_p is not None:
            ids = _nucleus_full(x, e, top_val, self._top_p)
            return ids, e[ids]
        return self._all_ids, e


def _first_allowed(allowed_mask: BoolArray | None) -> int:
    """The token a step with no finite logit falls back to: the first allowed one (0 without a mask)."""
    return 0 if allowed_mask is None else int(_allowed_ids(allowed_mask)[0])


def _allowed_ids(allowed_mask: BoolArray) -> IntArray:
    """The ids allowed_mask [vocab] allows, ascending; a mask that allows none is an error."""
    ids = np.flatnonzero(allowed_mask)
    if ids.size == 0:
        raise ValueError("allowed_mask allows no token")
    return ids


def choose_batch(
    choosers: Sequence[TokenChooser],
    logits: npt.NDArray[np.floating[Any]],
    allowed_masks: Sequence[BoolArray | None] | None = None,
) -> list[int]:
    """One token per row of logits [batch, vocab], row i by choosers[i] (rows never share state or
    random numbers, so a sequence's tokens do not depend on its batch mates)."""
    if logits.ndim != 2 or logits.shape[0] != len(choosers):
        raise ValueError(f"logits must be [{len(choosers)}, vocab], got shape {logits.shape}")
    masks = allowed_masks if allowed_masks is not None else [None] * len(choosers)
    if len(masks) != len(choosers):
        raise ValueError(f"need one allowed mask (or None) per row: {len(masks)} for {len(choosers)} rows")
    return [c.choose(row, m) for c, row, m in zip(choosers, logits, masks)]
