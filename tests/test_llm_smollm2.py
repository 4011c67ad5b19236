"""The real SmolLM2-135M on a 3-stage swarm: exact greedy generation, also across a kill."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import torch

from rayfin.llm import DistributedCausalLM, Swarm, launch_swarm, load_local_model
from rayfin.llm.chat import chat_input_ids
from rayfin.llm.swarm import stage_bounds

pytestmark = [pytest.mark.model, pytest.mark.integration]

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def local():
    model, tokenizer = load_local_model(MODEL)
    return model, tokenizer


@pytest.fixture(scope="module")
def swarm(ray_local: None) -> Iterator[Swarm]:
    swarm = launch_swarm(MODEL, name="smol", num_stages=3, num_cpus=0.25)
    # A second server for the middle stage, to take over when the first is killed.
    start, end = stage_bounds(swarm.spec.num_blocks, 3)[1]
    swarm.add_server(start, end, server_id="smol-s1-spare", num_cpus=0.25)
    yield swarm
    swarm.shutdown()


def test_greedy_32_tokens_equal_local_generate(swarm: Swarm, local) -> None:
    model, tokenizer = local
    client = DistributedCausalLM.from_pretrained(MODEL, swarm=swarm)
    ids = chat_input_ids(tokenizer, "What is the capital of France?")
    expected = model.generate(ids, max_new_tokens=32, do_sample=False)
    got = client.generate(ids, max_new_tokens=32)
    assert torch.equal(got, expected)
    assert "Paris" in tokenizer.decode(got[0, ids.shape[1] :])
    with torch.no_grad():
        torch.testing.assert_close(client(ids).logits, model(ids).logits, atol=1e-3, rtol=0)


def test_killing_a_server_mid_generation_keeps_the_tokens(swarm: Swarm, local) -> None:
    model, tokenizer = local
    client = DistributedCausalLM.from_pretrained(MODEL, swarm=swarm)
    ids = chat_input_ids(tokenizer, "Name three primary colours.")
    # The chat template contains <|im_end|>, which is also the pad token: without an explicit
    # mask, transformers would mask those prompt tokens out once EOS is switched off.
    expected = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
    )
    with client.inference_session(ids.shape[1] + 32) as session:
        first = client.generate(ids, max_new_tokens=16, eos_token_id=[], session=session)
        victim = session.blocks.chain[1].server_id
        ray.kill(next(r.handle for r in swarm.servers() if r.server_id == victim))
        rest = client.generate(None, max_new_tokens=16, eos_token_id=[], session=session)
        assert session.blocks.recoveries == 1
        assert session.blocks.chain[1].server_id != victim
    assert torch.equal(torch.cat([first, rest], dim=1), expected)
