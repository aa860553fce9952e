"""Scale options: 8-bit AdamW from YAML (real bitsandbytes state, resumable) and the refusal of trainer settings the
module cannot run, before any model loads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_cli


def _trainer(strategy, precision="32-true", gradient_clip_val=None):
    return SimpleNamespace(strategy=strategy, precision=precision, gradient_clip_val=gradient_clip_val)


@pytest.mark.parametrize(
    "case, match",
    [
        ("fsdp", r"trainer.strategy=fsdp: .*For FSDP2 use strategy: \{class_path: lightning.pytorch.strategies.ModelParallelStrategy"),
        ("sharded_checkpoint", r"ModelParallelStrategy\(save_distributed_checkpoint=True\).*set save_distributed_checkpoint: false"),
        ("tensor_parallel", r"ModelParallelStrategy\(tensor_parallel_size=2\).*set tensor_parallel_size: 1"),
        ("8bit_sharded", r"model.optimizer.name=adamw8bit with a sharded strategy \(ModelParallelStrategy\).*use adamw"),
        ("ddp_adversarial", r"trainer.strategy=ddp with an adversarial loss.*ddp_find_unused_parameters_true"),
        ("clip_val", r"trainer.gradient_clip_val=1.0: .*set model.optimizer.grad_clip"),
        ("fp16_cpu", r"trainer.precision=16-mixed on CPU: .*use bf16-mixed or 32-true"),
    ],
)
def test_unsupported_trainer_settings_are_refused_with_the_alternative(case, match):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from comat_lightning.training.options import check_trainer

    single = SingleDeviceStrategy(device=torch.device("cpu"))
    fsdp2 = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    trainer, optimizers, adversarial = _trainer(single), {"model.optimizer.name": "adamw"}, False
    if case == "fsdp":
        trainer = _trainer(FSDPStrategy())
    elif case == "8bit_sharded":
        trainer, optimizers = _trainer(fsdp2), {"model.optimizer.name": "adamw8bit"}
    elif case == "sharded_checkpoint":
        trainer = _trainer(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    elif case == "tensor_parallel":
        trainer = _trainer(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2, save_distributed_checkpoint=False))
    elif case == "ddp_adversarial":
        from lightning.fabric.plugins.environments import LightningEnvironment

        ddp = DDPStrategy(cluster_environment=LightningEnvironment())
        ddp.cluster_environment.set_world_size(2)
        trainer, adversarial = _trainer(ddp), True
    elif case == "clip_val":
        trainer = _trainer(single, gradient_clip_val=1.0)
    elif case == "fp16_cpu":
        trainer = _trainer(single, precision="16-mixed")
    with pytest.raises(ValueError, match=match):
        check_trainer(trainer, optimizers, adversarial)
    # The same settings with the named alternative pass.
    check_trainer(_trainer(single, precision="bf16-mixed"), {"model.optimizer.name": "adamw8bit"}, adversarial=True)
    check_trainer(_trainer(DDPStrategy(find_unused_parameters=True)), {"model.optimizer.name": "adamw"}, adversarial=True)
    check_trainer(_trainer(fsdp2, precision="bf16-mixed"), {"model.optimizer.name": "adamw"}, adversarial=True)


def test_unknown_optimizer_names_are_refused_by_the_config_parser(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):  # jsonargparse: not one of the Literal's values
        run_cli(["--config", str(REPO / "configs" / "tiny_demo.yaml"), "--model.optimizer.name=adam9", "--trainer.logger=false"], run=False)
    err = capsys.readouterr().err
    assert "model.optimizer.name" in err and "adam9" in err


def test_adamw8bit_keeps_uint8_state_for_large_tensors_and_resumes(tmp_path, monkeypatch):
    """Both optimizers 8-bit from the command line; LoRA rank 256 makes the LoRA matrices >= 4096 elements."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    args = ["--config", str(REPO / "configs" / "tiny_demo_no_attribute.yaml"), "--model.optimizer.name=adamw8bit",
            "--model.lora.rank=256", "--trainer.limit_val_batches=0", "--trainer.logger=false"]  # fmt: skip
    cli = run_cli([*args, "--trainer.max_steps=2"], run=False)
    # The discriminator's optimizer is the loss callback's init arg (YAML: optimizer: adamw8bit under its init_args).
    next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FidelityPreservationLoss").optimizer = "adamw8bit"
    cli.trainer.fit(cli.model, cli.datamodule)
    generator_opt, critic_opt = cli.trainer.optimizers
    assert type(generator_opt).__name__ == "AdamW8bit" and type(critic_opt).__name__ == "AdamW8bit"
    pairs = [(opt, p) for opt in (generator_opt, critic_opt) for group in opt.param_groups for p in group["params"]]
    big = [(opt, p) for opt, p in pairs if p.numel() >= 4096]  # the LoRA matrices (rank 256)
    small = [(opt, p) for opt, p in pairs if p.numel() < 4096]  # e.g. the discriminator head's bias
    assert big and small
    assert all(opt.state[p]["state1"].dtype == torch.uint8 for opt, p in big)
    assert all(opt.state[p]["state1"].dtype == torch.float32 for opt, p in small)
    ckpt = tmp_path / "after2.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    # bitsandbytes saves its quantized state under one key per parameter; the uint8 tensors are inside it.
    packed = [s["__bnb_optimizer_quant_state__"] for s in saved["optimizer_states"][0]["state"].values() if "__bnb_optimizer_quant_state__" in s]
    assert packed and any(v.dtype == torch.uint8 for state in packed for v in state.values() if torch.is_tensor(v))

    resumed = run_cli([*args, "--trainer.max_steps=3"], run=False)
    next(cb for cb in resumed.trainer.callbacks if type(cb).__name__ == "FidelityPreservationLoss").optimizer = "adamw8bit"
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(ckpt))
    assert resumed.model.generator_step == 3
    restored = resumed.trainer.optimizers[0]
    assert all(restored.state[p]["state1"].dtype == torch.uint8 for group in restored.param_groups for p in group["params"] if p.numel() >= 4096)


