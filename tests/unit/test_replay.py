"""The replay buffer (pretrain/replay.py): memory and checkpoints proportional to what is
stored, the storage dtype option, the older checkpoint layout, and an exact resume of S2
training through a saved and reloaded buffer."""
from __future__ import annotations

import io

import pytest
import torch

from ebt_testlib import model_pair
from pretrain.replay import ReplayBuffer
from pretrain.thinking import ThinkingConfig, unroll

S2 = ThinkingConfig(num_steps=2, detach_between_steps=False, create_graph="last", loss_on="last",
                    step_size_jitter=2.0, langevin_std=3.0, replay_size=6, replay_fraction=0.5)


def test_memory_and_state_are_proportional_to_the_stored_rows():
    buf = ReplayBuffer(192)
    buf.add(torch.zeros(2, 65, dtype=torch.long), torch.randn(2, 64, 1000))
    row = 65 * 8 + 64 * 1000 * 4
    assert len(buf) == 2 and buf.nbytes() == 2 * row  # not 192 rows
    state = buf.state_dict()
    assert state["ids"].shape[0] == state["logits"].shape[0] == 2
    half = ReplayBuffer(192, "bfloat16")
    half.add(torch.zeros(2, 65, dtype=torch.long), torch.randn(2, 64, 1000))
    assert half.nbytes() == 2 * (65 * 8 + 64 * 1000 * 2)
    assert half.sample(1, torch.Generator().manual_seed(0))[1].dtype == torch.bfloat16


def test_rows_do_not_keep_the_batch_tensor_alive():
    buf = ReplayBuffer(4)
    batch = torch.randn(3, 4, 5)
    buf.add(torch.zeros(3, 5, dtype=torch.long), batch)
    assert all(t.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr() for t in buf._logits)


def test_older_full_capacity_layout_loads():
    old = {"capacity": 5, "size": 2, "next": 2, "ids": torch.arange(25).view(5, 5), "logits": torch.randn(5, 4, 3)}
    buf = ReplayBuffer(1)
    buf.load_state_dict(old)
    assert len(buf) == 2 and buf.capacity == 5 and buf.next == 2
    assert torch.equal(buf.state_dict()["logits"], old["logits"][:2])


def test_bad_dtype_names_the_key():
    with pytest.raises(ValueError, match=r"thinking\.replay_dtype"):
        ReplayBuffer(3, "float16")
    with pytest.raises(ValueError, match=r"thinking\.replay_dtype"):
        ThinkingConfig(replay_size=3, replay_fraction=0.5, replay_dtype="int8")


def _steps(model, buf, batches, gen):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for ids in batches:
        res = unroll(model, ids, S2, generator=gen, replay=buf, num_steps=2)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(res.loss.item())
    return losses


@pytest.mark.parametrize("dtype", (None, "bfloat16"))
def test_training_resumes_exactly_through_a_saved_buffer(dtype):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 13, (4, 7), generator=g) for _ in range(4)]
    _, straight = model_pair(seed=2, ebt_type="time_embed")
    _, resumed = model_pair(seed=2, ebt_type="time_embed")
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    want = _steps(straight, ReplayBuffer(S2.replay_size, dtype), batches, gen_a)

    buf = ReplayBuffer(S2.replay_size, dtype)
    first = _steps(resumed, buf, batches[:2], gen_b)
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    restored = ReplayBuffer(1)
    restored.load_state_dict(torch.load(blob))
    assert restored.dtype == buf.dtype and len(restored) == len(buf)
    rest = _steps(resumed, restored, batches[2:], gen_b)
    assert first + rest == want
    # Negative control: a buffer that lost its rows changes the resumed losses.
    _, control = model_pair(seed=2, ebt_type="time_embed")
    gen_c = torch.Generator().manual_seed(1)
    _steps(control, ReplayBuffer(S2.replay_size, dtype), batches[:2], gen_c)
    assert _steps(control, ReplayBuffer(S2.replay_size, dtype), batches[2:], gen_c) != rest
