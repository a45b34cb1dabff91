"""The redesigned server and client paths keep what the code gave before them: the global state after two
rounds of the quickstart, and each round's server accuracy and loss, within 1e-6 (tests/reference_states.py
recorded them; its ``check`` runs every case)."""

import pytest
from reference_states import CASES, differences

# the paths the redesign touched, in three cases: the stacked engine, the sequential runner with a codec and
# a server optimizer, a client-side strategy; every case runs with `python tests/reference_states.py check`
CHECKED = ["lora-vec", "lora-int8-fedadam", "bias-scaffold"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKED)
def test_two_quickstart_rounds_give_the_recorded_state(name, monkeypatch):
    from reference_states import REPO

    monkeypatch.chdir(REPO)
    assert name in CASES
    largest, problems = differences(name)
    assert not problems, f"{name} (max |difference| {largest:.3g}): " + "; ".join(problems)
