"""Shared test setup: everything offline, wandb offline, a private data cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every test starts its own local Ray cluster; a RAY_ADDRESS from the shell would send
# them to someone else's.
os.environ.pop("RAY_ADDRESS", None)

import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: a second intra-op thread only adds synchronisation (and on a
# busy machine it made some tests several times slower). Ray workers run with one too.
torch.set_num_threads(1)

# One data cache for the whole session (and for Ray workers, which inherit the env):
# the BPE tokenizer is trained and the corpus packed once.
os.environ.setdefault("SEDD_RAY_CACHE", tempfile.mkdtemp(prefix="sedd-ray-test-cache-"))


def tiny_config(**params):
    """The tiny preset shrunk further for tests, with ``params`` applied (short names)."""
    from sedd_ray.config import apply_params, preset

    base = {
        "vocab_size": 300, "seq_len": 32, "batch_size": 8, "steps": 40, "log_every": 5,
        "eval_every": 20, "ckpt_every": 20, "eval_sequences": 8, "eval_draws": 2,
        "final_eval_sequences": 8, "final_eval_draws": 2, "test_draws": 0, "sample_count": 1,
        "sample_length": 16, "sample_steps": 4,
        "progress": False, "hidden_size": 32, "cond_dim": 16, "n_heads": 2, "n_layers": 1,
    }
    base.update(params)
    return apply_params(preset("tiny"), base).validate()


@pytest.fixture(scope="session")
def tiny_bundle():
    from sedd_ray.data import load_data

    return load_data(tiny_config().data)
