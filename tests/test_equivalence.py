"""Randomized equivalence: whatever the block cache, batching, eviction, preemption and chunked prefill do,
every vLLM output equals the HF block-attention reference for its own prompt (greedy tokens identical,
chosen-token logprobs within 1e-3).

Workloads are generated from token ids (never text) by a seeded generator:

- documents drawn from the whole vocabulary but the sink id, the pad id included: some end with one or
  more pad ids, some hold it inside, some hold ``<|im_start|>``/``<|im_end|>``; real block lengths
  (sinks + content) around and at page multiples (31, 32, 33, 63, 64, 65) and random ones;
- a pool of documents, so documents recur across prompts at other offsets and in other orders (and
  now and then twice in one prompt);
- prompts with a prefix block (lengths around a page too), without one, prefix-only prompts (a prefix
  block and the final block), plain prompts without sinks (ordinary full attention);
- "siblings": the context blocks of an earlier prompt with a final block of another length/content;
- "grown": an earlier prompt with one document grown by a few tokens (a chat history that gained a
  turn: its full pages are reused, its last page is not), and a new final block;
- "plain-head": a plain prompt that starts with a block prompt's prefix of a page or more (the two
  share the prefix's full pages, on vLLM's own prefix chain), with pad ids right after it now and then
  (the ids of the block prompt's padded prefix page, which must not be shared);
- "pad pairs": two prompts equal but for one trailing pad id on their last document (or on their
  prefix), with a final block longer than a page; asked one after the other (the second one first
  in the next ``generate`` call), they are exactly the prompts whose page hashes must differ.

The prompts arrive in a random order, in several ``llm.generate`` calls of random batch composition
(later calls hit the block cache filled by earlier ones; some prompts are asked again), on one engine
with chunked prefill and a KV cache of the largest request plus a page or few, admitting requests by
their first chunk (``scheduler_reserve_full_isl=False``): cached pages are evicted and running requests
preempted (both verified), mid-prefill and mid-decode.

References are computed once per distinct prompt, before the engine starts, on one torch thread.

Reproduce a failure with its seed: ``BLOCKATTN_EQUIV_SEEDS=<seed> pytest tests/test_equivalence.py``
(``-m slow`` for the slow variant).
"""

from __future__ import annotations

import gc
import json
import os
import random
from dataclasses import dataclass, field

import pytest
import torch

from vllm_blockattn import BlockSettings, build_block_prompt, parse_block_prompt
from vllm_blockattn.core.paged import padded_length
from vllm_blockattn.core.reference import block_generate

vllm = pytest.importorskip("vllm")

PAGE = 32  # the plugin's KV page size on CPU
TOL = 1e-3  # chosen-token logprobs, engine vs reference
REAL_LENGTHS = (31, 32, 33, 63, 64, 65)  # block lengths (sinks + content) around and at page multiples


def _seeds(default: list[int]) -> list[int]:
    env = os.environ.get("BLOCKATTN_EQUIV_SEEDS")
    return [int(s) for s in env.split(",")] if env else default


# ---------------------------------------------------------------------------------------------------
# Workload generator (token ids only)


