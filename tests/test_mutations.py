"""The mutation check (tests/mutations.py): its list stays valid as the code moves (fast), and every
mutation is killed by its tests (slow: the whole check, ~40 min on 2 busy cores)."""
from pathlib import Path

import pytest

import mutations

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutation_applies_to_the_current_code():
    ids = [m.id for m in mutations.MUTATIONS]
    assert len(ids) == len(set(ids))
    for m in mutations.MUTATIONS:
        text = (ROOT / m.file).read_text()
        mutated = m.apply(text)
        assert mutated != text and len(mutated.splitlines()) == len(text.splitlines()), m.id  # one line changes
        for t in m.tests:
            file, _, name = t.partition("::")
            assert (ROOT / file).is_file() and (not name or f"def {name}(" in (ROOT / file).read_text()), (m.id, t)
    with pytest.raises(ValueError, match="found 0 times"):
        mutations.Mutation("x", "f", "absent", "y", ()).apply("text")
    with pytest.raises(ValueError, match="found 2 times"):
        mutations.Mutation("x", "f", "a", "b", ()).apply("a a")
    assert mutations.Mutation("x", "f", "a", "b", (), nth=1).apply("a a") == "a b"


@pytest.mark.slow
def test_every_mutation_is_killed():
    results = mutations.run(mutations.MUTATIONS)
    assert [m.id for m, outcome, _ in results if outcome != "killed"] == []
