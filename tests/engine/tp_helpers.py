"""What each rank runs in the tensor-parallel tests (spawned processes import this
module by name, so the functions live here and not in the test file).

Every rank builds the same full random-weight model of a family from one seed, takes
its shard, and runs a greedy generation through per-rank caches: two prompts, one of
them prefilled in two chunks, then a few decode steps batched together. Rank 0 then
runs the full model alone on the same schedule as the reference. With ``kernels``
"triton" the steps go through the engine's fast runner and Triton kernels (decode
steps captured in CUDA graphs on a GPU, all-reduces included).
"""

from __future__ import annotations

from typing import Any

import torch
from engine_helpers import CONFIGS, DenseLayerCaches, make_recurrence_matter, random_prompts

from avmp.engine.batch import StepBatch
from avmp.engine.fast_runner import FastModelRunner
from avmp.engine.models import model_class
from avmp.engine.models.base import HybridModel
from avmp.engine.parallel import TensorParallel
from avmp.engine.runner import SequenceWork
from avmp.engine.tiny import init_random_weights

BLOCK_SIZE = 4
PREFILL_CHUNK = 7  # the 12-token prompt prefills in two chunks, the second from its state
NUM_DECODE_STEPS = 4
PAGES = ([9, 2, 14, 5, 11], [3, 12, 0, 7, 15])  # scattered, one list per sequence
SLOTS = (2, 1)


def full_model(family: str, device: str) -> HybridModel:
    """A tiny random model of ``family``, the same bits on every rank (one seed; its
    recurrences slowed so that a state mishandled across chunks would show)."""
    config = CONFIGS[family]()
    model = model_class(config.model_type)(config)
    init_random_weights(model, seed=0, std=0.1)
    torch.manual_seed(0)
    make_recurrence_matter(model)
    return model.to(device).eval()


@torch.inference_mode()
def greedy(
    model: HybridModel, device: str, kernels: str = "reference"
) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Logits of every sampling step ``[num_sequences, vocab]`` and the greedy tokens
    of each sequence, through per-model caches."""
    prompts = random_prompts([12, 5], seed=3)
    cache = DenseLayerCaches(model.geometry(torch.float32), 16, 3, BLOCK_SIZE, device)
    run = _reference_step if kernels == "reference" else _fast_step(model, cache, device)
    tokens = [list(p) for p in prompts]
    done = [0, 0]  # tokens of each sequence already in its cache
    all_logits: list[torch.Tensor] = []
    for _ in range(NUM_DECODE_STEPS + 2):
        work = []
        for i, seq in enumerate(tokens):
            n = min(PREFILL_CHUNK, len(seq) - done[i])
            ids = seq[done[i] : done[i] + n]
            work.append(
                SequenceWork(ids, done[i], SLOTS[i], list(PAGES[i]), done[i] + n == len(seq))
            )
            done[i] += n
        logits = run(model, cache, work, device)
        all_logits.append(logits.cpu())
        picked = iter(logits.argmax(-1).tolist())
        for i, item in enumerate(work):
            if item.samples:
                tokens[i].append(next(picked))
    return all_logits, [seq[len(p) :] for seq, p in zip(tokens, prompts, strict=True)]


def _reference_step(
    model: HybridModel, cache: DenseLayerCaches, work: list[SequenceWork], device: str
) -> torch.Tensor:
    """One step through the model's forward pass and its reference kernels."""
    chunks = [(w.num_context, len(w.token_ids), w.slot_row, w.page_rows) for w in work]
    batch = StepBatch.build(chunks, BLOCK_SIZE, torch.device(device))
    inputs = [token for w in work for token in w.token_ids]
    hidden = model(torch.tensor(inputs, device=device), batch, cache)
    ends = torch.tensor([len(w.token_ids) for w in work]).cumsum(0) - 1
    rows = [int(end) for end, w in zip(ends, work, strict=True) if w.samples]
    return model.logits(hidden[rows])


def _fast_step(model: HybridModel, cache: DenseLayerCaches, device: str) -> Any:
    """Steps through the engine's fast runner with Triton kernels (CUDA graphs for
    decode steps on a GPU, where the model allows them)."""
    from avmp.engine.triton_ops import TritonOps

    model.use_ops(TritonOps())
    runner = FastModelRunner(model, cache, BLOCK_SIZE, torch.device(device),  # type: ignore[arg-type]
                             cuda_graphs=True, pad_decode=True)  # fmt: skip

    def step(
        model: HybridModel, cache: DenseLayerCaches, work: list[SequenceWork], device: str
    ) -> torch.Tensor:
        # clone: a graph's logits live in its static output until its next replay
        return runner.execute(work).clone()

    return step


def run_families(
    tp: TensorParallel, families: list[str], device: str, kernels: str = "reference"
) -> dict[str, Any]:
    """Per family: this rank's logits and tokens, its share of the parameters, and (on
    rank 0) the full model's; or the error that refused the split."""
    results: dict[str, Any] = {}
    for family in families:
        full = full_model(family, device)
        try:
            shard = full.sharded(tp)
        except ValueError as error:
            results[family] = {"refused": str(error)}
            continue
        logits, tokens = greedy(shard, device, kernels)
        results[family] = {
            "logits": logits,
            "tokens": tokens,
            "num_params": sum(p.numel() for p in shard.parameters()),
            "full_num_params": sum(p.numel() for p in full.parameters()),
            "geometry": shard.geometry(torch.float32),
        }
    if tp.rank == 0:
        for family in families:
            if "refused" not in results[family]:
                full_logits, full_tokens = greedy(full_model(family, device), device, kernels)
                results[family]["full_logits"] = full_logits
                results[family]["full_tokens"] = full_tokens
    return results
