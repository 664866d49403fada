import torch

from oracle.engine.sampler import SamplingParams, SequenceSampler
from oracle.engine.speculative import NgramDrafter, SpeculationState


def chi_square_p(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of ``observed`` counts against ``expected_probs``
    (categories with an expected count under 5 are pooled)."""
    n = observed.sum()
    expected = expected_probs * n
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2) / exp)[keep].sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), stat / 2))


def test_rejection_sampling_keeps_the_target_distribution():
    """Whatever the drafter proposes (deterministic or with its own distribution q), emitted
    tokens follow the target distribution p. 20,000 draws; significance 0.001."""
    logits = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, -3.0])
    params = SamplingParams(temperature=0.8, seed=1)
    sampler = SequenceSampler(params, 6)
    p = sampler.probabilities(sampler.adjusted(logits))
    q = torch.softmax(torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0, 1.0]), dim=-1)
    for draft, q_dist in [(0, None), (4, None), (1, q)]:
        counts = torch.zeros(6)
        accepted = 0
        for _ in range(20000):
            proposal = draft if q_dist is None else int(torch.multinomial(q_dist, 1, generator=sampler.generator))
            choice, ok = sampler.verify(logits, proposal, q_dist)
            counts[choice.token] += 1
            accepted += ok
        assert chi_square_p(counts, p) > 0.001, (draft, counts / counts.sum(), p)
        if q_dist is None:  # a one-hot draft is accepted with probability p(draft)
            assert abs(accepted / 20000 - float(p[draft])) < 0.02


def test_greedy_verification_accepts_exactly_the_argmax():
    sampler = SequenceSampler(SamplingParams(temperature=0, logprobs=True), 4)
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    choice, ok = sampler.verify(logits, 1)
    assert ok and choice.token == 1 and choice.logprob == float(torch.log_softmax(logits, -1)[1])
    choice, ok = sampler.verify(logits, 2)
    assert not ok and choice.token == 1


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter(max_ngram=3)
    tokens = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 3, 4, 5, 6, 7]
    assert d.lookup(tokens, 3).tokens == [3, 4, 5]  # the latest earlier "5 6 7" was followed by 3 4 5
    assert d.lookup([1, 2, 3], 4) is None
    assert d.lookup([1, 2, 1], 4).tokens == [2, 1]  # unigram match, as much as there is


def test_draft_length_adapts_and_pauses_when_drafts_fail():
    s = SpeculationState(k=4, k_max=8, patience=3, pause=5)
    s.update(4, 4, 5)
    assert s.wanted() == 6
    s.update(6, 1, 2)
    assert s.wanted() == 2
    for _ in range(3):
        s.update(2, 0, 1)
    assert [s.wanted() for _ in range(6)] == [0] * 5 + [1]
    assert s.stats.passes == 5 and s.stats.accepted == 5 and s.stats.emitted == 10
