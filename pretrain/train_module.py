"""What one model family does in a training step: one train module per family.

The trainer loop (pretrain.trainer) owns the optimizer-step cadence and nothing
model-specific; a train module owns, for its model family:
  * `train_step(batch, step)`: every micro-batch of one optimizer step on this rank's rows,
    their backwards and the one gradient synchronisation (through the ParallelModel);
  * `evaluate(batches)`: validation metrics;
  * `probe_values()`: the fixed probe batch by which checkpoints prove their weights;
  * the state it carries across steps (the EBT's replay buffer) for checkpoints;
and every cross-entropy it computes goes through the model's vocabulary ops, so tensor
parallelism (V sharded over tp) works for evaluation and the probe as for training.

Layout-invariant randomness (EBT): the draws of optimizer step t are keyed by
`StepKey(train.seed, t)` and the row's global sample id, never by rank (pretrain.thinking):
  * fresh row i of the global batch (its position; the rank holds rows
    data_pipeline.order.rank_slice of them) has sample id i;
  * the number of thinking steps is one draw per optimizer step;
  * replay (S2): the buffer holds the final candidates of every row of earlier global
    batches, replicated on every dp rank (an all-gather over dp per step); each step draws
    R = round(replay_fraction x global batch) buffer rows with the step key, gives replay
    row j the sample id global_batch + j, and deals them out over dp ranks like the fresh
    rows. Under tp each rank keeps its vocabulary slice of the buffer; checkpoints hold
    the full vocabulary.
So a dp=2 (or ZeRO) run draws exactly what one process draws, and a run resumed under any
layout continues the same trajectory. Rows are independent in the loss, and each
micro-batch's loss is weighted by its share of the global rows, so the gradient is the
global mean whatever the split.

Pipeline parallelism (parallel.pp > 1): the step runs through parallel.pipeline
(`EBTPipeline`, `TransformerPipeline`) in `parallel.pp_microbatches` micro-batches instead of
`unroll`. Stage 0 holds the candidate, so the draws, the replay buffer and the loss live
there; every stage receives the same logged statistics. The micro-batches are built from the
same keyed draws, so a pp run draws what one process draws. Evaluation and the checkpoint
probe need the whole model at once: they run on a full-depth copy assembled from the stages
(`parallel.pipeline.gather_stage_states`), rebuilt at each evaluation and freed after it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from data_pipeline.order import rank_slice

from . import flops as flops_mod
from . import probe as probe_mod
from .compiled import CompiledEnergyGrad
from .compiled import resolve as resolve_compile
from .config import RunConfig
from .thinking import STREAM_REPLAY, KeyedDraws, ReplayBuffer, StepKey, think, unroll

EVAL_SEED_OFFSET = 7919


@dataclass
class LocalBatch:
    """This rank's rows of one optimizer step's global batch."""

    ids: torch.Tensor
    """(rows, S+1) token ids."""
    first_row: int
    """Global position of the first row (rows are contiguous: data_pipeline.order.rank_slice)."""
    global_rows: int
    """Rows in the global batch."""


@dataclass
class StepStats:
    """What one optimizer step's micro-batches produced on this rank (tensors; no host sync)."""

    loss: torch.Tensor
    loss_first: torch.Tensor
    loss_last: torch.Tensor
    energy_first: Optional[torch.Tensor]
    energy_last: Optional[torch.Tensor]
    nonfinite_grad_input: torch.Tensor
    """NaN/Inf in dE/dy (EBT)."""
    flops: float
    """FLOPs this rank computed (its rows, its 1/tp of the model)."""
    compile_seconds: float = 0.0
    """Seconds of torch.compile cold compiles in this step (`train.compile`)."""


def _split(n: int, parts: int) -> List[slice]:
    """Contiguous near-equal pieces of range(n) (torch.tensor_split's rule)."""
    base, rem = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < rem else 0)
        out.append(slice(start, end))
        start = end
    return [s for s in out if s.stop > s.start]


