"""Sampling as a pure function of logits, parameters and a seeded generator."""

from __future__ import annotations

import pytest
import torch

from llamachat.engine.sampling import (
    GREEDY,
    SamplingParams,
    apply_repeat_penalty,
    greedy_rows,
    sample,
)

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0, 2.9])


def draws(params: SamplingParams, logits=LOGITS, n=400, recent=None) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    return {int(sample(logits, params, generator, recent)) for _ in range(n)}


def test_greedy_is_argmax():
    assert int(sample(LOGITS, GREEDY)) == 1


def test_top_k_keeps_only_the_k_most_likely():
    assert draws(SamplingParams(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0)) == {1, 5}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.softmax(LOGITS, -1)
    order = probs.argsort(descending=True).tolist()
    # Mass of the two most likely tokens, nudged down: the nucleus is exactly those two.
    top_p = float(probs[order[0]] + probs[order[1]]) - 1e-4
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0)) == set(order[:2])


def test_top_p_always_keeps_the_most_likely_token():
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=1e-6, min_p=0.0)) == {1}


def test_min_p_drops_tokens_far_below_the_best():
    probs = torch.softmax(LOGITS, -1)
    min_p = float(probs[2] / probs[1]) - 1e-4  # token 2 just survives, token 0 does not
    kept = draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=min_p))
    assert kept == {int(i) for i in torch.nonzero(probs >= probs[1] * min_p)}


def test_unfiltered_sampling_reaches_every_token():
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), n=2000) == set(
        range(6)
    )


def test_repeat_penalty_pushes_seen_tokens_down_whatever_their_sign():
    logits = torch.tensor([2.0, -2.0, 1.0])
    penalised = apply_repeat_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert penalised.tolist() == [1.0, -4.0, 1.0]


def test_repeat_penalty_can_change_the_greedy_choice():
    params = SamplingParams(temperature=0.0, repeat_penalty=1.5)
    assert int(sample(LOGITS, params, recent=torch.tensor([1]))) == 5


def test_repeat_last_n_limits_the_penalty_window():
    params = SamplingParams(temperature=0.0, repeat_penalty=1.5, repeat_last_n=1)
    assert int(sample(LOGITS, params, recent=torch.tensor([1, 0]))) == 1


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

    def sequence(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [int(sample(LOGITS, params, generator)) for _ in range(30)]

    assert sequence(3) == sequence(3)
    assert sequence(3) != sequence(4)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_k=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(min_p=1),
        dict(repeat_penalty=0),
    ],
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_frequency_and_presence_penalties_subtract_per_occurrence_and_once():
    from llamachat.engine.sampling import apply_occurrence_penalties

    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    produced = torch.tensor([0, 0, 0, 2])
    penalised = apply_occurrence_penalties(logits, produced, frequency=0.5, presence=0.25)
    assert penalised.tolist() == [1.0 - 1.5 - 0.25, 1.0, 1.0 - 0.5 - 0.25, 1.0]


def test_a_presence_penalty_can_change_the_greedy_choice():
    params = SamplingParams(temperature=0.0, presence_penalty=0.2)
    assert int(sample(LOGITS, params, produced=torch.tensor([1]))) == 5
    assert int(sample(LOGITS, params, produced=torch.tensor([], dtype=torch.long))) == 1


@pytest.mark.parametrize("name", ["frequency_penalty", "presence_penalty"])
def test_occurrence_penalties_outside_minus_two_to_two_are_refused(name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: 2.5})


def test_greedy_rows_choose_what_each_row_alone_would_under_its_own_penalties():
    generator = torch.Generator().manual_seed(7)
    rows = 6
    logits = torch.randn(rows, 40, generator=generator) * 3
    recent = [torch.randint(0, 40, (n,), generator=generator).tolist() for n in (5, 9, 1, 20, 3, 7)]
    produced = [row[-3:] for row in recent]
    params = [
        SamplingParams(temperature=0.0),  # plain
        SamplingParams(temperature=0.0, repeat_penalty=1.8),
        SamplingParams(temperature=0.0, repeat_penalty=0.5, repeat_last_n=4),
        SamplingParams(temperature=0.0, repeat_penalty=3.0, repeat_last_n=2),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
        SamplingParams(temperature=0.0, repeat_penalty=2.0, frequency_penalty=1.5),
    ]
    # Each row's best token is in its context, so the penalties matter.
    for row, seen in enumerate(recent):
        logits[row, seen[-1]] = logits[row].max() + 0.5
    alone = [
        int(sample(logits[i], p, None, torch.tensor(recent[i]), torch.tensor(produced[i])))
        for i, p in enumerate(params)
    ]
    together = greedy_rows(logits, params, recent, [len(row) - 3 for row in recent]).tolist()
    assert together == alone
    assert alone != logits.argmax(-1).tolist()  # some penalty did change a choice
