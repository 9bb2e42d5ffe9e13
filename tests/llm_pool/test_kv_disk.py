"""Chats' KV caches on disk (llm_pool/kv_disk.py), on both engines with the real SmolLM2: a chat
reopened after its model was unloaded, or after a restart, continues from the saved KV (usage
says how many tokens came from disk) and answers as a cold prefill does; another owner's identical
prefix restores nothing; a corrupted file is ignored; the budget evicts the least recently used
chat; a new version of the weights never reads an old file."""

from __future__ import annotations

import pytest

from llm_pool import Catalog, EngineConfig, GenerationParams, GenerationRequest, Message, ModelPool, llamacpp_build
from llm_pool.backends import BackendContext
from llm_pool.kv_disk import KvDisk
from tests.conftest import CHAT_ENGINES, LLAMA_CHAT, MODEL_CACHE, ROOT

STORY = ("The lighthouse keeper on Skerry Island kept a log of every ship that passed. " * 30).strip()
OPENING = [Message("system", "You are a helpful assistant. Answer briefly."),
           Message("user", STORY + "\n\nWhat did the lighthouse keeper keep?")]


def _needs(model: str) -> None:
    if model == LLAMA_CHAT and llamacpp_build.find_server() is None:
        pytest.skip("llama.cpp is not built (scripts/setup.sh --dev builds it)")


def disk_pool(root, model: str, budget: int = 2**30) -> tuple[ModelPool, KvDisk]:
    """A pool of its own whose KV files live in `root` (reopening `root` is what a restart does)."""
    disk = KvDisk(root, budget, min_tokens=64)
    context = BackendContext(cache_dir=MODEL_CACHE, device="cpu", engine=EngineConfig(max_batch_size=4),
                             kv_disk=disk)
    pool = ModelPool(Catalog.from_toml(ROOT / "models.toml"), context, 8 * 2**30)
    pool.load(model)
    return pool, disk


def ask(pool, model, messages, scope="user:ann", chat="chat-1", max_new_tokens=12):
    request = GenerationRequest(GenerationParams.validated(temperature=0, max_new_tokens=max_new_tokens),
                                messages=list(messages), cache_scope=scope, cache_key=chat)
    return pool.submit(model, request).result(180)


def second_turn(first_text: str) -> list[Message]:
    return [*OPENING, Message("assistant", first_text), Message("user", "And what island was it on?")]


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_chat_reopened_after_unload_and_restart_reads_only_its_new_tokens(model, tmp_path):
    _needs(model)
    pool, disk = disk_pool(tmp_path / "kv", model)
    try:
        first = ask(pool, model, OPENING)
        disk.flush()
        assert disk.stats()["files"] == 1 and first.usage.disk_tokens == 0
        turn = second_turn(first.text)
        cold = ask(pool, model, turn, scope=None, chat=None)  # nobody's cache: a full prefill
        assert cold.usage.cached_tokens == 0

        pool.unload(model)  # the in-memory cache is gone with the model
        pool.load(model)
        after_unload = ask(pool, model, turn, chat="chat-1")
        assert after_unload.usage.disk_tokens >= first.usage.prompt_tokens - 1
        assert after_unload.usage.cached_tokens >= after_unload.usage.disk_tokens
        if model != LLAMA_CHAT:  # the reproducible engine: the same greedy answer as a cold prefill
            assert after_unload.text == cold.text
        assert "island" in after_unload.text.lower() or "skerry" in after_unload.text.lower() or after_unload.text
    finally:
        pool.shutdown()
    disk.flush()
    disk.close()

    pool, disk = disk_pool(tmp_path / "kv", model)  # a restart: a new process reads the index again
    try:
        restarted = ask(pool, model, turn)
        assert restarted.usage.disk_tokens >= first.usage.prompt_tokens - 1
        if model != LLAMA_CHAT:
            assert restarted.text == cold.text
        else:
            assert restarted.text.strip()
        assert disk.stats()["restores"] == 1

        # another owner with the very same prompt and chat id restores nothing (no time saved either)
        theirs = ask(pool, model, turn, scope="user:bob")
        assert theirs.usage.disk_tokens == 0 and theirs.usage.cached_tokens == 0
    finally:
        pool.shutdown()
        disk.close()


@pytest.mark.parametrize("model", CHAT_ENGINES)
def test_a_corrupted_file_is_ignored_and_the_prompt_is_read_as_usual(model, tmp_path):
    _needs(model)
    pool, disk = disk_pool(tmp_path / "kv", model)
    try:
        first = ask(pool, model, OPENING)
        disk.flush()
        turn = second_turn(first.text)
        cold = ask(pool, model, turn, scope=None, chat=None)
        (entry,) = disk._entries.values()
        path = disk.path(entry)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the keys and values
        path.write_bytes(bytes(data))
        pool.unload(model)
        pool.load(model)
        again = ask(pool, model, turn)
        assert again.usage.disk_tokens == 0 and again.usage.cached_tokens == 0
        if model != LLAMA_CHAT:
            assert again.text == cold.text
        assert again.text.strip()
        assert disk.stats()["rejected"] == 1 and not path.exists()
    finally:
        pool.shutdown()
        disk.close()


def test_the_budget_evicts_the_least_recently_used_chat_and_new_weights_never_read_old_files(tmp_path):
    model = CHAT_ENGINES[-1]  # transformers: each file's size is known before the next is written
    pool, disk = disk_pool(tmp_path / "kv", model)
    try:
        ask(pool, model, OPENING, chat="chat-a")
        disk.flush()
        size = disk.stats()["bytes"]
        disk.budget = int(size * 2.5)  # room for two chats
        ask(pool, model, OPENING, chat="chat-b")
        disk.flush()
        # chat-a is read again: it becomes the most recently used
        pool.unload(model)
        pool.load(model)
        assert ask(pool, model, second_turn("A log of ships."), chat="chat-a").usage.disk_tokens > 0
        disk.flush()
        ask(pool, model, OPENING, chat="chat-c")
        disk.flush()
        chats = {e.chat for e in disk._entries.values()}
        assert "chat-b" not in chats and "chat-c" in chats and disk.stats()["evictions"] >= 1
        assert disk.stats()["bytes"] <= disk.budget

        assert disk.forget(chat="chat-c") >= 1  # what deleting a chat does
        assert "chat-c" not in {e.chat for e in disk._entries.values()}
    finally:
        pool.shutdown()
    files = disk.stats()["files"]
    assert files >= 1
    disk.for_model(model, "other weights")  # a new version of the weights under the same key
    assert disk.stats()["files"] == 0 and not any(p.is_file() for p in (tmp_path / "kv").glob("*/*"))
    disk.close()
