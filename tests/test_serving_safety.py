"""The serving path's trust boundary, cache-key soundness, start-up refusals, runner choice and the
vLLM version contract (in-process engine on the tiny Qwen3; configuration-only checks build no engine).

Each of these failed on 93e1f1f: a forged ``_blockattn_layout`` reached the worker, a document ending in
the pad id shared KV with the same document one token shorter, unsupported models ran, the V2 runner
was chosen on Triton machines, and nothing checked vLLM's private names."""

import gc
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_blockattn import BlockSettings, build_block_prompt
from vllm_blockattn.core.reference import full_forward

from tests._reference import assert_matches, block_reference

vllm = pytest.importorskip("vllm")

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_qwen3), BlockSettings.from_pretrained(tiny_qwen3)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    from vllm import LLM

    engine = LLM(model=tiny_qwen3, attention_backend="blockattn", dtype="float32", enforce_eager=True,
                 max_model_len=1024, num_gpu_blocks_override=128, seed=0)
    yield engine
    del engine
    gc.collect()


def greedy(**extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True, **extra)


def run(llm, ids, **extra):
    return llm.generate([{"prompt_token_ids": ids}], greedy(**extra), use_tqdm=False)[0]


def reference(hf, ids):
    model, _, settings = hf
    return block_reference(model, settings, ids, MAX_TOKENS)


check = assert_matches


def plain_reference(hf, ids):
    model = hf[0]
    cur, out = list(ids), []
    for _ in range(MAX_TOKENS):
        out.append(int(full_forward(model, cur)[-1].argmax()))
        cur.append(out[-1])
    return out


def pad_id(hf):
    return hf[1].pad_token_id


def words(hf, n, seed):
    """``n`` token ids of ordinary text (no special tokens), deterministic per seed."""
    tok = hf[1]
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special]
    return [vocab[int(i)] for i in torch.randint(len(vocab), (n,), generator=g)]


# -- 1. the internal channel is unreachable -------------------------------------------------------

FORGED = [[5], {"a": 1}, [1, 0, 10, 0, 5, 10, 0], [2, 40, 3, 0, 32, 32, 0, 32, 64, 64, 3]]


@pytest.mark.parametrize("value", FORGED)
def test_forged_layout_key_is_rejected_and_engine_keeps_serving(llm, hf, value):
    ids = hf[1].encode("Alice moved to Paris in 2019. Question: Where does Alice live? Answer:")
    with pytest.raises(ValueError, match="reserved"):
        run(llm, ids, extra_args={"_blockattn_layout": value})
    with pytest.raises(ValueError, match="reserved"):
        run(llm, ids, extra_args={"_blockattn_anything": 1, "ok": 2})
    assert list(run(llm, ids).outputs[0].token_ids) == plain_reference(hf, ids)


def test_forged_key_past_the_frontend_is_ignored(llm, hf, monkeypatch):
    """Even if a request reached the engine with the old internal key (the frontend check bypassed),
    the worker never reads layouts from requests: the ordinary prompt stays ordinary, the block prompt
    keeps its own layout."""
    import vllm_blockattn.plugin as plugin

    monkeypatch.setattr(plugin, "_check_params", lambda params, resumable: None)
    _, tok, settings = hf
    plain = tok.encode("Bob collects stamps from 42 countries. Question: What does Bob collect? Answer:")
    forged = [1, 0, len(plain) - 2, 0, 2, 32, 0]
    out = run(llm, plain, extra_args={"_blockattn_layout": forged})
    assert list(out.outputs[0].token_ids) == plain_reference(hf, plain)
    ids = build_block_prompt([words(hf, 40, 1), words(hf, 12, 2)], settings)
    check(run(llm, ids, extra_args={"_blockattn_layout": forged}), reference(hf, ids))


