"""python -m ring_jax.job (`ring_jax.job`)."""

from ring_jax.errors import exit_now
from ring_jax.job.command import main

exit_now(main())
