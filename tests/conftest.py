import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def sst2():
    from hf_backdoor import load_task

    return load_task("sst2")


@pytest.fixture(scope="session")
def sst2_train_slice(sst2):
    # A fixed real slice keeps attack tests fast; 1,000 rows leave enough of each label for every mode.
    return sst2["train"].select(range(1000))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from hf_backdoor import default_text_model

    return AutoTokenizer.from_pretrained(default_text_model())


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING, logger="hf_backdoor")
    return caplog
