"""Test-only PyTorch transcription of the HF Ring-linear-2.0 forward (docs/SPEC.md §1-§10).

`model.RefModel` is the slow, plain reference the JAX model is held to; `checkpoint.make_hf_checkpoint`
writes a random checkpoint in the HF layout with it. Torch only: no JAX here.
"""
