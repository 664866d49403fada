import math

import torch

from oracle.engine.sampler import SamplingParams, SequenceSampler


def logits(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_greedy_is_argmax():
    s = SequenceSampler(SamplingParams(temperature=0), 4)
    assert s.choose(logits(0.0, 3.0, 1.0, 2.0)).token == 1


def test_seed_reproducible_and_seeds_differ():
    lg = torch.randn(100)

    def draw(seed):
        s = SequenceSampler(SamplingParams(temperature=1.0, seed=seed), 100)
        return [s.choose(lg).token for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_logit_bias_can_force_or_ban():
    s = SequenceSampler(SamplingParams(temperature=0, logit_bias={0: 100.0}), 3)
    assert s.choose(logits(0.0, 5.0, 1.0)).token == 0
    s = SequenceSampler(SamplingParams(temperature=0, logit_bias={1: -100.0}), 3)
    assert s.choose(logits(0.0, 5.0, 1.0)).token == 2


def test_presence_and_frequency_penalties_apply_to_generated_tokens():
    s = SequenceSampler(SamplingParams(temperature=0, presence_penalty=2.0), 3)
    lg = logits(0.0, 5.0, 4.0)
    assert s.choose(lg).token == 1
    assert s.choose(lg).token == 2  # 5 - 2 < 4
    s = SequenceSampler(SamplingParams(temperature=0, frequency_penalty=0.6), 3)
    assert [s.choose(lg).token for _ in range(3)] == [1, 1, 2]  # 5, 4.4, then 3.8 < 4


def test_top_p_keeps_smallest_nucleus():
    s = SequenceSampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0), 3)
    probs = s.probabilities(torch.log(torch.tensor([0.6, 0.3, 0.1])))
    assert torch.allclose(probs, torch.tensor([1.0, 0.0, 0.0]))
    probs = SequenceSampler(SamplingParams(top_p=0.8), 3).probabilities(torch.log(torch.tensor([0.6, 0.3, 0.1])))
    assert torch.allclose(probs, torch.tensor([2 / 3, 1 / 3, 0.0]))
    # The API's minimum (top_p > 0) can be below float32's smallest number: still a distribution.
    tiny = SequenceSampler(SamplingParams(top_p=5e-324, seed=0), 3)
    assert torch.equal(tiny.probabilities(torch.log(torch.tensor([0.3, 0.6, 0.1]))), torch.tensor([0.0, 1.0, 0.0]))
    assert tiny.choose(torch.log(torch.tensor([0.3, 0.6, 0.1]))).token == 1


def test_top_k():
    probs = SequenceSampler(SamplingParams(top_k=2), 4).probabilities(logits(1.0, 4.0, 3.0, 2.0))
    assert probs[0] == 0 and probs[3] == 0 and probs[1] > probs[2] > 0


def test_logprobs_and_top_logprobs():
    s = SequenceSampler(SamplingParams(temperature=0, logprobs=True, top_logprobs=2), 3)
    c = s.choose(logits(0.0, math.log(3.0), 0.0))
    assert math.isclose(c.logprob, math.log(0.6), rel_tol=1e-5)
    assert [t for t, _ in c.top] == [1, 0] or [t for t, _ in c.top] == [1, 2]


def test_sampling_follows_distribution():
    s = SequenceSampler(SamplingParams(temperature=1.0, seed=1), 2)
    lg = torch.log(torch.tensor([0.25, 0.75]))
    draws = [s.choose(lg).token for _ in range(4000)]
    assert abs(sum(draws) / 4000 - 0.75) < 0.03
