"""`python -m mura_jax.evaluation`: the scorer (scorer.py)."""
import sys

from mura_jax.evaluation import scorer

sys.exit(scorer.main())