# -- 2. cache keys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("doc_len, shared", [(26, 0), (27, 0), (59, 32)])
def test_document_ending_in_pad_id_never_shares_kv(llm, hf, doc_len, shared):
    """A = [S x4] doc [S x4] question(40); B = the same with the pad id appended to the document. Padded
    to a page both documents have identical ids; B must not reuse A's padded page or final pages. With
    27 words B's block fills its page exactly (no pads, no length in its key); with 59 both share a
    full first page, which B does reuse."""
    settings = hf[2]
    llm.reset_prefix_cache()
    doc, question = words(hf, doc_len, 3), words(hf, 40, 4)
    a = build_block_prompt([doc, question], settings)
    b = build_block_prompt([doc + [pad_id(hf)], question], settings)
    ref_a, ref_b = reference(hf, a), reference(hf, b)
    assert ref_a[0] != ref_b[0] or max(abs(x - y) for x, y in zip(ref_a[1], ref_b[1])) > 1e-3
    check(run(llm, a), ref_a)
    out_b = run(llm, b)
    assert out_b.num_cached_tokens == shared
    check(out_b, ref_b)
    # And each still hits its own pages.
    again = run(llm, a)
    assert again.num_cached_tokens > 0
    check(again, ref_a)


def test_blocks_sharing_a_full_page_share_only_that_page(llm, hf):
    """Two documents equal up to the end of their first page and different after it: the second reuses
    that page (its KV depends only on the block's tokens up to the page's end) and nothing else."""
    settings = hf[2]
    llm.reset_prefix_cache()
    common, question = words(hf, 32 - settings.num_sinks, 20), words(hf, 12, 21)
    a = build_block_prompt([common + words(hf, 10, 22), question], settings)
    b = build_block_prompt([common + words(hf, 40, 23), question], settings)
    check(run(llm, a), reference(hf, a))
    out_b = run(llm, b)
    assert out_b.num_cached_tokens == 32
    check(out_b, reference(hf, b))


def test_final_block_pages_depend_on_the_final_offset(llm, hf):
    """Same documents and final block, but one document is longer: the final block sits at another
    logical offset, so its pages must not be shared, even once every context page is cached (context
    pages of the common document, and the longer one's full first page, still are)."""
    settings = hf[2]
    llm.reset_prefix_cache()
    d1, d2, question = words(hf, 20, 5), words(hf, 30, 6), words(hf, 70, 7)
    d2_longer = d2 + words(hf, 1, 8)
    a = build_block_prompt([d1, d2, question], settings)
    b = build_block_prompt([d1, d2_longer, question], settings)
    check(run(llm, a), reference(hf, a))
    # d1 whole and d2's full first page (sinks and 28 words: d2_longer starts with the same page), in
    # real prompt tokens (d1's page's pads are not counted); the lookup stops at d2_longer's last page.
    warm = build_block_prompt([d1, d2_longer, words(hf, 70, 9)], settings)
    assert run(llm, warm).num_cached_tokens == settings.num_sinks + len(d1) + 32
    # Every context page of b is cached now; a's final pages hold b's question but must not match.
    out_b = run(llm, b)
    assert out_b.num_cached_tokens == 2 * settings.num_sinks + len(d1) + len(d2_longer)
    check(out_b, reference(hf, b))
    assert run(llm, b).num_cached_tokens > out_b.num_cached_tokens  # b's own final pages do


# -- per-request failures stay with their request -----------------------------------------------------

def test_a_failing_request_fails_alone(llm, hf, monkeypatch):
    from vllm_blockattn.engine.scheduler import BlockAttnSchedulerMixin

    settings = hf[2]
    bad = build_block_prompt([words(hf, 33, 9), words(hf, 10, 10)], settings)
    good = build_block_prompt([words(hf, 20, 11), words(hf, 10, 12)], settings)
    original = BlockAttnSchedulerMixin._prepare_block_request

    def flaky(self, request):
        if list(request.prompt_token_ids) == bad:
            raise RuntimeError("injected failure")
        return original(self, request)

    monkeypatch.setattr(BlockAttnSchedulerMixin, "_prepare_block_request", flaky)
    outs = llm.generate([{"prompt_token_ids": p} for p in (good, bad, good)], greedy(), use_tqdm=False)
    assert outs[1].outputs[0].finish_reason == "error" and not outs[1].outputs[0].token_ids
    check(outs[0], reference(hf, good))
    check(outs[2], reference(hf, good))
    monkeypatch.undo()
    check(run(llm, bad), reference(hf, bad))


