"""The replay buffer (pretrain/replay.py): memory and checkpoints proportional to what is
stored, the storage dtype option, disk storage (the same bytes, outside the process memory),
the older checkpoint layout, and an exact resume of S2 training through a saved and reloaded
buffer."""
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
    assert all(t.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr() for t in buf._rows.rows)


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


@pytest.mark.parametrize("storage", ("memory", "disk"))
@pytest.mark.parametrize("dtype", (None, "bfloat16"))
def test_training_resumes_exactly_through_a_saved_buffer(dtype, storage, tmp_path):
    """Straight run = run, save, load into a fresh buffer, continue; the straight run keeps its
    rows in memory, the interrupted one in `storage`: the losses agree exactly."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 13, (4, 7), generator=g) for _ in range(4)]
    _, straight = model_pair(seed=2, ebt_type="time_embed")
    _, resumed = model_pair(seed=2, ebt_type="time_embed")
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    want = _steps(straight, ReplayBuffer(S2.replay_size, dtype), batches, gen_a)

    buf = ReplayBuffer(S2.replay_size, dtype, storage, tmp_path, "before.bin")
    first = _steps(resumed, buf, batches[:2], gen_b)
    assert buf.on_disk == (storage == "disk")
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    restored = ReplayBuffer(1, None, storage, tmp_path, "after.bin")
    restored.load_state_dict(torch.load(blob))
    assert restored.dtype == buf.dtype and len(restored) == len(buf) and restored.on_disk == buf.on_disk
    rest = _steps(resumed, restored, batches[2:], gen_b)
    assert first + rest == want
    # Negative control: a buffer that lost its rows changes the resumed losses.
    _, control = model_pair(seed=2, ebt_type="time_embed")
    gen_c = torch.Generator().manual_seed(1)
    _steps(control, ReplayBuffer(S2.replay_size, dtype), batches[:2], gen_c)
    assert _steps(control, ReplayBuffer(S2.replay_size, dtype), batches[2:], gen_c) != rest


_RSS_CHILD = """
import sys, tempfile, torch
from pretrain.replay import ReplayBuffer
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
gen = torch.Generator().manual_seed(0)
ids, logits = torch.randint(0, 9, (4, 65), generator=gen), torch.randn(4, 64, 16384, generator=gen)
with tempfile.TemporaryDirectory() as tmp:
    buf = ReplayBuffer(16, None, sys.argv[1], tmp)
    buf.add(ids[:1], logits[:1])
    before = anon()
    for _ in range(4):
        buf.add(ids, logits)
    print(anon() - before)
"""


def _grown_rss(storage: str) -> int:
    """Anonymous memory a fresh process gains storing 16 rows of 4 MB (15 after the first)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, storage], check=True, capture_output=True,
                         text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def test_disk_storage_keeps_the_rows_out_of_the_process_memory():
    """The memory buffer's rows stay in the process (the check catches them: the control),
    the disk buffer's do not (the bytes are in the page cache). With glibc's default malloc: a
    disk buffer that made a copy per row grew by the whole buffer here (freed row copies split
    by the small id rows stay resident), which this catches too."""
    rows = 15 * 64 * 16384 * 4
    memory, disk = _grown_rss("memory"), _grown_rss("disk")
    assert memory > 0.9 * rows and disk < 0.2 * rows, (memory, disk)


@pytest.mark.parametrize("dtype", (None, "bfloat16"))
def test_disk_storage_holds_the_same_bytes(dtype, tmp_path):
    """The disk buffer returns exactly the rows the memory buffer does (the ring overwrite
    included), in the storage dtype, and leaves no file behind."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (20, 9), generator=gen)
    logits = torch.randn(20, 8, 300, generator=gen)
    bufs = {}
    for storage in ("memory", "disk"):
        buf = ReplayBuffer(16, dtype, storage, tmp_path)
        for lo in range(0, 20, 4):
            buf.add(ids[lo:lo + 4], logits[lo:lo + 4])
        bufs[storage] = buf
    assert list(tmp_path.iterdir()) == []  # the file is unlinked once open
    assert bufs["disk"].nbytes() == bufs["memory"].nbytes() and bufs["disk"].size == 16
    for n in (1, 7):
        (i_m, l_m), (i_d, l_d) = (b.sample(n, torch.Generator().manual_seed(n)) for b in bufs.values())
        assert torch.equal(i_m, i_d) and l_m.dtype == l_d.dtype and torch.equal(l_m, l_d)
    assert torch.equal(bufs["memory"].state_dict()["logits"], bufs["disk"].state_dict()["logits"])
    with pytest.raises(ValueError, match="does not fit"):
        bufs["disk"].add(ids[:1], logits[:1, :, :299])


def test_auto_storage_goes_to_disk_only_for_a_large_buffer(tmp_path, monkeypatch):
    import pretrain.replay as replay

    monkeypatch.setattr(replay, "AUTO_DISK_BYTES", 10 * 4 * 100 * 4)
    small, large = ReplayBuffer(10, None, "auto", tmp_path), ReplayBuffer(11, None, "auto", tmp_path)
    no_dir = ReplayBuffer(11, None, "auto")
    for buf in (small, large, no_dir):
        buf.add(torch.zeros(1, 5, dtype=torch.long), torch.randn(1, 4, 100))
    assert (small.on_disk, large.on_disk, no_dir.on_disk) == (False, True, False)
    with pytest.raises(ValueError, match=r"thinking\.replay_storage"):
        ReplayBuffer(3, None, "tape", tmp_path)
    with pytest.raises(ValueError, match=r"thinking\.replay_storage"):
        ReplayBuffer(3, None, "disk")
    with pytest.raises(ValueError, match=r"thinking\.replay_storage"):
        ThinkingConfig(replay_size=3, replay_fraction=0.5, replay_storage="tape")
