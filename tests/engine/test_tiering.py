"""KV tiers in the engine: a prompt's prefix from the disk or Redis tier gives the tokens of computing it all,
for fp32, bf16 and the quantized pools, with the prefix partly in the pool, partly in a tier and partly new;
and every fault (store down, killed, slow, full, corrupt) is served by computing, with the same tokens."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from kvcache.model.loader import load_model
from kvcache.tiers import DiskStore, KVTiers, RedisStore
from kvcache.tiers.chunk import encode

CHUNK, BLOCK = 64, 16
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
PROMPT = torch.randint(5, 4000, (300,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def models():
    fp32 = load_model(None)
    return {"fp32": fp32, "bf16": load_model(None).to(torch.bfloat16)}


def engine(model, store=None, spec=None, **kw):
    tiers = KVTiers([store], chunk_tokens=CHUNK) if store is not None else None
    return LLM(model, kv_memory="32MiB", block_size=BLOCK, kv_cache=spec, kv_tiers=tiers, **kw)


def tokens(llm, prompt):
    return llm.generate([prompt], GREEDY)[0].outputs[0].token_ids


def disk(tmp_path):
    return DiskStore(tmp_path / "kv", 1 << 30)


def stats(llm, name):
    llm.kv_tiers.flush()
    return llm.stats()["kv_tiers"]["stores"][name]


@pytest.mark.parametrize("dtype, spec", [("fp32", None), ("bf16", None), ("fp32", "int8"), ("fp32", "int4"),
                                         ("bf16", "int8")])
@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_pool_tier_and_new_tokens_together_equal_computing_it_all(models, tmp_path, request, dtype, spec, tier):
    model = models[dtype]
    make = (lambda: disk(tmp_path)) if tier == "disk" else (
        lambda: RedisStore(request.getfixturevalue("redis_server").url))
    writer = engine(model, make(), spec)
    assert tokens(writer, PROMPT) == tokens(engine(model, spec=spec), PROMPT)
    assert stats(writer, tier)["saves"] == len(PROMPT) // CHUNK
    writer.close()

    prompt = PROMPT + [11, 12, 13]
    expected = tokens(engine(model, spec=spec), prompt)
    reader = engine(model, make(), spec)
    tokens(reader, PROMPT[:100])  # the pool holds the first 96 tokens (6 blocks; chunk 0 came from the tier)
    before = reader.stats()
    assert before["tier_loaded_tokens"] == CHUNK
    assert tokens(reader, prompt) == expected
    after = reader.stats()
    assert after["tier_loaded_tokens"] - CHUNK == 256 - 96  # chunk 1 from its middle on, chunks 2 and 3
    assert after["prefill_tokens_computed"] - before["prefill_tokens_computed"] == len(prompt) - 256
    assert stats(reader, tier)["hit_tokens"] == 256 - 96 + CHUNK and stats(reader, tier)["verify_failures"] == 0
    reader.close()


def test_salt_and_model_separate_what_is_stored(models, tmp_path):
    writer = engine(models["fp32"], disk(tmp_path))
    writer.generate([PROMPT], GREEDY)
    writer.close()
    salted = engine(models["fp32"], disk(tmp_path))
    salted.add_request(PROMPT, GREEDY, cache_salt="tenant-b")
    while salted.has_unfinished():
        salted.step()
    assert salted.stats()["tier_loaded_tokens"] == 0
    other = engine(models["bf16"], disk(tmp_path))  # another model identity: nothing loads
    tokens(other, PROMPT)
    assert other.stats()["tier_loaded_tokens"] == 0


def test_chunks_must_be_whole_blocks(models, tmp_path):
    with pytest.raises(ValueError, match="chunk size 40 tokens is not a multiple of the engine's block_size 16"):
        LLM(models["fp32"], kv_memory="8MiB", block_size=16, kv_tiers=KVTiers([disk(tmp_path)], chunk_tokens=40))


def test_a_restart_reads_the_disk_tier_in_another_process(models, tmp_path):
    script = ("from kvcache.engine.llm import LLM\nfrom kvcache.engine.sequence import SamplingParams\n"
              "from kvcache.tiers import DiskStore, KVTiers\n"
              f"llm = LLM(None, kv_memory='32MiB', block_size={BLOCK}, "
              f"kv_tiers=KVTiers([DiskStore({str(tmp_path / 'kv')!r}, 1 << 30)], chunk_tokens={CHUNK}))\n"
              f"llm.generate([{PROMPT!r}], SamplingParams(max_new_tokens=1))\nllm.close()\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    reader = engine(models["fp32"], disk(tmp_path))
    assert tokens(reader, PROMPT + [9]) == tokens(engine(models["fp32"]), PROMPT + [9])
    assert reader.stats()["tier_loaded_tokens"] == 256


def damaged(data: bytes) -> dict[str, bytes]:
    """Ways a stored chunk can be wrong; each must read as a miss."""
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    return {"flip": bytes(flipped), "truncate": data[: len(data) // 2], "garbage": b"garbage"}


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "wrong tokens"])
def test_a_corrupt_chunk_is_a_counted_miss_and_deleted(models, redis_server, damage):
    writer = engine(models["fp32"], RedisStore(redis_server.url))
    expected = tokens(writer, PROMPT)
    writer.close()
    client = redis_server.client()
    keys = sorted(client.keys("kvcache:*"))
    assert len(keys) == 4
    reader = engine(models["fp32"], RedisStore(redis_server.url))
    chain = reader.kv_tiers.keys(PROMPT, None)
    victim = b"kvcache:" + chain[1]
    data = client.get(victim)
    if damage == "wrong tokens":  # well formed, checksum right, but another prefix's tokens
        bad = encode(chain[1], reader.kv_tiers._meta, [1] * CHUNK, {"k": torch.zeros(1)})
    else:
        bad = damaged(data)[damage]
    client.set(victim, bad)
    assert tokens(reader, PROMPT) == expected
    s = stats(reader, "redis")
    assert s["verify_failures"] == 1 and reader.stats()["tier_loaded_tokens"] == CHUNK  # chunk 0 only
    assert client.get(victim) != bad  # deleted, then written again from the recomputed KV
    reader.close()


def test_store_down_at_start_killed_and_back(models, redis_server, tmp_path):
    expected = tokens(engine(models["fp32"]), PROMPT)
    url = redis_server.url
    redis_server.stop()
    llm = engine(models["fp32"], RedisStore(url, timeout=0.5))
    start = time.monotonic()
    assert tokens(llm, PROMPT) == expected
    assert time.monotonic() - start < 10
    assert stats(llm, "redis")["errors"] >= 1
    redis_server.start()  # back on the same port: after the back-off the tier is used again
    llm.kv_tiers.stores[0]._down_until = 0.0  # skip the back-off's wait
    assert tokens(llm, PROMPT[:200] + PROMPT) == tokens(engine(models["fp32"]), PROMPT[:200] + PROMPT)
    llm.kv_tiers.flush()
    assert stats(llm, "redis")["saves"] >= 3
    redis_server.stop()  # killed mid-run: the next request computes
    llm.block_manager.reset_prefix_cache()
    assert tokens(llm, PROMPT) == expected
    llm.close()


def test_a_slow_store_times_out_and_requests_complete(models, redis_server):
    writer = engine(models["fp32"], RedisStore(redis_server.url))
    expected = tokens(writer, PROMPT)
    writer.close()
    llm = engine(models["fp32"], RedisStore(redis_server.url, timeout=0.3))
    sleeper = threading.Thread(target=lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "3"))
    sleeper.start()
    time.sleep(0.1)
    start = time.monotonic()
    assert tokens(llm, PROMPT) == expected
    assert time.monotonic() - start < 2.5  # never waits for the 3 s the server sleeps
    sleeper.join()
    assert stats(llm, "redis")["errors"] >= 1
    llm.close()


def test_a_full_store_refuses_writes_and_requests_complete(models, tmp_path):
    from redis_server import RedisServer, require_redis_server

    require_redis_server()
    server = RedisServer(tmp_path, None, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction").start()
    try:
        llm = engine(models["fp32"], RedisStore(server.url))
        long = PROMPT + PROMPT[:150]
        assert tokens(llm, long) == tokens(engine(models["fp32"]), long)
        llm.kv_tiers.flush()
        s = stats(llm, "redis")
        assert s["errors"] >= 1 and s["saves"] < len(long) // CHUNK
        llm.close()
    finally:
        server.stop()


def test_two_processes_share_kv_through_redis(models, redis_server):
    prompt = torch.randint(5, 4000, (450,), generator=torch.Generator().manual_seed(3)).tolist()
    script = ("from kvcache.engine.llm import LLM\nfrom kvcache.engine.sequence import SamplingParams\n"
              "from kvcache.tiers import KVTiers, RedisStore\n"
              f"llm = LLM(None, kv_memory='32MiB', block_size={BLOCK}, "
              f"kv_tiers=KVTiers([RedisStore({redis_server.url!r})], chunk_tokens={CHUNK}))\n"
              f"llm.generate([{prompt!r}], SamplingParams(max_new_tokens=1))\nllm.close()\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)  # engine A, another process
    suffix = prompt + [21, 22, 23, 24, 25]
    b = engine(models["fp32"], RedisStore(redis_server.url))
    assert tokens(b, suffix) == tokens(engine(models["fp32"]), suffix)
    s = b.stats()
    assert s["tier_loaded_tokens"] == 448 and s["prefill_tokens_computed"] == len(suffix) - 448
    assert stats(b, "redis")["hit_chunks"] == 7
    b.close()