def test_streaming_input_and_multimodal_block_prompts_are_refused(llm, hf):
    from vllm_blockattn.plugin import _check_params, _check_request

    with pytest.raises(ValueError, match="streaming-input"):
        _check_params(greedy(), resumable=True)
    ids = build_block_prompt([words(hf, 10, 13), words(hf, 5, 14)], hf[2])
    vllm_config = llm.llm_engine.vllm_config
    request = types.SimpleNamespace(prompt_token_ids=ids, prompt_embeds=None, mm_features=[object()])
    with pytest.raises(ValueError, match="multimodal"):
        _check_request(vllm_config, request)
    plain = types.SimpleNamespace(prompt_token_ids=words(hf, 10, 15), prompt_embeds=None, mm_features=[object()])
    _check_request(vllm_config, plain)  # multimodal ordinary prompts run stock


def test_malformed_prompt_still_fails_alone(llm, hf):
    s = hf[2].sink_token_id
    with pytest.raises(ValueError, match="sink run of length 3"):
        run(llm, [5, 6] + [s] * 3 + [7, 8])
    ids = build_block_prompt([words(hf, 10, 16), words(hf, 5, 17)], hf[2])
    check(run(llm, ids), reference(hf, ids))


# -- 3. refusal at start-up (configuration only) ------------------------------------------------------

def make_config(path, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=path, attention_backend="blockattn", dtype="float32", enforce_eager=True, max_model_len=512)
    args.update(kwargs)
    return EngineArgs(**args).create_engine_config()


def variant(tmp_path, base, name, **config_updates):
    """A copy of the tiny checkpoint with ``config.json`` entries changed."""
    import json
    import shutil

    dst = tmp_path / name
    shutil.copytree(base, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_updates)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_supported_model_configures(tiny_qwen3):
    from vllm_blockattn.engine.support import unsupported_features

    config = make_config(tiny_qwen3)
    assert unsupported_features(config) == []
    assert config.scheduler_config.scheduler_cls.startswith("vllm_blockattn.")
    assert config.parallel_config.worker_cls.startswith("vllm_blockattn.")


@pytest.mark.parametrize("updates, message", [
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0,
      "layer_types": ["sliding_attention", "sliding_attention"]}, "sliding-window"),
    ({"attn_logit_softcapping": 50.0}, "soft-capping"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                          "rope_theta": 10000.0}}, "yarn"),
    ({"alibi": True}, "ALiBi"),
])
def test_unsupported_models_are_refused_at_start_up(tiny_qwen3, tmp_path, updates, message):
    path = variant(tmp_path, tiny_qwen3, "variant", **updates)
    with pytest.raises(Exception, match=message):
        make_config(path)
    make_config(path, attention_backend=None)  # vLLM itself takes it: only our backend refuses


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_cache_dtype="fp8"), "KV cache dtype"),
    (dict(pipeline_parallel_size=2), "pipeline parallelism"),
    (dict(scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler", async_scheduling=True), None),
])
def test_unsupported_settings_are_refused_at_start_up(tiny_qwen3, kwargs, message):
    if message is None:  # vLLM's own default scheduler named explicitly: ours replaces it
        assert make_config(tiny_qwen3, **kwargs).scheduler_config.scheduler_cls.startswith("vllm_blockattn.")
        return
    with pytest.raises(Exception, match=message):
        make_config(tiny_qwen3, **kwargs)


def test_user_named_scheduler_and_worker_classes(tiny_qwen3):
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_blockattn.engine.scheduler import BlockAttnScheduler

    class Mine(Scheduler):
        pass

    class MyBlockScheduler(BlockAttnScheduler):
        pass

    with pytest.raises(ValueError, match="user-named scheduler class"):
        make_config(tiny_qwen3, scheduler_cls=Mine)
    assert make_config(tiny_qwen3, scheduler_cls=MyBlockScheduler).scheduler_config.scheduler_cls is MyBlockScheduler
    with pytest.raises(ValueError, match="user-named worker class"):
        make_config(tiny_qwen3, worker_cls="vllm.v1.worker.worker_base.WorkerBase")


