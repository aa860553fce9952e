"""The scale and reliability families on SD3 / FLUX.1: configs/tiny_demo_sd3.yaml and tiny_demo_flux.yaml (all three
CoMat losses on tiny://sd3, tiny://flux) on two ranks under DDP and under FSDP2 (one unit per transformer block)
equal one process trained on the same global batch; a run killed with SIGKILL and resumed with ``--ckpt_path last``
ends bit-identical to an uninterrupted one (weights, both optimizers' states, step counter)."""

from __future__ import annotations

import signal
import sys

import pytest
from conftest import REPO

from tests.support.two_ranks import FSDP2, fit_in_subprocess, load_weights, matches_one_process, ranks_agree, two_rank_config

sys.path.insert(0, str(REPO / "benchmarks"))
from kill_resume import checkpoint_folder, differences, final_state, run_fit, write_config  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end, in subprocesses


@pytest.fixture(scope="module", params=["sd3", "flux"])
def single_process(request, tmp_path_factory):
    """(family, folder of one process trained with batch 4): the reference for two ranks of batch 2."""
    family = request.param
    tmp = tmp_path_factory.mktemp(f"single-{family}")
    fit_in_subprocess(tmp, two_rank_config(tmp, "single", devices=1, batch_size=4, strategy="auto", base=f"tiny_demo_{family}"))
    return family, tmp


def test_ddp_and_fsdp2_ranks_agree_and_match_one_process(tmp_path, single_process):
    family, single = single_process
    base = f"tiny_demo_{family}"
    fit_in_subprocess(tmp_path, two_rank_config(tmp_path, "ddp", devices=2, batch_size=2, strategy="ddp_find_unused_parameters_true", base=base))
    ranks_agree(tmp_path / "ddp" / "ranks")
    matches_one_process(tmp_path, "ddp", single)

    fit_in_subprocess(tmp_path, two_rank_config(tmp_path, "fsdp", devices=2, batch_size=2, strategy=FSDP2, base=base))
    full = ranks_agree(tmp_path / "fsdp" / "ranks")
    local = load_weights(tmp_path / "fsdp" / "ranks" / "rank0_local.safetensors")
    for name, weights in full.items():  # each rank stores half of every LoRA matrix, the discriminator's head included
        assert local[name].shape[0] == -(-weights.shape[0] // 2), name
    assert any("fidelity_preservation.head" in name for name in full)
    assert any("single_transformer_blocks" in name for name in full) == (family == "flux")  # FLUX's single-stream blocks train too
    matches_one_process(tmp_path, "fsdp", single)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sigkill_mid_training_then_resume_ends_bit_identical(family, tmp_path):
    config, steps = f"tiny_demo_{family}", 3
    write_config(tmp_path / "reference", config=config)
    reference = run_fit(tmp_path / "reference", steps, config=config)
    assert reference.returncode == 0, reference.log[-4000:]

    write_config(tmp_path / "killed", config=config)
    anchor = checkpoint_folder(config) / "epoch=0-step=1.ckpt"
    killed = run_fit(tmp_path / "killed", steps, kill=(signal.SIGKILL, 0.3), anchor=anchor, config=config)
    assert killed.returncode == -signal.SIGKILL, killed.log[-3000:]
    resumed = run_fit(tmp_path / "killed", steps, resume=True, config=config)
    assert resumed.returncode == 0, resumed.log[-4000:]
    assert differences(final_state(tmp_path / "reference", config), final_state(tmp_path / "killed", config)) == []
