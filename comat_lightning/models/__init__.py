"""The diffusion backbone: loading, LoRA adapters and their files, FSDP2 sharding."""