class TrainModule:
    """Shared plumbing: the parallel model, the config, the dp/tp layout."""

    def __init__(self, pm, cfg: RunConfig, device: torch.device) -> None:
        self.pm, self.cfg, self.device = pm, cfg, device
        self.model = pm.module
        self.dims = pm.dims

    @property
    def vocab_ops(self):
        return self.model.vocab_ops

    def autocast(self, dtype: torch.dtype):
        import contextlib

        if dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def eval_model(self):
        """The model evaluation and the probe run: this rank's model, or under pipeline
        parallelism a full-depth copy assembled from every stage (collective over pp; tp
        stays sharded as in training)."""
        if self.dims.pp == 1:
            return self.model
        from parallel.pipeline import gather_stage_states
        from parallel.tensor import tensor_parallelize

        from .model import build_model

        state = gather_stage_states(self.model, self.dims)
        with torch.random.fork_rng(devices=[]):  # building draws init weights: keep no trace
            copy = build_model(self.cfg.model).to(self.device)
        tensor_parallelize(copy, self.dims)
        copy.load_state_dict(state, strict=True)
        return copy

    def probe_values(self, ids: Optional[torch.Tensor] = None) -> List[List[float]]:
        """Energies (EBT) or target log-probabilities (Transformer++) on the fixed probe batch
        (collective under tp and pp)."""
        if ids is None:
            ids = probe_mod.probe_ids(self.cfg.model.vocab_size, self.cfg.data.seq_len)
        return probe_mod.probe_values(self.eval_model(), ids)

    def _split_rows(self, rows: int) -> List[slice]:
        """This rank's micro-batches: train.grad_accum pieces, or parallel.pp_microbatches
        under pipeline parallelism (config validation keeps grad_accum at 1 there)."""
        return _split(rows, self.cfg.parallel.pp_microbatches if self.dims.pp > 1 else self.cfg.train.grad_accum)

    def commit(self, stepped: bool) -> None:
        """Called once per optimizer step after the non-finite decision."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def _flops_share(self, flops: float) -> float:
        return flops / (self.dims.tp * self.dims.pp)


class EBTTrainModule(TrainModule):
    """The EBT: the thinking unroll of pretrain.thinking with keyed randomness and replay."""

    def __init__(self, pm, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(pm, cfg, device)
        self.dtype = dtype
        th = cfg.thinking
        # Each process keeps its own copy (its vocabulary slice under tp): one file per rank.
        # Under pipeline parallelism only stage 0 holds candidates, hence the replay buffer.
        keeps_candidates = self.dims.pp == 1 or self.dims.is_first_stage
        self.replay = ReplayBuffer(th.replay_size, th.replay_dtype, th.replay_storage, Path(cfg.run_dir),
                                   f"replay-rank{self.dims.rank}.bin") if th.replay_size > 0 and keeps_candidates else None
        self._pending: Optional[tuple] = None
        self._compile_seen = 0.0
        self.compiled = CompiledEnergyGrad(self.model) if resolve_compile(cfg.train.compile, device) else None
        self.pipeline = None
        if self.dims.pp > 1:
            from parallel.pipeline import EBTPipeline

            self.pipeline = EBTPipeline(self.model, self.dims, th, cfg.parallel.pp_microbatches,
                                        backprop=pm.pipeline_backprop, schedule=cfg.parallel.pp_schedule)

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, batch: LocalBatch, step: int) -> StepStats:
        cfg, th, model = self.cfg, self.cfg.thinking, self.model
        vocab_ops = model.vocab_ops
        key = StepKey(cfg.train.seed, step)
        k_steps = key.num_steps(th)
        ids = batch.ids
        rows, seq = ids.shape[0], ids.shape[1] - 1
        wdtype = next(model.parameters()).dtype
        sample_ids = list(range(batch.first_row, batch.first_row + rows))
        if self.pipeline is not None and not self.dims.is_first_stage:
            return self._pipeline_step(None, None, None, key, k_steps, rows, seq, batch.global_rows)
        y0 = vocab_ops.shard(KeyedDraws(key, sample_ids).initial((rows, seq, model.vocab_size), th, self.device, wdtype))
        total_rows = batch.global_rows
        if self.replay is not None and th.replay_fraction > 0 and len(self.replay) > 0:
            n_replay = int(round(th.replay_fraction * batch.global_rows))
            if n_replay > 0:
                r_ids, r_logits = self.replay.sample(n_replay, key.generator(STREAM_REPLAY))
                mine = rank_slice_uneven(n_replay, self.dims.dp_rank, self.dims.dp)
                ids = torch.cat([ids, r_ids[mine].to(self.device)])
                y0 = torch.cat([y0, r_logits[mine].to(self.device, wdtype)])
                sample_ids += [batch.global_rows + j for j in range(mine.start, mine.stop)]
                total_rows += n_replay
        if self.pipeline is not None:
            return self._pipeline_step(ids, y0, sample_ids, key, k_steps, rows, seq, total_rows)
        parts = self._split_rows(ids.shape[0])
        results, flops = [], 0.0
        for i, part in enumerate(parts):
            n = part.stop - part.start
            with self.autocast(self.dtype):
                r = unroll(
                    model, ids[part], th, draws=KeyedDraws(key, sample_ids[part]), num_steps=k_steps,
                    initial_logits=y0[part], loss_scale=n * self.dims.dp / total_rows,
                    backward_fn=self.pm.backward_fn(sync=i == len(parts) - 1), compiled=self.compiled,
                )
            results.append((n, r))
            flops += flops_mod.ebt_step_flops(model.cfg, seq, r.num_rows, r.num_steps, th)
        compile_seconds = 0.0
        if self.compiled is not None:
            compile_seconds, self._compile_seen = self.compiled.cold_seconds - self._compile_seen, self.compiled.cold_seconds
        if self.replay is not None:
            fresh = torch.cat([r.final_logits for _, r in results])[:rows]
            self._pending = (batch.ids, fresh)

        def mean(values: Iterable[torch.Tensor]) -> torch.Tensor:
            # Row-weighted: micro-batches of unequal size count by their rows.
            got = [(n, v) for n, v in zip((n for n, _ in results), values)]
            return sum(n * v.detach() for n, v in got) / sum(n for n, _ in got)

        return StepStats(
            loss=mean(r.loss for _, r in results),
            loss_first=mean(r.step_losses[0] for _, r in results),
            loss_last=mean(r.step_losses[-1] for _, r in results),
            energy_first=mean(r.step_energies[0] for _, r in results),
            energy_last=mean(r.step_energies[-1] for _, r in results),
            nonfinite_grad_input=torch.stack([r.nonfinite for _, r in results]).any(),
            flops=self._flops_share(flops),
            compile_seconds=compile_seconds,
        )

    def _pipeline_step(self, ids, y0, sample_ids, key: StepKey, k_steps: int, rows: int, seq: int,
                       total_rows: int) -> StepStats:
        """One optimizer step through the pipeline. Stage 0 passes its rows (replay included),
        their initial candidates and sample ids; the other stages pass None and learn the
        micro-batch shapes and step count from stage 0's plan."""
        from .pipeline_draws import draw_microbatch

        th, model = self.cfg.thinking, self.model
        micro_batches, scales, sizes = None, None, None
        if ids is not None:
            parts = self._split_rows(ids.shape[0])
            micro_batches = [
                draw_microbatch(model, ids[p], th, draws=KeyedDraws(key, sample_ids[p]), num_steps=k_steps,
                                initial_logits=y0[p], fresh_rows=max(0, min(p.stop, rows) - p.start))
                for p in parts
            ]
            sizes = [p.stop - p.start for p in parts]
            scales = [n * self.dims.dp / total_rows for n in sizes]
        result = self.pipeline.run(micro_batches, loss_scale=scales)
        self.pm.sync_gradients()
        if ids is not None and self.replay is not None:
            self._pending = (ids[:rows], torch.cat(result.final_logits)[:rows].detach())
        # Row weights of the micro-batches: every stage needs them for the logged means, and
        # only stage 0 knows the replay rows; the stages' statistics agree after the pipeline's
        # reduction, so the weights travel the same way (one small broadcast).
        weights = torch.zeros(len(result.micro_losses), dtype=torch.float64)
        if sizes is not None:
            weights[:] = torch.tensor(sizes, dtype=torch.float64)
        weights = self.pipeline.transport.broadcast_from_first(weights)

        def mean(values: Iterable[torch.Tensor]) -> torch.Tensor:
            got = torch.stack([v.detach().double() for v in values])
            return (got * weights).sum() / weights.sum()

        # The pipeline's stages run the plain candidate update (not the fused one): count that path.
        flops = flops_mod.ebt_step_flops(model.cfg, seq, int(weights.sum()), k_steps, replace(th, fused_vocab=False))
        return StepStats(
            loss=mean(result.micro_losses),
            loss_first=mean(s[0] for s in result.step_losses),
            loss_last=mean(s[-1] for s in result.step_losses),
            energy_first=mean(e[0] for e in result.step_energies),
            energy_last=mean(e[-1] for e in result.step_energies),
            nonfinite_grad_input=result.nonfinite,
            flops=self._flops_share(flops),
        )

    def commit(self, stepped: bool) -> None:
        """Stores this step's final candidates in the replay buffer, unless the step was
        skipped (its NaN rows must not seed later batches). All dp ranks add the whole
        global batch, in global order."""
        pending, self._pending = self._pending, None
        if pending is None or not stepped:
            return
        ids, logits = pending
        if self.dims.dp > 1:
            ids, logits = _all_gather_rows(ids, self.dims), _all_gather_rows(logits, self.dims)
        self.replay.add(ids.cpu(), logits.cpu())

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, batches: Iterable[torch.Tensor], num_batches: int, step: int) -> Dict[str, Any]:
        """CE and energy after each thinking step up to max(eval_steps, trained steps), on
        `num_batches` validation batches (every rank computes the same; rank 0 writes)."""
        th, tc = self.cfg.thinking, self.cfg.train
        trained = th.trained_steps
        steps = max(th.eval_steps, trained)
        gen = torch.Generator().manual_seed(tc.seed + EVAL_SEED_OFFSET)
        ce_sum = energy_sum = None
        count = 0
        model = self.eval_model()
        model.eval()
        for batch in islice(batches, num_batches):
            ids = batch.to(self.device)
            with self.autocast(self.dtype):
                r = think(model, ids[:, :-1], steps, generator=gen, targets=ids[:, 1:],
                          noise_std=th.eval_noise_std, init=th.init, init_std=th.init_std, grad_wrt=th.grad_wrt)
            ce = torch.tensor(r.ce_per_step, dtype=torch.float64)
            energy = r.energies.double().mean(dim=(1, 2)).cpu()
            ce_sum = ce if ce_sum is None else ce_sum + ce
            energy_sum = energy if energy_sum is None else energy_sum + energy
            count += 1
        model.train()
        if count == 0:
            return {"val_batches": 0}
        ce_steps = (ce_sum / count).tolist()
        return {
            "val_batches": count,
            "val_ce": ce_steps[trained],
            "val_ce_per_step": ce_steps,
            "val_energy_per_step": (energy_sum / count).tolist(),
            "trained_steps": trained,
            "eval_steps": th.eval_steps,
            "val_ce_first_step": ce_steps[1],
            "val_ce_last_step": ce_steps[th.eval_steps],
            # System-2 gain: thinking for eval_steps instead of the recipe's thinking.num_steps
            "system2_gain": ce_steps[th.num_steps] - ce_steps[th.eval_steps],
        }

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Collective under tp: the replay buffer with the full vocabulary (layout-free)."""
        if self.replay is None:
            return {"replay": None}
        state = self.replay.state_dict()
        if self.dims.tp > 1 and state.get("logits") is not None:
            state = dict(state, logits=self.vocab_ops.gather(state["logits"]))
        return {"replay": state}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        replay = state.get("replay")
        if self.replay is None or replay is None:
            return
        if replay.get("logits") is not None:
            replay = dict(replay, logits=self.vocab_ops.shard(replay["logits"]).contiguous())
        self.replay.load_state_dict(replay)


class TransformerPPTrainModule(TrainModule):
    """The Transformer++ baseline: next-token cross-entropy, first order."""

    def __init__(self, pm, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(pm, cfg, device)
        self.dtype = dtype
        self.pipeline = None
        if self.dims.pp > 1:
            from parallel.pipeline import TransformerPipeline

            self.pipeline = TransformerPipeline(self.model, self.dims, cfg.parallel.pp_microbatches,
                                                backprop=pm.pipeline_backprop)

    def train_step(self, batch: LocalBatch, step: int) -> StepStats:
        ids = batch.ids
        parts = self._split_rows(ids.shape[0])
        if self.pipeline is not None:  # GPipe; config validation makes the micro-batches equal
            with self.autocast(self.dtype):
                loss = self.pipeline.run([ids[p] for p in parts],
                                         loss_scale=(parts[0].stop - parts[0].start) * self.dims.dp / batch.global_rows)
            self.pm.sync_gradients()
            flops = flops_mod.transformer_pp_step_flops(self.model.cfg, ids.shape[1] - 1, ids.shape[0])
            loss = loss.detach()
            return StepStats(loss, loss, loss, None, None, torch.zeros((), dtype=torch.bool), self._flops_share(flops))
        losses, flops = [], 0.0
        for i, part in enumerate(parts):
            n = part.stop - part.start
            # thinking.fused_vocab is the one switch for both families' fused vocabulary
            # ops: here the chunked LM-head CE (never the (B, S, V) logits), vocab-parallel under tp.
            with self.autocast(self.dtype):
                if self.cfg.thinking.fused_vocab:
                    loss = self.model.loss(ids[part, :-1], ids[part, 1:])
                else:
                    loss = self.vocab_ops.cross_entropy(self.model(ids[part, :-1]), ids[part, 1:])
            self.pm.backward(loss * (n * self.dims.dp / batch.global_rows), sync=i == len(parts) - 1)
            losses.append(loss.detach() * n)
            flops += flops_mod.transformer_pp_step_flops(self.model.cfg, ids.shape[1] - 1, n)
        loss = torch.stack(losses).sum() / ids.shape[0]
        return StepStats(loss, loss, loss, None, None, torch.zeros((), dtype=torch.bool), self._flops_share(flops))

    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor], num_batches: int, step: int) -> Dict[str, Any]:
        total, count = 0.0, 0
        model = self.eval_model()
        model.eval()
        for batch in islice(batches, num_batches):
            ids = batch.to(self.device)
            with self.autocast(self.dtype):
                logits = model(ids[:, :-1])
            total += float(model.vocab_ops.cross_entropy(logits, ids[:, 1:]))
            count += 1
        model.train()
        return {"val_batches": count, **({"val_ce": total / count} if count else {})}


def rank_slice_uneven(n: int, rank: int, parts: int) -> slice:
    """Rank `rank`'s contiguous share of n rows split near-equally over `parts` ranks."""
    return _split(n, parts)[rank] if rank < min(n, parts) else slice(n, n)


def _all_gather_rows(local: torch.Tensor, dims) -> torch.Tensor:
    """Rows of every dp rank, in dp-rank (= global batch) order."""
    pieces = [torch.empty_like(local) for _ in range(dims.dp)]
    dist.all_gather(pieces, local.contiguous(), group=dims.dp_group)
    return torch.cat(pieces)


def build_train_module(pm, cfg: RunConfig, device: torch.device, dtype: torch.dtype) -> TrainModule:
    if cfg.model.arch == "ebt":
        return EBTTrainModule(pm, cfg, device, dtype)
    return TransformerPPTrainModule(pm, cfg, device, dtype)


__all__ = ["LocalBatch", "StepStats", "TrainModule", "EBTTrainModule", "TransformerPPTrainModule",
           "build_train_module", "rank_slice", "EVAL_SEED_OFFSET"]
