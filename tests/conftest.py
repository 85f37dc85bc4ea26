import os

# 8 simulated CPU devices for the sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    """Path of a small bilingual SentencePiece model with the BlueLM special pieces."""
    from tests.spm import train_tokenizer

    return train_tokenizer(str(tmp_path_factory.mktemp("spm") / "tokenizer.model"))
