"""The PyTorch reference checks itself (tests/reference/selfcheck.py): schedule, tensor names,
float32 vs float64, the recurrence against a chunked float64 sum, MTP placements, YaRN tables,
sharded checkpoints. The JAX model is then held to it in test_parity.py."""

from reference import selfcheck


def test_reference_selfcheck(tmp_path, tiny_dict):
    selfcheck.run_checks(tiny_dict, tiny_dict["vocab_size"], str(tmp_path))  # SystemExit on a failed check
