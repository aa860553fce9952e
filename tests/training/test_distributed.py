"""Data-parallel training on CPU (gloo), DDP and FSDP2: two ranks hold identical weights, and they equal one
process trained on the same global batch (same prompts, per-sample noise and crops, data-parallel means)."""

from __future__ import annotations

import pytest
import torch

from tests.support.two_ranks import FSDP2, fit_in_subprocess, load_weights, matches_one_process, ranks_agree, two_rank_config


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """One process, batch 4: the reference for two ranks of batch 2 (same prompts, same per-sample noise)."""
    tmp = tmp_path_factory.mktemp("single")
    fit_in_subprocess(tmp, two_rank_config(tmp, "single", devices=1, batch_size=4, strategy="auto"))
    return tmp


@pytest.mark.slow  # end-to-end, in subprocesses
def test_ddp_ranks_agree_and_match_one_process_on_the_same_global_batch(tmp_path, single_process):
    fit_in_subprocess(tmp_path, two_rank_config(tmp_path, "ddp", devices=2, batch_size=2, strategy="ddp_find_unused_parameters_true"))
    ranks_agree(tmp_path / "ddp" / "ranks")
    matches_one_process(tmp_path, "ddp", single_process)


@pytest.mark.slow  # end-to-end, in subprocesses
def test_fsdp2_shards_the_unet_and_matches_one_process_on_the_same_global_batch(tmp_path, single_process):
    fit_in_subprocess(tmp_path, two_rank_config(tmp_path, "fsdp", devices=2, batch_size=2, strategy=FSDP2))
    full = ranks_agree(tmp_path / "fsdp" / "ranks")
    local = load_weights(tmp_path / "fsdp" / "ranks" / "rank0_local.safetensors")
    # Each rank stores half of every LoRA matrix (dim 0, rounded up), the discriminator's head included.
    for name, weights in full.items():
        assert local[name].shape[0] == -(-weights.shape[0] // 2), name
    assert any("fidelity_preservation.head" in name for name in full)
    matches_one_process(tmp_path, "fsdp", single_process)

    # Resume: 2 steps, checkpoint (gathered on rank 0), then the third step from it ends where 3 steps in a row did.
    fit_in_subprocess(tmp_path, two_rank_config(tmp_path, "resumed", devices=2, batch_size=2, strategy=FSDP2, steps=2, checkpoints=True))
    checkpoint = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["comat"]["generator_step"] == 2
    fit_in_subprocess(tmp_path, two_rank_config(tmp_path, "resumed", devices=2, batch_size=2, strategy=FSDP2, steps=3), f"--ckpt_path={checkpoint}")
    resumed = ranks_agree(tmp_path / "resumed" / "ranks")
    for name in full:  # the optimizer states (AdamW moments) and the step counter came back too
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6, msg=name)
