"""Serve a distill LM student in-process with llama.cpp: continuous batching, logprobs, JSON-schema decoding.

Why llama.cpp (llama-cpp-python's low-level API). Measured on this 2-core machine for SmolLM2-135M:
llama-cpp-python 0.3.36 with a Q8_0 GGUF generates 99-121 tok/s with 2 threads, transformers fp32 17.7
tok/s. Q8_0 matched the fp32 greedy text on 4/5 prompts, ONNX Runtime GenAI int8 on 2/5 and int4 on 0/5.
llama.cpp turns a JSON schema into a GBNF grammar itself (``schema_grammar``), and a GGUF file runs
wherever users already run GGUF (llama.cpp, ollama, LM Studio). The cost: the wheel is built from source
(about 8 min on a fresh machine, against 15 s for the ORT GenAI wheel).

How it works.

* Slots. One ``llama_context`` holds ``max_batch`` sequences (``n_seq_max``) with a *non-unified* KV cache
  (``kv_unified=False``): llama.cpp then gives every sequence its own ``n_ctx / n_seq_max`` cells, so with
  ``n_ctx = n_ctx_per_seq * max_batch`` every slot really holds ``n_ctx_per_seq`` tokens, whatever the
  other slots hold (a unified cache would let one long prompt starve the others). Separate caches also
  mean attention never scans other sequences' cells. A slot is a sequence id; a request waits in a FIFO
  queue for a free one (``GenResult.queue_seconds``).
* Continuous batching. One thread owns the context. Each loop step admits queued requests into free slots
  and prefills their prompts (in chunks of ``n_batch``; a prompt's last token yields the logits of the
  first new token), then runs ONE ``llama_decode`` with the last sampled token of every active sequence.
  Sequences join and leave between steps, so a short answer never waits for a long one. On a CPU this
  buys fairness and latency more than throughput: for SmolLM2 Q4_1 a decode step with 4 tokens took ~3.3x
  the time of a step with 1 (raw ``llama_decode`` timing here).
* Sampling and logprobs. The raw logits of each output row are read as a numpy view. Their argmax is the
  unconstrained greedy token and ``logit[chosen] - logsumexp(logits)`` the chosen token's log-probability
  under the *unconstrained* distribution, which is what a router wants for confidence even when a grammar
  picked the token. Greedy requests take the argmax directly when the grammar allows it (checked by
  applying the grammar sampler to that one candidate, as llama.cpp's common sampler does) and only
  otherwise run the full sampler chain (grammar, then greedy or temperature + seeded dist), so a schema
  costs a full-vocabulary grammar pass only where it changes the answer.
* Interventions. ``interventions`` counts the sampled tokens (including the end-of-generation token that
  ends the answer) at which the grammar forbade the unconstrained argmax. For greedy requests 0 means the
  unconstrained greedy answer is identical token for token, i.e. the student needs no grammar for it.
* Embeddings. A ``want_embedding`` request is prefilled on its own with ``llama_set_embeddings(ctx,
  True)`` and every prompt token flagged as an output; the engine mean-pools ``llama_get_embeddings_ith``
  (for a generative model with pooling NONE that is the final, normed hidden state of each token) and
  switches embeddings off again before the next decode step. Those prefills run in chunks of
  ``EMBED_CHUNK`` tokens because each output row also reserves a full-vocabulary logits row.
* Text. Each token's bytes go through an incremental UTF-8 decoder, so a streamed piece never holds half
  a character: bytes of an incomplete character are held back until the character is complete. Bytes
  still incomplete when generation ends (cut by ``max_tokens``) are dropped, so the concatenated
  ``TokenEvent.text`` always equals ``GenResult.text``. The end-of-generation or stop token ends the
  answer and is not part of ``text``, ``tokens`` or ``completion_tokens``.
* Threads. ``n_threads`` defaults to every core this process may use. This llama.cpp build parallelises
  with OpenMP (the same ``libgomp.so.1`` torch loads, so the first of them to load reads the settings),
  whose threads spin briefly at every barrier, then sleep. That is right on a machine the service has to
  itself, and wrong on a shared one. Measured here (SmolLM2-135M Q8_0/Q4_1, 2 cores): idle machine,
  default policy 0.33 s per SNIPS-slots request, ``OMP_WAIT_POLICY=passive`` 0.75 s (2.3x slower); another
  process on the second core, 2 threads 3.8 tok/s, 1 thread 34 tok/s, 2 threads with passive waiting
  41.6 tok/s. So: a dedicated server keeps the default; on a shared machine pass ``n_threads=1``
  (``distill serve --threads 1``) or start the process with ``OMP_WAIT_POLICY=passive``.
* Prefill is not interleaved: admitting a request runs its whole prompt before the next decode step, so a
  long prompt delays the other streams' next token by its prefill time.
* Failures. An exception in the loop fails the futures it concerns (a failing ``on_token`` callback fails
  only its own request); ``close()`` fails whatever is queued or running, then frees samplers, batch,
  context and model on the loop thread. Nothing waits forever.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import ctypes
import functools
import json
import math
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError

try:
    import llama_cpp as _ll
    from llama_cpp import _logger as _ll_logger
    from llama_cpp.llama_grammar import json_schema_to_gbnf
except ImportError:  # an optional dependency: only LM serving needs it
    _ll = None

EMBED_CHUNK = 32      # prompt tokens per embedding prefill: each one also gets an n_vocab logits row (6 MB at 49k)
GRAMMAR_CACHE = 64    # compiled schema grammars kept (a service sees a handful of schemas)


class ContextLengthError(DistillError):
    """The prompt plus at least one new token does not fit one slot of the engine (``n_ctx_per_seq``)."""


@dataclass
class GenRequest:
    prompt_tokens: list[int]
    max_tokens: int                      # 0 allowed: prefill only (e.g. embedding only)
    grammar: str | None = None           # GBNF text (see schema_grammar); None = unconstrained
    want_embedding: bool = False         # mean of the final hidden state over the prompt tokens
    temperature: float = 0.0             # 0 = greedy (default); >0 sampling with `seed`
    seed: int | None = None              # None: drawn from the engine's seeded generator
    stop_ids: tuple[int, ...] = ()       # extra stop tokens besides the vocab's end-of-generation tokens


@dataclass
class TokenEvent:
    text: str            # decoded piece, UTF-8 safe (bytes of an incomplete character are held back)
    token: int
    logprob: float       # log-probability of the chosen token under the UNconstrained distribution


@dataclass
class GenResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str           # "stop" | "length"
    token_logprobs: list[float]  # one per completion token (unconstrained, as TokenEvent.logprob)
    interventions: int           # sampled tokens where the grammar forbade the unconstrained argmax (module docstring)
    embedding: np.ndarray | None
    seconds: float               # submit -> result, queue included
    queue_seconds: float         # time waiting for a free slot
    stop_token: int | None = None  # the EOG / stop id that ended the answer (not in `tokens`), None for "length"


def _require_llama_cpp() -> None:
    if _ll is None:
        raise DistillError("llama-cpp-python is not installed, so GGUF students cannot be served",
                           hint="pip install llama-cpp-python (it builds llama.cpp from source, ~8 min)")


# ------------------------------------------------------------------------------------------------
# Grammars

def check_gbnf(gbnf: str) -> None:
    """Raise DistillError unless llama.cpp's own GBNF parser accepts ``gbnf`` (root rule ``root``). The parser
    needs no vocabulary, so this runs without a model."""
    _require_llama_cpp()
    smpl = _ll.llama_sampler_init_grammar(None, gbnf.encode("utf-8"), b"root")
    if not smpl:   # NULL: rejected. The parser prints its reason to stderr itself (not through llama.cpp's log).
        head = " ".join(gbnf.split())[:120]
        raise DistillError(f"llama.cpp's GBNF parser rejects the grammar (its reason is printed on stderr): {head!r}",
                           hint="pass GBNF text with a 'root' rule, e.g. from distill.students.gguf_engine.schema_grammar")
    _ll.llama_sampler_free(smpl)


def schema_grammar(schema: dict | None, *, json_object: bool = False) -> str:
    """GBNF text that accepts exactly the JSON documents valid under ``schema`` (llama.cpp's own converter,
    ``llama_cpp.llama_grammar.json_schema_to_gbnf``); ``json_object=True`` (schema None): any JSON object.
    The schema is checked as a JSON Schema first (jsonschema), the GBNF by llama.cpp's parser; either
    failure is a DistillError. Compiled grammars are cached by schema."""
    if schema is None:
        if not json_object:
            raise DistillError("schema_grammar needs a JSON schema or json_object=True")
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise DistillError(f"a JSON schema must be a JSON object, got {type(schema).__name__}",
                           hint='e.g. {"type": "object", "properties": {"label": {"enum": ["a", "b"]}}}')
    return _compile_schema(json.dumps(schema, sort_keys=True))


def enforceable(schema: Any) -> Any:
    """``schema`` rewritten into an equivalent one that llama.cpp's converter enforces fully.

    The converter silently ignores keywords it does not know. The one our tasks rely on is ``propertyNames``
    with an ``enum`` (SNIPS slots: "slots" maps slot names from a fixed list to strings): ignored, the
    grammar let the student invent slot names, and 5% of served answers failed the schema. An object whose
    keys must come from a list is the same as an object with each of those keys optional and nothing else,
    so ``{propertyNames: {enum: K}, additionalProperties: S}`` becomes ``{properties: {k: S for k in K},
    additionalProperties: false}``. The price: llama.cpp emits optional properties in the listed order, so
    the keys of such an object come out in that order (JSON objects are unordered, the answer is the same).
    Keywords still not enforced (patternProperties, if/then/else, not, uniqueItems, ...) are checked when
    the answer is validated after generation (``distill serve`` routes or marks an answer that fails)."""
    if isinstance(schema, list):
        return [enforceable(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: enforceable(v) for k, v in schema.items()}
    names = schema.get("propertyNames")
    if isinstance(names, dict) and isinstance(names.get("enum"), list) and set(names) <= {"enum", "type"} \
            and all(isinstance(k, str) for k in names["enum"]):
        extra = out.get("additionalProperties", True)
        value = {} if extra is True else extra
        props = dict(out.get("properties") or {})
        if value is not False:
            for k in names["enum"]:
                props.setdefault(k, value)
        # keys listed in `properties` but not allowed by propertyNames are impossible: drop them
        out["properties"] = {k: v for k, v in props.items() if k in names["enum"]}
        out["additionalProperties"] = False
        del out["propertyNames"]
    return out


@functools.lru_cache(maxsize=GRAMMAR_CACHE)
def _compile_schema(schema_json: str) -> str:
    import jsonschema

    _require_llama_cpp()
    schema = json.loads(schema_json)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise DistillError(f"invalid JSON schema: {e.message} (at {'/'.join(map(str, e.path)) or 'the top'})",
                           hint="fix the schema; https://json-schema.org/understanding-json-schema") from None
    try:
        gbnf = json_schema_to_gbnf(json.dumps(enforceable(schema)))
    except Exception as e:  # noqa: BLE001 - the converter reports unsupported constructs with assert/KeyError/...
        raise DistillError(f"llama.cpp cannot turn this JSON schema into a grammar: {type(e).__name__}: {e}",
                           hint="use the supported subset: type, properties, required, enum, const, items, anyOf/"
                                "oneOf, $ref to local $defs, string patterns anchored with ^...$") from None
    try:
        check_gbnf(gbnf)
    except DistillError as e:
        raise DistillError(f"the grammar made from this JSON schema does not parse ({e.message})",
                           hint="an empty enum or anyOf has no valid value; give it at least one") from None
    return gbnf


# ------------------------------------------------------------------------------------------------
# The engine


@dataclass(eq=False)
class _Seq:
    """One request, queued or in a slot. Touched only by the loop thread once submitted."""

    req: GenRequest
    future: concurrent.futures.Future
    on_token: Callable[[TokenEvent], None] | None
    chain: Any                       # llama_sampler chain, or None for greedy unconstrained
    grammar: Any                     # the chain's grammar sampler (owned by the chain), or None
    t_submit: float
    t_admit: float = 0.0
    seq_id: int = -1
    n_past: int = 0                  # tokens of this sequence in the KV cache
    next_token: int = -1             # sampled, still to be decoded
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    interventions: int = 0
    embedding: np.ndarray | None = None
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


class GGUFEngine:
    """A GGUF causal LM behind a continuous-batching decode loop (module docstring). Thread-safe."""

    def __init__(self, gguf_path: str | Path, *, n_ctx_per_seq: int = 2048, max_batch: int = 8,
                 n_threads: int | None = None, seed: int = 0, n_batch: int = 512, verbose: bool = False):
        _require_llama_cpp()
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise DistillError(f"GGUF file not found: {self.path}", hint="export the student with `distill export`")
        if not 1 <= max_batch <= _ll.llama_max_parallel_sequences():
            raise DistillError(f"max_batch must be in 1..{_ll.llama_max_parallel_sequences()}, got {max_batch}")
        if n_ctx_per_seq < 2:
            raise DistillError(f"n_ctx_per_seq must be >= 2, got {n_ctx_per_seq}")
        self.n_ctx_per_seq, self.max_batch = n_ctx_per_seq, max_batch
        self.n_threads = n_threads or len(os.sched_getaffinity(0))
        _ll_logger.set_verbose(verbose)   # llama.cpp logs every load to stderr otherwise
        _ll.llama_backend_init()          # idempotent

        self._model = _ll.llama_model_load_from_file(str(self.path).encode(), _ll.llama_model_default_params())
        if not self._model:
            raise DistillError(f"llama.cpp cannot load {self.path}",
                               hint="is it a complete GGUF file of an architecture this llama.cpp build knows?")
        self._vocab = _ll.llama_model_get_vocab(self._model)
        self.n_vocab = _ll.llama_vocab_n_tokens(self._vocab)
        self.n_embd = _ll.llama_model_n_embd(self._model)

        p = _ll.llama_context_default_params()
        p.n_ctx = n_ctx_per_seq * max_batch
        p.n_seq_max = max_batch
        p.kv_unified = False                      # every slot its own n_ctx_per_seq cells (module docstring)
        p.n_batch = p.n_ubatch = min(n_batch, p.n_ctx)
        p.n_outputs_max = max(max_batch, EMBED_CHUNK)
        p.n_outputs_max_per_seq = 0               # 0 = n_outputs_max; the default (1) would refuse embedding prefills
        p.n_threads = p.n_threads_batch = self.n_threads
        p.embeddings = False
        self._ctx = _ll.llama_init_from_model(self._model, p)
        if not self._ctx:
            _ll.llama_model_free(self._model)
            raise DistillError(f"llama.cpp cannot create a context of {p.n_ctx} tokens for {self.path}",
                               hint="lower n_ctx_per_seq or max_batch (memory)")
        if _ll.llama_n_ctx_seq(self._ctx) < n_ctx_per_seq:   # llama.cpp caps or splits differently than asked
            got = _ll.llama_n_ctx_seq(self._ctx)
            self._free_native()
            raise DistillError(f"llama.cpp gave each sequence {got} tokens of context, not {n_ctx_per_seq}",
                               hint=f"use n_ctx_per_seq <= {got}")
        self._mem = _ll.llama_get_memory(self._ctx)
        self._n_batch = _ll.llama_n_batch(self._ctx)
        self._batch = _ll.llama_batch_init(max(self._n_batch, max_batch), 0, 1)
        self._eog = frozenset(t for t in range(self.n_vocab) if _ll.llama_vocab_is_eog(self._vocab, t))
        self._rng = random.Random(seed)
        self._one = (_ll.llama_token_data * 1)()     # a 1-candidate array for "does the grammar allow the argmax?"
        self._one_arr = _ll.llama_token_data_array(self._one, 1, -1, False)

        self._cv = threading.Condition()
        self._queue: collections.deque[_Seq] = collections.deque()
        self._active: dict[int, _Seq] = {}
        self._free_ids = list(range(max_batch - 1, -1, -1))
        self._closing = False
        # every key up front: stats() copies the dict from another thread while the loop updates it
        self._stats = collections.Counter(dict.fromkeys(
            ("steps", "step_tokens", "tokens_generated", "prompt_tokens", "done", "cancelled", "failed"), 0))
        self._busy = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"gguf-engine-{self.path.stem}", daemon=True)
        self._thread.start()

    # -- vocabulary ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        """llama.cpp's tokenizer; ``special``: parse control tokens such as <|im_end|> in ``text``."""
        data = text.encode("utf-8")
        n = len(data) + 8
        while True:
            buf = (_ll.llama_token * n)()
            got = _ll.llama_tokenize(self._vocab, data, len(data), buf, n, add_bos, special)
            if got >= 0:
                return list(buf[:got])
            n = -got   # buffer too small: llama.cpp returns minus the size it needs

    def eog_ids(self) -> list[int]:
        return sorted(self._eog)

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = _ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    # -- submitting ------------------------------------------------------------------------------

    def submit(self, req: GenRequest, on_token: Callable[[TokenEvent], None] | None = None) -> concurrent.futures.Future:
        """Queue ``req``; the future resolves to a GenResult. ``on_token`` runs on the engine thread for every
        completion token (keep it quick). Raises ContextLengthError / DistillError here, never later, for a
        request that cannot run."""
        n = len(req.prompt_tokens)
        if n == 0:
            raise DistillError("empty prompt: a request needs at least one prompt token")
        if n + 1 > self.n_ctx_per_seq:
            raise ContextLengthError(
                f"prompt of {n} tokens + 1 new token does not fit the context of {self.n_ctx_per_seq} tokens per sequence",
                hint="shorten the input or start the engine with a larger n_ctx_per_seq")
        if min(req.prompt_tokens) < 0 or max(req.prompt_tokens) >= self.n_vocab:
            raise DistillError(f"prompt token ids must be in 0..{self.n_vocab - 1}")
        if req.max_tokens < 0 or req.temperature < 0:
            raise DistillError(f"max_tokens and temperature must be >= 0, got {req.max_tokens} and {req.temperature}")
        chain, grammar = self._make_sampler(req)
        seq = _Seq(req, concurrent.futures.Future(), on_token, chain, grammar, time.perf_counter())
        with self._cv:
            if self._closing:
                self._free_sampler(seq)
                raise DistillError("the GGUF engine is closed")
            self._queue.append(seq)
            self._cv.notify()
        return seq.future

    def _make_sampler(self, req: GenRequest):
        if req.grammar is None and req.temperature == 0:
            return None, None            # plain argmax on the logits, no sampler needed
        chain = _ll.llama_sampler_chain_init(_ll.llama_sampler_chain_default_params())
        grammar = None
        if req.grammar is not None:
            grammar = _ll.llama_sampler_init_grammar(self._vocab, req.grammar.encode("utf-8"), b"root")
            if not grammar:
                _ll.llama_sampler_free(chain)
                check_gbnf(req.grammar)  # raises with llama.cpp's reason
                raise DistillError("llama.cpp cannot build a sampler for this grammar")
            _ll.llama_sampler_chain_add(chain, grammar)   # the chain owns it from here
        if req.temperature == 0:
            _ll.llama_sampler_chain_add(chain, _ll.llama_sampler_init_greedy())
        else:
            seed = req.seed if req.seed is not None else self._rng.randrange(2**32 - 1)
            _ll.llama_sampler_chain_add(chain, _ll.llama_sampler_init_temp(req.temperature))
            _ll.llama_sampler_chain_add(chain, _ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain, grammar

    def generate(self, req: GenRequest) -> GenResult:
        return self.submit(req).result()

    async def agenerate(self, req: GenRequest) -> GenResult:
        # wrap_future cancels the engine future when the awaiting task is cancelled, which frees the slot.
        return await asyncio.wrap_future(self.submit(req))

    async def astream(self, req: GenRequest) -> AsyncIterator[TokenEvent | GenResult]:
        """TokenEvents as they are decoded, then the GenResult. Leaving the loop early cancels the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = object()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:   # the event loop is gone: nobody is listening any more
                pass

        fut = self.submit(req, put)
        fut.add_done_callback(lambda _: put(done))
        try:
            while True:
                item = await q.get()
                if item is done:
                    yield fut.result()
                    return
                yield item
        finally:
            if not fut.done():
                self.cancel(fut)

    def cancel(self, future: concurrent.futures.Future) -> None:
        """Give up on a request (a client disconnected); its slot is freed before the next decode step."""
        future.cancel()   # futures stay PENDING until they resolve, so this always succeeds if not done
        with self._cv:
            self._cv.notify()

    def stats(self) -> dict[str, Any]:
        with self._cv:
            s = dict(self._stats)
            queued = len(self._queue)
        steps = s.get("steps", 0)
        return {
            "active": len(self._active), "queued": queued, "slots": self.max_batch,
            "steps": steps, "mean_batch_size": s.get("step_tokens", 0) / steps if steps else 0.0,
            "tokens_generated": s.get("tokens_generated", 0), "prompt_tokens": s.get("prompt_tokens", 0),
            "requests_done": s.get("done", 0), "requests_cancelled": s.get("cancelled", 0),
            "requests_failed": s.get("failed", 0), "busy_seconds": round(self._busy, 3),
            "tokens_per_second": s.get("tokens_generated", 0) / self._busy if self._busy else 0.0,
        }

    def close(self) -> None:
        """Fail queued and running requests, stop the loop and free llama.cpp's memory. Idempotent."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:   # close() from an on_token callback: the loop exits itself
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the decode loop (engine thread only) ----------------------------------------------------

    def _loop(self) -> None:
        error = None
        try:
            self._serve()
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            error = e
            raise
        finally:
            self._shutdown(error)

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._closing or self._queue or self._active):
                    self._cv.wait()
                if self._closing:
                    return
                admitted = []
                while self._queue and self._free_ids:
                    seq = self._queue.popleft()
                    if seq.future.cancelled():
                        self._stats["cancelled"] += 1
                        self._free_sampler(seq)
                        continue
                    seq.seq_id = self._free_ids.pop()
                    admitted.append(seq)
            t0 = time.perf_counter()
            for seq in admitted:
                self._active[seq.seq_id] = seq
                seq.t_admit = time.perf_counter()
                try:
                    self._prefill(seq)
                except Exception as e:  # noqa: BLE001 - fail this request, keep serving the others
                    self._finish(seq, error=e)
            for seq in [s for s in self._active.values() if s.future.cancelled()]:
                self._finish(seq, cancelled=True)
            if self._active:
                self._step()
            self._busy += time.perf_counter() - t0

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, seq_id, wants output) entries."""
        b = self._batch
        b.n_tokens = len(entries)
        for i, (tok, pos, sid, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = sid
        rc = _ll.llama_decode(self._ctx, b)
        if rc != 0:
            raise DistillError(f"llama_decode failed with code {rc} "
                               f"({'no KV slot' if rc == 1 else 'aborted' if rc == 2 else 'invalid batch or fatal error'})")

    def _prefill(self, seq: _Seq) -> None:
        req, sid = seq.req, seq.seq_id
        toks = req.prompt_tokens
        self._stats["prompt_tokens"] += len(toks)
        if req.max_tokens == 0 and not req.want_embedding:
            self._finish(seq, reason="length")   # nothing to compute
            return
        chunk = EMBED_CHUNK if req.want_embedding else self._n_batch
        total = np.zeros(self.n_embd, dtype=np.float64) if req.want_embedding else None
        if req.want_embedding:
            _ll.llama_set_embeddings(self._ctx, True)
        try:
            for start in range(0, len(toks), chunk):
                part = toks[start:start + chunk]
                last = start + len(part) == len(toks)
                self._decode([(t, start + j, sid, req.want_embedding or (last and j == len(part) - 1))
                              for j, t in enumerate(part)])
                if total is not None:
                    for j in range(len(part)):
                        ptr = _ll.llama_get_embeddings_ith(self._ctx, j)
                        if not ptr:
                            raise DistillError("llama.cpp returned no embedding for a prompt token")
                        total += np.ctypeslib.as_array(ptr, shape=(self.n_embd,))
        finally:
            if req.want_embedding:
                _ll.llama_set_embeddings(self._ctx, False)
        seq.n_past = len(toks)
        if total is not None:
            seq.embedding = (total / len(toks)).astype(np.float32)
        if req.max_tokens == 0:
            self._finish(seq, reason="length")
        else:
            self._sample(seq, len(part) - 1)

    def _step(self) -> None:
        seqs = list(self._active.values())
        try:
            self._decode([(s.next_token, s.n_past, s.seq_id, True) for s in seqs])
        except Exception as e:  # noqa: BLE001
            for s in seqs:
                self._finish(s, error=e)
            return
        self._stats["steps"] += 1
        self._stats["step_tokens"] += len(seqs)
        for i, s in enumerate(seqs):
            s.n_past += 1
            try:
                self._sample(s, i)
            except Exception as e:  # noqa: BLE001 - e.g. the caller's on_token raised
                self._finish(s, error=e)

    def _sample(self, seq: _Seq, i: int) -> None:
        """Choose the next token of ``seq`` from output row ``i`` of the last decode; emit or finish."""
        ptr = _ll.llama_get_logits_ith(self._ctx, i)
        if not ptr:
            raise DistillError(f"llama.cpp returned no logits for output row {i}")
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        best = int(logits.argmax())
        m = float(logits[best])
        lse = m + math.log(float(np.exp(logits - m, dtype=np.float64).sum()))
        forbidden = False
        if seq.grammar is not None:
            self._one[0].id, self._one[0].logit, self._one[0].p = best, m, 0.0
            self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
            _ll.llama_sampler_apply(seq.grammar, ctypes.byref(self._one_arr))
            forbidden = math.isinf(self._one[0].logit)
        if seq.chain is None:
            tok = best
        elif seq.req.temperature == 0 and not forbidden:
            tok = best
            _ll.llama_sampler_accept(seq.chain, tok)    # advances the grammar past the token
        else:
            tok = _ll.llama_sampler_sample(seq.chain, self._ctx, i)   # applies the chain, accepts the token
        seq.interventions += forbidden
        if tok in self._eog or tok in seq.req.stop_ids:
            self._finish(seq, reason="stop", stop_token=tok)
            return
        logprob = float(logits[tok]) - lse
        text = seq.decoder.decode(self._piece(tok))
        seq.tokens.append(tok)
        seq.logprobs.append(logprob)
        seq.pieces.append(text)
        self._stats["tokens_generated"] += 1
        if seq.on_token is not None:
            seq.on_token(TokenEvent(text, tok, logprob))
        if len(seq.tokens) >= seq.req.max_tokens or seq.n_past + 1 >= self.n_ctx_per_seq:   # prompt + completion <= slot
            self._finish(seq, reason="length")
        else:
            seq.next_token = tok

    def _finish(self, seq: _Seq, *, reason: str = "", stop_token: int | None = None,
                error: BaseException | None = None, cancelled: bool = False) -> None:
        """Free the slot and sampler of ``seq`` and resolve its future (result, exception or cancelled)."""
        if seq.seq_id >= 0:
            _ll.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
            self._active.pop(seq.seq_id, None)
            with self._cv:
                self._free_ids.append(seq.seq_id)
            seq.seq_id = -1
        self._free_sampler(seq)
        if cancelled or seq.future.cancelled():
            self._stats["cancelled"] += 1
            return
        if not seq.future.set_running_or_notify_cancel():
            self._stats["cancelled"] += 1
            return
        if error is not None:
            self._stats["failed"] += 1
            seq.future.set_exception(error)
            return
        self._stats["done"] += 1
        now = time.perf_counter()
        seq.future.set_result(GenResult(
            text="".join(seq.pieces), tokens=seq.tokens, prompt_tokens=len(seq.req.prompt_tokens),
            completion_tokens=len(seq.tokens), finish_reason=reason, token_logprobs=seq.logprobs,
            interventions=seq.interventions, embedding=seq.embedding, seconds=now - seq.t_submit,
            queue_seconds=(seq.t_admit or now) - seq.t_submit, stop_token=stop_token))

    @staticmethod
    def _free_sampler(seq: _Seq) -> None:
        if seq.chain is not None:
            _ll.llama_sampler_free(seq.chain)   # frees the grammar sampler it holds too
            seq.chain = seq.grammar = None

    def _shutdown(self, error: BaseException | None) -> None:
        closed = DistillError("the GGUF engine was closed before this request finished")
        if error is not None:
            closed = DistillError(f"the GGUF engine stopped: {type(error).__name__}: {error}")
        with self._cv:
            self._closing = True
            pending = list(self._queue) + list(self._active.values())
            self._queue.clear()
        for seq in pending:
            self._finish(seq, error=closed)
        self._free_native()

    def _free_native(self) -> None:
        if getattr(self, "_batch", None) is not None:
            _ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            _ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            _ll.llama_model_free(self._model)
            self._model = None


# ------------------------------------------------------------------------------------------------
# A distill student folder


def find_gguf(folder: str | Path) -> Path:
    """The student's GGUF file: the one named by distill_student.json "gguf_file", else the single *.gguf."""
    from distill.students.causal_lm import STUDENT_FILE

    folder = Path(folder)
    info_file = folder / STUDENT_FILE
    named = json.loads(info_file.read_text(encoding="utf-8")).get("gguf_file") if info_file.exists() else None
    if named:
        path = folder / named
        if not path.is_file():
            raise DistillError(f"{info_file} names gguf_file {named!r}, but {path} does not exist",
                               hint="re-run the GGUF export, or fix gguf_file in distill_student.json")
        return path
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise DistillError(f"{folder}: expected one .gguf file, found {len(found)}"
                           + (f" ({', '.join(p.name for p in found)})" if found else ""),
                           hint='export the student to GGUF, or name the file in distill_student.json as "gguf_file"')
    return found[0]


