"PASER recovery-data selection (model_ops.compress.recovery) on tiny models (fast)."
import copy, math
import pytest
import torch

from model_ops.nn import tiny_model, tiny_tokenizer
from model_ops.prune import magnitude
from model_ops.compress import paser_select, random_select, skill_pool, Selection
from model_ops.compress.recovery import allocate, spectral_clusters, kmeans, token_jsd, sample_jsd, concepts, ConceptGraph, _tokenize


@pytest.fixture(scope="module")
def setup():
    dense, tok = tiny_model("llama", num_hidden_layers=2), tiny_tokenizer()
    pruned = magnitude(copy.deepcopy(dense), sparsity=0.6)
    pool = skill_pool(5, seed=3)
    return dense, pruned, tok, pool, tiny_model("bert")


@pytest.mark.parametrize("budget", [1, 257, 1500])
def test_selection_holds_exactly_the_budget(setup, budget):
    dense, pruned, tok, pool, enc = setup
    sel = paser_select(pruned, dense, tok, pool, budget, n_clusters=3, encoder=enc, enc_tok=tok, max_len=48)
    assert sel.tokens == budget == sum(len(x) for x in sel.ids) == sum(sel.taken)
    assert len(set(sel.index)) == len(sel.index)
    full = _tokenize(tok, [p["text"] for p in pool])
    assert all(x == full[i][:len(x)] for i, x in zip(sel.index, sel.ids))        # prefixes of real candidates
    rnd = random_select(tok, pool, budget, seed=1)
    assert rnd.tokens == budget == sum(len(x) for x in rnd.ids)


def test_allocation_follows_the_measured_degradation(setup):
    dense, pruned, tok, pool, enc = setup
    sel = paser_select(pruned, dense, tok, pool, 1200, n_clusters=4, encoder=enc, enc_tok=tok, max_len=48)
    sizes = [len(x) for x in _tokenize(tok, [p["text"] for p in pool])]
    cap = [sum(n for n, l in zip(sizes, sel.labels) if l == c) for c in range(4)]
    assert sel.allocation == allocate(sel.degradation, 1200, capacity=cap)
    for c in range(4): assert math.isclose(sel.degradation[c], float(sel.jsd[sel.labels == c].mean()), rel_tol=1e-6)
    if all(a < c for a, c in zip(sel.allocation, cap)):
        assert all(abs(a - 1200 * d / sum(sel.degradation)) < 1 for a, d in zip(sel.allocation, sel.degradation))


def test_allocate_is_exact_and_proportional():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        s = torch.rand(int(torch.randint(1, 9, (1,), generator=g)), generator=g).tolist()
        B = int(torch.randint(1, 10_000, (1,), generator=g))
        sh = allocate(s, B)
        assert sum(sh) == B and all(abs(x - B * w / sum(s)) < 1 for x, w in zip(sh, s))
    assert allocate([1, 1, 2], 100, capacity=[10, 100, 100]) == [10, 30, 60]


def test_same_seed_same_selection_and_clusters_cover(setup):
    dense, pruned, tok, pool, enc = setup
    a = paser_select(pruned, dense, tok, pool, 900, n_clusters=5, encoder=enc, enc_tok=tok, max_len=48, seed=2)
    b = paser_select(pruned, dense, tok, pool, 900, n_clusters=5, encoder=enc, enc_tok=tok, max_len=48, seed=2)
    assert a.index == b.index and a.ids == b.ids and torch.equal(a.labels, b.labels)
    assert a.labels.shape == (len(pool),) and sorted(set(a.labels.tolist())) == list(range(5))
    assert random_select(tok, pool, 900, seed=4).index == random_select(tok, pool, 900, seed=4).index


def test_spectral_clustering_finds_separated_groups():
    g = torch.Generator().manual_seed(1)
    c = torch.randn(4, 8, generator=g) * 6
    X = torch.cat([m + 0.2 * torch.randn(20, 8, generator=g) for m in c]); truth = torch.arange(4).repeat_interleave(20)
    for f in (spectral_clusters, kmeans):
        lab = f(X, 4)
        assert len(set(zip(lab.tolist(), truth.tolist()))) == 4


def test_jsd_properties():
    a, b = torch.randn(2, 3, 17), torch.randn(2, 3, 17)
    p, q = a.softmax(-1), b.softmax(-1); m = (p + q) / 2
    ref = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(token_jsd(a, b), ref, atol=1e-5) and torch.allclose(token_jsd(a, b), token_jsd(b, a), atol=1e-6)
    m0, tok = tiny_model("llama", num_hidden_layers=1), tiny_tokenizer()
    assert sample_jsd(m0, m0, [[1, 2, 3, 4], [5, 6]]).abs().max() < 1e-6


def test_concept_graph_skips_a_conflicting_sample():
    tok = tiny_tokenizer()
    facts = ["Paris is the capital of France.", "Rome is the capital of Italy.", "Paris is the capital of Italy.", "Oslo is the capital of Norway."]
    n = [len(x) for x in _tokenize(tok, facts)]
    kw = dict(n_clusters=1, embeddings=torch.zeros(4, 2), jsd=torch.tensor([4.0, 3.0, 2.0, 1.0]))
    sel = paser_select(None, None, tok, facts, n[0] + n[1] + 3, **kw)
    assert sel.index == [0, 1, 3] and sel.rejected == [2]
    assert paser_select(None, None, tok, facts, n[0] + n[1] + 3, consistency=False, **kw).index == [0, 1, 2]
    g = ConceptGraph(); g.add(concepts(facts[0]))
    assert g.consistent(concepts(facts[1])) and concepts(facts[0]) == {"paris", "capital", "france"}


def test_clear_errors(setup):
    dense, pruned, tok, pool, enc = setup
    kw = dict(n_clusters=2, encoder=enc, enc_tok=tok)
    for budget in (0, -3, 2.5):
        with pytest.raises(ValueError, match="budget must be a positive number of tokens"): paser_select(pruned, dense, tok, pool, budget, **kw)
    with pytest.raises(ValueError, match="candidate pool is empty"): paser_select(pruned, dense, tok, [], 10, **kw)
    with pytest.raises(ValueError, match="candidate pool is empty"): random_select(tok, [], 10)
    with pytest.raises(ValueError, match="exceeds the candidate pool"): paser_select(pruned, dense, tok, pool, 10 ** 7, **kw)
    with pytest.raises(ValueError, match="n_clusters must be in 1..2"): paser_select(pruned, dense, tok, pool[:2], 5, n_clusters=3, encoder=enc, enc_tok=tok)
    with pytest.raises(ValueError, match="clustering must be"): paser_select(pruned, dense, tok, pool, 5, clustering="dbscan", **kw)
    with pytest.raises(ValueError, match="fewer than one window"): Selection([0], [[1, 2]], 2).windows(8)