def test_bf16_mixed_stores_frozen_weights_in_bf16_and_trains_lora_in_fp32(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    cli = run_cli(["--config", str(REPO / "configs" / "tiny_demo.yaml"), "--trainer.precision=bf16-mixed", "--trainer.max_steps=2",
                   "--trainer.limit_val_batches=0", "--trainer.logger=false",
                   "--model.sampler.num_inference_steps=4"], run=False)  # fmt: skip
    cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks if type(cb).__name__ not in ("ExportLoRA", "ModelCheckpoint")]
    cli.trainer.fit(cli.model, cli.datamodule)
    module = cli.model
    backbone = module.backbone
    trainable = {n: p for n, p in module.named_parameters() if ".lora_" in n or "head" in n}
    frozen = [p for n, p in module.named_parameters() if n not in trainable]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    for model in (backbone.vae, backbone.text_encoders[0], module.loss_modules["concept_matching"]):
        assert next(model.parameters()).dtype == torch.bfloat16
    assert module.loss_modules["concept_matching"].mean.dtype == torch.float32  # normalisation buffers stay fp32
    for optimizer in cli.trainer.optimizers:  # AdamW moments in fp32, and the LoRA moved
        states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
        assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    metrics = cli.trainer.logged_metrics
    assert all(torch.isfinite(metrics[f"train/{k}"]) for k in ("loss", "concept_matching", "attribute_concentration", "fidelity_preservation"))
    assert any(float(p.detach().abs().max()) > 0 for n, p in trainable.items() if "lora_B" in n)


def test_bf16_frozen_weights_need_bf16_compute(tmp_path, monkeypatch):
    from comat_lightning.models.backbone import DiffusionBackbone

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    monkeypatch.setattr(DiffusionBackbone, "from_pretrained", lambda *a, **k: pytest.fail("models loaded before the check"))
    cli = run_cli(["--config", str(REPO / "configs" / "tiny_demo.yaml"), "--model.frozen_dtype=bfloat16", "--trainer.logger=false"], run=False)
    with pytest.raises(ValueError, match=r"model.frozen_dtype=bfloat16 with trainer.precision=32-true.*bf16-mixed"):
        cli.trainer.fit(cli.model, cli.datamodule)
