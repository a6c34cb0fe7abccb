"""The nudge bandit (Thompson sampling with the response model as prior) and the sandboxed templates."""

from __future__ import annotations

import random

import pytest

from firstmile.kit.templates import TemplateProblemError, check, render
from firstmile.nudges.bandit import ArmStats, ThompsonSampler

TRUE_RATES = {"welcome-v1|email|morning": 0.04, "welcome-v2|email|morning": 0.12, "checklist|in_app|now": 0.07}


def _simulate(
    sampler: ThompsonSampler, rounds: int, seed: int, predicted: dict[str, float] | None = None
) -> dict[str, int]:
    world = random.Random(seed)
    stats = {k: [0, 0] for k in TRUE_RATES}
    chosen = dict.fromkeys(TRUE_RATES, 0)
    for _ in range(rounds):
        choice = sampler.choose([ArmStats(k, s, f) for k, (s, f) in stats.items()], predicted)
        chosen[choice.arm] += 1
        reward = world.random() < TRUE_RATES[choice.arm]
        stats[choice.arm][0 if reward else 1] += 1
    return chosen


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_thompson_sampling_converges_to_the_best_arm(seed: int) -> None:
    chosen = _simulate(ThompsonSampler(random.Random(seed)), 4000, seed)
    best = max(TRUE_RATES, key=lambda k: TRUE_RATES[k])
    assert max(chosen, key=lambda k: chosen[k]) == best
    late = _simulate(ThompsonSampler(random.Random(seed + 100)), 4000, seed + 100)
    assert late[best] / 4000 > 0.6  # most of the traffic ends on the best arm, the rest still explores


def test_the_prior_steers_early_choices_and_data_overrides_a_wrong_prior() -> None:
    sampler = ThompsonSampler(random.Random(7), prior_strength=50)
    predicted = {"welcome-v1|email|morning": 0.5, "welcome-v2|email|morning": 0.01, "checklist|in_app|now": 0.01}
    early = _simulate(sampler, 30, 7, predicted)
    assert early["welcome-v1|email|morning"] > 20  # the model's favourite is tried first
    overall = _simulate(ThompsonSampler(random.Random(8), prior_strength=50), 6000, 8, predicted)
    assert overall["welcome-v2|email|morning"] > overall["welcome-v1|email|morning"]  # outcomes win in the end
    assert sampler.prior(None) == (1.0, 1.0) and sampler.prior(0.2) == (11.0, 41.0)


def test_a_choice_records_what_it_was_chosen_from() -> None:
    choice = ThompsonSampler(random.Random(1)).choose([ArmStats("a", 3, 1), ArmStats("b")], {"b": 0.5})
    assert set(choice.samples) == {"a", "b"} and choice.arm in {"a", "b"}
    assert choice.posterior_means["a"] == pytest.approx(4 / 6) and choice.priors["b"] == (6.0, 6.0)
    with pytest.raises(ValueError, match="no arm"):
        ThompsonSampler().choose([])
    with pytest.raises(ValueError, match="unique"):
        ThompsonSampler().choose([ArmStats("a"), ArmStats("a")])


def test_templates_render_and_refuse_unknown_variables_and_unsafe_access() -> None:
    context = {"user": {"first_name": "Ada"}, "step": {"title": "Create an API key"}, "link": "https://x.test/l/1"}
    out = render("Hi {{ user.first_name }}, next: {{ step.title }} {{ link }}", context)
    assert out.text == "Hi Ada, next: Create an API key https://x.test/l/1" and not out.html
    assert render("<p>{{ user.first_name }}</p>", {"user": {"first_name": "<b>A</b>"}}, html=True).text == (
        "<p>&lt;b&gt;A&lt;/b&gt;</p>"
    )
    with pytest.raises(TemplateProblemError, match="'company' is undefined"):
        render("{{ company }}", context)
    with pytest.raises(TemplateProblemError, match=r"not allowed|unsafe"):
        render("{{ ''.__class__.__mro__ }}", context)
    with pytest.raises(TemplateProblemError) as bad:
        check("Hello\n{% if user %}\nno end")
    assert bad.value.line is not None and "template line" in str(bad.value)
