import atexit
import os
import shutil
import tempfile

# 8 simulated CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, which the processes the tests start inherit:
# the command-line, notebook, server and multi-host tests compile the same programs again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bluelm-jax-tests-compiled-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    """Path of a small bilingual SentencePiece model with the BlueLM special pieces."""
    from tests.spm import train_tokenizer

    return train_tokenizer(str(tmp_path_factory.mktemp("spm") / "tokenizer.model"))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tokenizer_model):
    """hf_checkpoint(preset_name, fmt="safetensors", num_shards=2, seed=0) -> a random HF-layout dir (cached)."""
    from bluelm_jax.config import preset
    from tests.hf_reference import write_hf_checkpoint

    made: dict = {}

    def make(name: str, fmt: str = "safetensors", num_shards: int = 2, seed: int = 0) -> str:
        key = (name, fmt, num_shards, seed)
        if key not in made:
            directory = str(tmp_path_factory.mktemp(f"hf-{name}-{fmt}-{num_shards}-{seed}"))
            made[key] = write_hf_checkpoint(directory, preset(name), tokenizer_model, seed=seed,
                                            num_shards=num_shards, fmt=fmt)
        return made[key]

    return make
