"""Code hashes: per module, or per function of the rules' glue."""

import pytest

from paramdyn.provenance import _source, code_hash


def test_function_granularity():
    train = _source("jobs:train").decode()
    assert train.startswith("def train(") and "def distances(" not in train
    assert code_hash("jobs:train") != code_hash("jobs:distances")
    assert code_hash("measures", "jobs:distances") == code_hash("jobs:distances", "measures")
    assert code_hash("jobs") != code_hash("jobs:train")


def test_unknown_names():
    with pytest.raises(FileNotFoundError):
        code_hash("nope")
    with pytest.raises(LookupError, match="no function nope"):
        code_hash("jobs:nope")
