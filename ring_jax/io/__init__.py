"""The checkpoint formats ring_jax reads and writes: the table between HF tensor names and the
model's parameters (`mapping`), safetensors files (`safetensors_io`), an HF folder (`hf`), the
conversion both ways (`conversion`) and random checkpoints in the HF layout (`random_checkpoint`).
The Orbax model folder is `ring_jax.checkpoint`."""
