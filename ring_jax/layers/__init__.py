"""Flax NNX layers of the Ring-linear-2.0 model, one concern per module."""
