"""The demo: the whole chain on a synthetic MURA, on a laptop CPU, in minutes.

    python -m mura_jax.main --config configs/demo.py --workdir /tmp/mura-demo

It is the embedded default of `python -m mura_jax.main` (no --config needed), defined in
mura_jax/configs/demo.py so that an installed mura-jax has it too.
"""

from mura_jax.configs.demo import get_config  # noqa: F401
