"""Input checks and the output file's refuse / overwrite / resume rules (no engine needed)."""

from __future__ import annotations

import json

import pytest

from rollout_plugin.collect.dataset import default_dataset_path, load_examples
from rollout_plugin.collect.output import RolloutWriter, sample_id
from rollout_plugin.errors import InputError


def test_default_dataset_ships_200_arithmetic_prompts():
    examples = load_examples(None)
    assert len(examples) == 200 and default_dataset_path().is_file()
    assert all("answer" in ex.fields for ex in examples)
    assert len({ex.id for ex in examples}) == 200


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a"}\n{"prompt": "b"\n', ":2: malformed JSON"),
    ('{"prompt": "a"}\n[1, 2]\n', ":2: expected a JSON object"),
    ('{"text": "a"}\n', ":1: needs exactly one of 'prompt', 'messages', 'prompt_token_ids'"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', ":2: duplicate id '1' (first on line 1)"),
    ('{"prompt_token_ids": [1, "x"]}\n', "'prompt_token_ids' must be a non-empty list of ints"),
    ("\n\n", "no prompts in the file"),
])
def test_bad_input_names_the_line(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_examples(str(path))
    assert message in str(info.value)


def test_missing_input(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"))


def _group(pid: str, k: int) -> list[dict]:
    return [{"id": sample_id(pid, j), "prompt_id": pid, "sample": j, "k": k, "completion": "x"} for j in range(k)]


def test_existing_output_is_refused_without_overwrite_or_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("keep\n")
    with pytest.raises(InputError, match="exists; pass overwrite=true"):
        RolloutWriter(str(out), k=2, overwrite=False, resume=False)
    assert out.read_text() == "keep\n"


def test_resume_drops_torn_tail_and_short_groups(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [json.dumps(r) for r in _group("a", 2) + _group("b", 2) + _group("c", 2)[:1]]
    out.write_text("\n".join(lines) + "\n" + '{"id": "d#0", "prom')
    writer = RolloutWriter(str(out), k=2, overwrite=False, resume=True)
    assert writer.done == {"a", "b"}
    writer.open()
    writer.write_group(_group("c", 2))
    writer.close()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert ids == ["a#0", "a#1", "b#0", "b#1", "c#0", "c#1"] and len(set(ids)) == len(ids)


def test_resume_with_another_k_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in _group("a", 2)))
    with pytest.raises(InputError, match="k=\\[2\\], not pool.k=4"):
        RolloutWriter(str(out), k=4, overwrite=False, resume=True)
