"""Block-affinity routing (``frontend/routing.py``): the engine choice for data parallelism, without
engines (the real DP=2 server is in tests/test_distributed.py, slow)."""

import subprocess
import sys
from types import SimpleNamespace

from vllm_blockattn import BlockSettings, build_block_prompt
from vllm_blockattn.frontend.routing import BlockRouter

SETTINGS = BlockSettings(sink_token_id=99, num_sinks=2)
Q = [7, 8]


def request(blocks, salt=None, prefix=None):
    ids = build_block_prompt([*blocks, Q], SETTINGS, prefix=prefix)
    return SimpleNamespace(prompt_token_ids=ids, cache_salt=salt, lora_request=None)


def doc(i, n=20):
    return [200 + i] * n  # never the sink id (99)


def test_the_same_documents_go_to_the_same_engine_in_any_order_and_behind_any_prefix():
    router = BlockRouter(SETTINGS)
    docs = [doc(i) for i in range(3)]
    first = router.choose(router.blocks(request(docs)), loads=[0, 0, 0, 0])
    for order, prefix in [([2, 0, 1], None), ([1, 2, 0], [5, 5, 5]), ([0, 2, 1], [6])]:
        blocks = router.blocks(request([docs[j] for j in order], prefix=prefix))
        assert router.choose(blocks, loads=[0, 0, 0, 0]) == first


def test_homes_spread_over_engines_and_the_heavier_document_decides():
    router = BlockRouter(SETTINGS)
    homes = [router.home(router.blocks(request([doc(i)]))[0][0], 4) for i in range(200)]
    assert all(25 <= homes.count(e) <= 75 for e in range(4)), [homes.count(e) for e in range(4)]
    big, small = doc(1000, n=60), doc(1001, n=5)
    big_home = router.choose(router.blocks(request([big])), loads=[0, 0, 0, 0])
    assert router.choose(router.blocks(request([small, big])), loads=[0, 0, 0, 0]) == big_home


def test_load_is_weighed_against_affinity_in_tokens_of_prefill():
    router = BlockRouter(SETTINGS)
    assert router.blocks(SimpleNamespace(prompt_token_ids=[1, 2, 3], cache_salt=None, lora_request=None)) == []
    assert router.blocks(SimpleNamespace(prompt_token_ids=[99, 1], cache_salt=None, lora_request=None)) == []
    assert router.choose([], loads=[0, 0]) is None  # no blocks: vLLM's choice
    blocks = router.blocks(request([doc(1)]))  # 22 tokens; the mean prompt so far: 22
    home = router.choose(blocks, loads=[0, 0], prompt_tokens=22)
    loads = [0, 0]
    loads[home] = 1  # one request ahead costs as much as computing the block elsewhere: a tie, affinity wins
    assert router.choose(blocks, loads=loads, prompt_tokens=22) == home and router.by_affinity == 1
    loads[home] = 2  # two ahead cost more than the block: the idle engine computes it
    assert router.choose(blocks, loads=loads, prompt_tokens=22) == 1 - home


def test_tenants_hash_apart_and_homes_agree_across_processes():
    router = BlockRouter(SETTINGS)
    keys = {salt: router.blocks(request([doc(3)], salt=salt))[0][0] for salt in (None, "t1", "t2")}
    assert len(set(keys.values())) == 3
    code = ("from types import SimpleNamespace as S; from vllm_blockattn import BlockSettings, build_block_prompt;"
            "from vllm_blockattn.frontend.routing import BlockRouter;"
            "r = BlockRouter(BlockSettings(sink_token_id=99, num_sinks=2));"
            "ids = build_block_prompt([[203] * 20, [7, 8]], BlockSettings(sink_token_id=99, num_sinks=2));"
            "print(r.blocks(S(prompt_token_ids=ids, cache_salt='t1', lora_request=None))[0][0].hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.split()[-1]
    assert other == keys["t1"].hex()  # another process, another hash seed: the same key


def test_a_block_computed_away_from_home_is_found_where_it_went():
    router = BlockRouter(SETTINGS)
    docs = [doc(i) for i in range(8)]
    homes = [router.home(router.blocks(request([d]))[0][0], 2) for d in docs]
    assert len(set(homes)) == 2  # these eight documents have homes on both engines
    blocks = router.blocks(request(docs))
    first = router.choose(blocks, loads=[0, 0])
    router.record(blocks, first)
    away = next(i for i in range(8) if homes[i] != first)  # computed on `first`, away from its home
    assert router.choose(router.blocks(request([docs[away]])), loads=[0, 0]) == first
    fresh = BlockRouter(SETTINGS)  # another API server, which never saw it placed: its home
    assert fresh.choose(fresh.blocks(request([docs[away]])), loads=[0, 0]) == homes[away]