class GGUFStudent:
    """A distill LM student exported to GGUF: a folder with a *.gguf file, the student's HF tokenizer files and
    distill_student.json (keys used: "prompt" = "teacher"|"short", "input_prefix", optional "gguf_file").
    Prompts are rendered exactly as in training (``causal_lm.student_prompt``) and tokenised with the HF
    tokenizer (``add_special_tokens=not has_chat_template(tok)``); the ids go to the engine, so the engine's
    own tokenizer never decides what the student sees."""

    def __init__(self, folder: str | Path, *, n_ctx_per_seq: int = 2048, max_batch: int = 8, n_threads: int | None = None):
        from transformers import AutoTokenizer

        from distill.students.causal_lm import read_student_info

        self.path = Path(folder)
        self.info: dict[str, Any] = read_student_info(self.path)
        self.gguf_file = find_gguf(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.engine = GGUFEngine(self.gguf_file, n_ctx_per_seq=n_ctx_per_seq, max_batch=max_batch, n_threads=n_threads)

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        from distill.students.causal_lm import has_chat_template, student_prompt

        prompt = student_prompt(self.tokenizer, self.info, messages)
        return self.tokenizer(prompt, add_special_tokens=not has_chat_template(self.tokenizer))["input_ids"]

    def request(self, messages: list[dict], max_tokens: int, *, schema: dict | None = None, json_object: bool = False,
                want_embedding: bool = False, temperature: float = 0.0, seed: int | None = None) -> GenRequest:
        grammar = schema_grammar(schema, json_object=json_object) if schema is not None or json_object else None
        return GenRequest(self.prompt_tokens(messages), max_tokens, grammar=grammar, want_embedding=want_embedding,
                          temperature=temperature, seed=seed)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def size_bytes(self) -> int:
        return self.gguf_file.stat().st_size

    def close(self) -> None:
        self.engine.close()