def test_feature_checks_on_exotic_models():
    """Models this CPU build cannot even load (MLA, attention sinks, M-RoPE, hybrid) are refused by the
    same function the config hook calls."""
    from vllm_blockattn.engine.support import _model_problems

    def model(arch="Qwen3ForCausalLM", **flags):
        hf = types.SimpleNamespace(rope_theta=10000.0, head_dim=32, **flags.pop("hf", {}))
        return types.SimpleNamespace(architectures=[arch], runner_type="generate", hf_text_config=hf,
                                     get_sliding_window=lambda: None, **flags)

    assert _model_problems(model()) == []
    assert any("MLA" in p for p in _model_problems(model("DeepseekV3ForCausalLM", use_mla=True)))
    assert any("sinks" in p for p in _model_problems(model("GptOssForCausalLM", hf={"model_type": "gpt_oss"})))
    assert any("M-RoPE" in p for p in _model_problems(model("Qwen2VLForConditionalGeneration", uses_mrope=True)))
    assert any("hybrid" in p for p in _model_problems(model(is_hybrid=True)))
    assert any("architecture" in p for p in _model_problems(model("BloomForCausalLM")))


# -- 4. CUDA starts with one flag: the backend selects the V1 runner ----------------------------------

def test_backend_selects_the_v1_model_runner(tiny_qwen3, monkeypatch):
    import vllm.config.vllm as vllm_config_module
    import vllm.envs as envs

    if envs._is_envs_cache_enabled():  # an engine started earlier in this process froze the environment
        envs.disable_envs_cache()
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)  # as on every CUDA machine
    assert make_config(tiny_qwen3, attention_backend=None).use_v2_model_runner is True
    assert make_config(tiny_qwen3).use_v2_model_runner is False
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER"):
        make_config(tiny_qwen3)


# -- 5. the version contract ----------------------------------------------------------------------------

def test_version_contract_holds_for_the_installed_vllm():
    from vllm_blockattn._vllm_api import incompatibilities

    assert incompatibilities(is_cpu=True) == []
    assert incompatibilities(is_cpu=False) == []


def test_version_contract_names_what_changed(tiny_qwen3, monkeypatch):
    import vllm_blockattn._vllm_api as api
    from vllm.v1.core.kv_cache_utils import hash_block_tokens as real
    from vllm.v1.request import Request

    monkeypatch.delattr(Request, "update_block_hashes")
    monkeypatch.setattr("vllm.v1.core.kv_cache_utils.hash_block_tokens",
                        lambda hash_function, parent_block_hash, curr_block_token_ids: real)
    monkeypatch.setattr(api, "_CHECKED", {})
    problems = api.incompatibilities(is_cpu=True)
    assert any("update_block_hashes" in p for p in problems)
    assert any("extra_keys" in p for p in problems)
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32"):
        make_config(tiny_qwen3)


def test_every_vllm_name_the_package_imports_is_in_the_version_contract():
    """Walk the installed package's sources: every ``from vllm... import name`` (and ``import
    vllm...``) must be checked by ``_vllm_api`` (its module path appears in a check), so an upgraded
    vLLM that drops or moves it fails at start-up with a named reason, not at the first request."""
    import ast
    import inspect
    from pathlib import Path

    import vllm_blockattn
    import vllm_blockattn._vllm_api as api

    contract = inspect.getsource(api)
    root = Path(vllm_blockattn.__file__).parent
    missing = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "vllm":
                for alias in node.names:
                    names = (f'"{node.module}:{alias.name}', f'"{node.module}.{alias.name}:', f'"{node.module}.{alias.name}"')
                    if not any(n in contract for n in names):
                        missing.append(f"{path.relative_to(root)}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    mod = alias.name
                    if mod.split(".")[0] == "vllm" and mod != "vllm" and f'"{mod}:' not in contract:
                        missing.append(f"{path.relative_to(root)}: import {mod}")
    assert not missing, "vLLM names used but not in the version contract (_vllm_api.py):\n" + "\n".join(missing)
