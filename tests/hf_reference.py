"""Random-weight BlueLM checkpoints in Hugging Face layout and the PyTorch reference, for the tests.

Everything here is bench/reference.py's (the benchmarks use it too), re-exported under the
names the tests import. Test-only: torch and transformers are never run-time dependencies.
"""

from bench.reference import (assert_reference_rope_intact, ntkmixed_inv_freq_torch,  # noqa: F401 (re-exported)
                             params_from_hf, random_hf_weights, reference_model, write_hf_checkpoint)