@dataclass(frozen=True)
class Vocab:
    """The token ids a workload is drawn from."""

    size: int
    settings: BlockSettings
    pad: int  # the engine's pad id: the model's pad_token_id, else eos_token_id
    specials: tuple[int, ...]  # other special tokens (<|im_start|>, <|im_end|>)

    @classmethod
    def from_pretrained(cls, path: str) -> Vocab:
        from transformers import AutoTokenizer

        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        settings = BlockSettings.from_pretrained(path)
        pad = config.get("pad_token_id")
        if pad is None:
            eos = config["eos_token_id"]
            pad = eos[0] if isinstance(eos, list) else eos
        tok = AutoTokenizer.from_pretrained(path)
        specials = tuple(tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
        assert settings.marker_id not in (pad, *specials)
        return cls(size=config["vocab_size"], settings=settings, pad=int(pad), specials=specials)


@dataclass
class Case:
    ids: list[int]
    kind: str  # block, prefix-only, plain, sibling, grown, plain-head, pad-pair
    note: str  # what the prompt is made of, for failure messages
    max_tokens: int


@dataclass
class Workload:
    seed: int
    cases: list[Case]
    calls: list[list[int]]  # one list of case indices per llm.generate call, in arrival order
    pairs: list[tuple[int, int]] = field(default_factory=list)  # pad pairs (asked first, asked second)


def make_workload(seed: int, vocab: Vocab, *, num_docs: int = 10, num_prompts: int = 20, num_pairs: int = 3,
                  max_batch: int = 4, max_docs: int = 3) -> Workload:
    rng = random.Random(seed)
    k, pad = vocab.settings.num_sinks, vocab.pad
    tokens = [t for t in range(vocab.size) if t != vocab.settings.marker_id]  # a sink or a boundary

    def content(n: int) -> list[int]:
        return [rng.choice(tokens) for _ in range(n)]

    def spice(body: list[int]) -> list[int]:
        """Pad ids and other special tokens inside, pad ids at the end."""
        if rng.random() < 0.4:
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(len(body))] = rng.choice(vocab.specials)
        if rng.random() < 0.3:
            body[rng.randrange(len(body))] = pad
        r = rng.random()
        if r < 0.3:
            body[-1] = pad
        elif r < 0.4 and len(body) > 2:
            body[-2:] = [pad, pad]
        return body

    def real_length() -> int:
        return rng.choice(REAL_LENGTHS) if rng.random() < 0.7 else rng.randint(k + 1, 70)

    docs: list[list[int]] = []  # contents (the layout adds the sinks)
    for _ in range(num_docs):
        docs.append(spice(content(real_length() - k)))

    def prefix() -> list[int]:
        n = rng.choice((31, 32, 33)) if rng.random() < 0.4 else rng.randint(1, 40)
        return spice(content(n))

    def final(long: bool | None = None) -> list[int]:
        long = rng.random() < 0.3 if long is None else long
        body = content(rng.randint(PAGE + 1, PAGE + 16) if long else rng.randint(1, 12))
        if rng.random() < 0.3:
            body[rng.randrange(len(body))] = rng.choice((pad, *vocab.specials))
        return body

    def max_tokens() -> int:
        return rng.randint(12, 24) if rng.random() < 0.1 else rng.randint(2, 6)

    def describe(pre, doc_ids, fin) -> str:
        parts = [f"prefix[{len(pre)}]"] if pre else []
        parts += [f"doc{d}[{k + len(docs[d])}{'p' if docs[d][-1] == pad else ''}]" for d in doc_ids]
        return " ".join(parts + [f"final[{k + len(fin)}]"])

    cases: list[Case] = []
    contexts: list[tuple[list[int], list[int], list[int]]] = []  # (prefix, doc ids, final) of block prompts

    def add_block(pre, doc_ids, fin, kind, mt=None):
        ids = build_block_prompt([docs[d] for d in doc_ids] + [fin], vocab.settings, prefix=pre or None)
        cases.append(Case(ids, kind, describe(pre, doc_ids, fin), mt or max_tokens()))
        if doc_ids:
            contexts.append((pre, doc_ids, fin))
        return len(cases) - 1

    # A fixed mix (so that one seed covers every kind), generated in a random order.
    num_plain = num_prefix_only = max(1, num_prompts // 8)
    num_siblings = max(2, num_prompts // 6)
    num_blocks = max(1, num_prompts - num_plain - num_prefix_only - num_siblings)
    for kind in rng.sample(["block"] * num_blocks + ["plain"] * num_plain + ["prefix-only"] * num_prefix_only,
                           num_blocks + num_plain + num_prefix_only):
        if kind == "plain":
            n = rng.choice(REAL_LENGTHS) if rng.random() < 0.5 else rng.randint(2, 80)
            cases.append(Case(spice(content(n)), "plain", f"plain[{n}]", max_tokens()))
        elif kind == "prefix-only":
            add_block(prefix(), [], final(), "prefix-only")
        else:
            doc_ids = [rng.randrange(num_docs) for _ in range(rng.randint(1, max_docs))]
            if rng.random() < 0.1:
                doc_ids.append(doc_ids[0])  # the same document twice in one prompt
            add_block(prefix() if rng.random() < 0.6 else [], doc_ids, final(), "block")
    for _ in range(num_siblings):
        # Every context block of an earlier prompt; the final block longer, shorter or different.
        pre, doc_ids, fin = rng.choice(contexts)
        r = rng.random()
        if r < 0.35:
            fin = fin + content(rng.randint(1, PAGE + 4))
        elif r < 0.6 and len(fin) > 1:
            fin = fin[: rng.randint(1, len(fin) - 1)]
        else:
            fin = final()
        add_block(pre, doc_ids, fin, "sibling")
    for _ in range(max(1, num_prompts // 8)):
        pre, doc_ids, _ = rng.choice(contexts)
        j = rng.randrange(len(doc_ids))
        docs.append(docs[doc_ids[j]] + content(rng.randint(1, PAGE + 8)))
        add_block(pre, doc_ids[:j] + [len(docs) - 1] + doc_ids[j + 1 :], final(), "grown")
    for _ in range(max(1, num_prompts // 10)):
        head = spice(content(rng.randint(PAGE, 2 * PAGE + 8)))
        add_block(head, [rng.randrange(num_docs)], final(), "block")
        tail = [pad] * (-len(head) % PAGE) if rng.random() < 0.5 else []
        n = len(head) + len(tail)
        cases.append(Case(head + tail + content(rng.randint(1, PAGE + 8)), "plain-head",
                          f"plain[{n}+] starting with case {len(cases) - 1}'s prefix" + (" and pads" if tail else ""),
                          max_tokens()))

    # Pad pairs: equal but for one trailing pad id on the last context block (a document that does not
    # fill its last page, or a prefix). The final block spans a page so that its pages are hashed too.
    pairs = []
    for p in range(num_pairs):
        fin, mt = final(long=True), max_tokens()
        if p % 3 == 2:  # on the prefix: prefix-only prompts
            base = content(rng.choice((30, 31, 62, 63)))
            pre_a, pre_b, docs_a, docs_b, what = base, base + [pad], [], [], "prefix"
        else:
            n = rng.choice((31, 63, rng.randint(k + 1, 60)))
            body = content(n - (n % PAGE == 0) - k)  # one more pad still fits its last page
            if rng.random() < 0.5:
                body[-1] = pad  # already ends with a pad: the other one ends with two
            docs.append(body)
            docs.append(body + [pad])
            pre = prefix() if rng.random() < 0.5 else []
            others = [rng.randrange(num_docs) for _ in range(rng.randint(0, max_docs - 1))]
            pre_a = pre_b = pre
            docs_a, docs_b, what = others + [len(docs) - 2], others + [len(docs) - 1], "document"
        a = add_block(pre_a, docs_a, fin, "pad-pair", mt)
        b = add_block(pre_b, docs_b, fin, "pad-pair", mt)
        cases[a].note += f" (pair {p}: {what} without the extra trailing pad)"
        cases[b].note += f" (pair {p}: {what} with one more trailing pad)"
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        cases[second].note += f", asked right after case {first}"
        pairs.append((first, second))

    # Arrival: a random order of everything, some prompts asked again later; each pad pair is asked
    # one after the other, the second one first in the next call (sometimes in the same call).
    singles = [i for i in range(len(cases)) if cases[i].kind != "pad-pair"]
    units: list[list[int]] = [[i] for i in singles] + [[rng.choice(singles)] for _ in range(len(singles) // 4)]
    units += [list(pr) for pr in pairs]
    rng.shuffle(units)
    calls: list[list[int]] = [[]]
    size = rng.randint(1, max_batch)
    for unit in units:
        if len(unit) == 2:
            first, second = unit
            calls[-1].append(first)
            if rng.random() < 0.75:
                calls.append([])
                size = rng.randint(1, max_batch)
            calls[-1].append(second)
        else:
            calls[-1].extend(unit)
        if len(calls[-1]) >= size:
            calls.append([])
            size = rng.randint(1, max_batch)
    return Workload(seed, cases, [c for c in calls if c], pairs)


# ---------------------------------------------------------------------------------------------------
# Engine, reference, comparison


def _make_llm(path: str, **kwargs):
    from vllm import LLM

    args = dict(model=path, attention_backend="blockattn", dtype="float32", enforce_eager=True, seed=0)
    args.update(kwargs)
    return LLM(**args)


class Reference:
    """HF block-attention reference, computed once per distinct prompt (for the most tokens asked)."""

    def __init__(self, path: str, settings: BlockSettings):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.settings = settings
        self._cache: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}

    def precompute(self, cases: list[Case]) -> None:
        """All references up front, on one thread: a tiny model's decode steps run ~20x faster than on
        two busy cores. (vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op once an engine
        has started in this process, hence ``torch._C``.)"""
        most: dict[tuple[int, ...], int] = {}
        for c in cases:
            most[tuple(c.ids)] = max(most.get(tuple(c.ids), 0), c.max_tokens)
        before = torch.get_num_threads()
        torch._C.set_num_threads(1)
        try:
            for ids, n in most.items():
                self(list(ids), n)
        finally:
            torch._C.set_num_threads(before)

    def __call__(self, ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        key = tuple(ids)
        hit = self._cache.get(key)
        if hit is None or len(hit[0]) < max_tokens:
            layout = parse_block_prompt(ids, self.settings)
            hit = self._cache[key] = block_generate(self.model, ids, layout, max_new_tokens=max_tokens,
                                                    return_logprobs=True)
        return hit[0][:max_tokens], hit[1][:max_tokens]


class Probes:
    """Counts the scheduler's preemptions and the block pool's evictions of cached pages."""

    def __init__(self, llm):
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        pool = scheduler.kv_cache_manager.block_pool
        self.preempted: list[str] = []
        self.evicted = 0
        preempt, evict = scheduler._preempt_request, pool._maybe_evict_cached_block

        def _preempt_request(request, *a, **k):
            self.preempted.append(request.request_id)
            return preempt(request, *a, **k)

        def _maybe_evict_cached_block(block):
            done = evict(block)
            self.evicted += bool(done)
            return done

        scheduler._preempt_request = _preempt_request
        pool._maybe_evict_cached_block = _maybe_evict_cached_block


def run_workload(llm, ref: Reference, work: Workload) -> dict:
    """Ask every call of ``work``; returns failures (one line each) and cache statistics."""
    from vllm import SamplingParams

    failures, cached_tokens, asked = [], 0, 0
    for c, call in enumerate(work.calls):
        params = [SamplingParams(max_tokens=work.cases[i].max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
                  for i in call]
        outs = llm.generate([{"prompt_token_ids": work.cases[i].ids} for i in call], params, use_tqdm=False)
        for i, out in zip(call, outs):
            case, asked = work.cases[i], asked + 1
            if case.kind not in ("plain", "plain-head"):
                cached_tokens += out.num_cached_tokens or 0
            want, want_lps = ref(case.ids, case.max_tokens)
            got = list(out.outputs[0].token_ids)
            got_lps = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, got)]
            where = (f"seed={work.seed} call={c} case={i} {case.kind}: {case.note}, {len(case.ids)} ids, "
                     f"cached={out.num_cached_tokens}")
            if got != want:
                s = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                failures.append(f"{where}: tokens differ from step {s}: got {got} want {want}")
                continue
            err = max(abs(a - b) for a, b in zip(got_lps, want_lps))
            if err > TOL:
                failures.append(f"{where}: max |logprob error| {err:.2e} > {TOL}")
    return {"failures": failures, "cached_tokens": cached_tokens, "asked": asked}


def check_equivalence(model_path: str, seeds: list[int], *, workload: dict, spare_pages: int = 1,
                      **engine) -> None:
    """Run the workloads of ``seeds`` on one engine whose KV cache holds the largest request plus
    ``spare_pages`` pages (so that a batch of large requests must preempt, and cached pages are evicted)."""
    vocab = Vocab.from_pretrained(model_path)
    works = [make_workload(seed, vocab, **workload) for seed in seeds]
    ref = Reference(model_path, vocab.settings)
    ref.precompute([c for w in works for c in w.cases])
    largest = max(-(-(padded_length(parse_block_prompt(c.ids, vocab.settings), PAGE) + c.max_tokens) // PAGE)
                  for w in works for c in w.cases)  # pages
    # vLLM wants a page more than max_model_len; the plugin wants the padded prompt < max_model_len.
    llm = _make_llm(model_path, max_model_len=(largest + 1) * PAGE, num_gpu_blocks_override=largest + 2 + spare_pages,
                    **engine)
    try:
        probes = Probes(llm)
        results = [run_workload(llm, ref, w) for w in works]
        stats = dict(llm.llm_engine.engine_core.engine_core.scheduler.blockattn_stats)
    finally:
        del llm
        gc.collect()
    failures = [f for r in results for f in r["failures"]]
    asked = sum(r["asked"] for r in results)
    assert not failures, (f"seeds {seeds}: {len(failures)} of {asked} outputs differ from the HF reference "
                          f"(rerun one with BLOCKATTN_EQUIV_SEEDS=<seed>):\n" + "\n".join(failures))
    # The workloads must have exercised what they are about.
    assert probes.preempted, f"seeds {seeds}: no preemption; fewer spare pages or larger batches"
    assert probes.evicted, f"seeds {seeds}: no cached page was evicted"
    assert stats["block_hits"] > 0 and all(r["cached_tokens"] > 0 for r in results), (seeds, stats)


# ---------------------------------------------------------------------------------------------------
# Tests


def test_generator_is_seeded_and_covers_the_cases(tiny_qwen3):
    vocab = Vocab.from_pretrained(tiny_qwen3)
    a, b = make_workload(7, vocab), make_workload(7, vocab)
    assert [c.ids for c in a.cases] == [c.ids for c in b.cases] and a.calls == b.calls
    assert [c.ids for c in make_workload(8, vocab).cases] != [c.ids for c in a.cases]
    sink, pad = vocab.settings.sink_token_id, vocab.pad
    kinds, lengths, ends_with_pad, specials, pad_inside = set(), set(), 0, 0, 0
    for seed in range(5):
        work = make_workload(seed, vocab)
        arrival = [i for call in work.calls for i in call]
        assert set(arrival) == set(range(len(work.cases)))
        for case in work.cases:
            kinds.add(case.kind)
            layout = parse_block_prompt(case.ids, vocab.settings)
            assert layout.is_block_prompt == (case.kind not in ("plain", "plain-head"))
            assert (sink in case.ids) == (case.kind not in ("plain", "plain-head"))
            for blk in layout.context_blocks:
                lengths.add(blk.num_tokens)
                ends_with_pad += case.ids[blk.end - 1] == pad
                pad_inside += pad in case.ids[blk.content_start : blk.end - 1]
            specials += any(t in case.ids for t in vocab.specials)
        for a_i, b_i in work.pairs:
            assert arrival.index(b_i) == arrival.index(a_i) + 1  # asked one right after the other
            a, b = work.cases[a_i].ids, work.cases[b_i].ids
            short, long_ = (a, b) if len(a) < len(b) else (b, a)
            j = next(j for j in range(len(short)) if short[j] != long_[j])
            assert long_[:j] + long_[j + 1:] == short and long_[j] == pad and long_[j + 1] == sink
            assert parse_block_prompt(short, vocab.settings).final.num_tokens > PAGE
    assert kinds == {"block", "prefix-only", "plain", "sibling", "grown", "plain-head", "pad-pair"}
    assert set(REAL_LENGTHS) <= lengths, sorted(lengths)
    assert ends_with_pad and specials and pad_inside


def test_random_workloads_equal_reference(tiny_qwen3):
    """Default size: one seed, ~30 requests, chunks of 64 tokens, the KV cache of the largest request
    plus a page."""
    check_equivalence(tiny_qwen3, _seeds([0]), workload=dict(num_docs=8, num_prompts=16, num_pairs=3, max_batch=4),
                      max_num_seqs=4, enable_chunked_prefill=True, max_num_batched_tokens=64,
                      scheduler_reserve_full_isl=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_random_workloads_equal_reference_slow(arch, request):
    """Several seeds on one engine per model (the block cache carries over from seed to seed)."""
    check_equivalence(request.getfixturevalue(f"tiny_{arch}"), _seeds([1, 2, 3, 4] if arch == "qwen3" else [5, 6, 7]),
                      workload=dict(num_docs=14, num_prompts=32, num_pairs=5, max_batch=6, max_docs=4),
                      spare_pages=3, max_num_seqs=5, enable_chunked_prefill=True,
                      max_num_batched_tokens=48 if arch == "llama" else 80, scheduler_reserve_full_isl=False)


@pytest.mark.slow
def test_random_workloads_equal_reference_sink_free(tiny_sinkfree):
    """The same workloads on a checkpoint trained without sinks: one boundary token per block, dropped
    before the model runs; pads, reordering, eviction and preemption as above."""
    check_equivalence(tiny_sinkfree, _seeds([8, 9]), workload=dict(num_docs=10, num_prompts=20, num_pairs=3, max_batch=4),
                      max_num_seqs=4, enable_chunked_prefill=True, max_num_batched_tokens=64,
                      scheduler_reserve_full_isl=False)
