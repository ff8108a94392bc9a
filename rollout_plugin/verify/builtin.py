"""Built-in verifiers. A verifier is ``fn(completion: str, example: dict) -> float``."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def last_number_match(completion: str, example: dict, mode: str = "exact") -> float:
    """1.0 when the last number in the completion equals the example's ``answer``, else 0.0.

    ``mode="fast"`` compares the number's text ("2.0" != "2"); ``"exact"`` compares values.
    """
    answer = example.get("answer")
    got = last_number(completion)
    if answer is None or got is None:
        return 0.0
    if mode == "fast":
        return float(got == str(answer).replace(",", ""))
    try:
        return float(float(got) == float(str(answer).replace(",", "")))
    except ValueError:
        return float(got == str(answer))
