"""How one number is written in a table: a p-value, a signed excess, and a CKNNA value with
its chance level and verdict. Shared by the report's sections (harness.study.report.markdown and
harness.study.report.horizons) so every table writes a value the same way."""
from __future__ import annotations

import math

from harness.cknna.chance import ALPHA, MARK
from harness.study.report.figures import fmt


def p_text(p, draws: int | None) -> str:
    """A p-value; the smallest a permutation test can give, 1/(draws+1), is a bound: no
    shuffle reached the observed value, and more draws would give a smaller p."""
    if p is None or draws is None:
        return fmt(p)
    if math.isclose(p, 1 / (draws + 1), rel_tol=1e-9):
        return f"p < 1/{draws + 1}"
    return fmt(p)


def signed(x) -> str:
    """An excess over chance, always with its sign."""
    return fmt(x) if x is None or x != x or x < 0 else "+" + fmt(x)


def verdict(rec: dict | None) -> str:
    """'above chance', or MARK ('at chance'): not above it after the report's correction."""
    if not rec:
        return ""
    above = rec.get("above_chance")
    if above is None:  # not adjusted (a record outside a results file)
        above = (rec.get("p_value") or 1) < ALPHA and (rec.get("excess") or 0) > 0
    return "above chance" if above else MARK


def chance_cell(value, rec: dict | None) -> str:
    """A CKNNA value with its chance level, excess and both p-values; 'at chance' when
    not above it. A bare value when no null was drawn."""
    if not rec:
        return fmt(value)
    draws = rec.get("n_permutations")
    text = (f"{fmt(value)} (chance {fmt(rec.get('chance'))}, {signed(rec.get('excess'))}; "
            f"p {p_text(rec.get('p_value'), draws).removeprefix('p ')}, "
            f"adj. {fmt(rec.get('p_adjusted'))})")
    return f"{text} {MARK}" if verdict(rec) == MARK else text
