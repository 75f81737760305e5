"Tests for model_ops.unlearn: loss formulas against reference transcriptions, effect of each method, exact revert, errors."
import numpy as np, pytest, torch
import torch.nn.functional as F
from torch import nn
from model_ops.nn import tiny_model, tiny_tokenizer
from model_ops.unlearn import (gradient_ascent, grad_diff, npo, simnpo, rmu, negate, relabel, finetune, evaluate_unlearning,
                               fictitious_facts, encode_examples, make_batches, collate, sequence_nll, npo_loss, simnpo_loss,
                               kl_loss, activation_loss, mia_auc, truth_ratios, forget_quality, example_scores, demo_step,
                               relabel_targets, unseen_facts, freeze_guard, FreezeGuard)

LM_METHODS = [gradient_ascent, grad_diff, npo, simnpo, rmu, negate]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny models run faster on one thread than on two contended ones; restored after this module."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def taught():
    "A tiny llama that has learned 8 short facts exactly; 2 are to be forgotten."
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_model("llama", hidden_size=96, intermediate_size=192)
    facts = fictitious_facts()
    short = [dict(prompt=f["prompt"].split("Question: ")[1].split("\n")[0][:24] + ":", answer=f["answer"],
                  perturbed_answers=f["perturbed_answers"]) for f in facts[::5][:8]]
    rec = finetune(model, tok, data=short, lr=3e-3, epochs=300, until_acc=1.0, batch_size=8, check_every=10)
    assert rec.checks[-1]["forget_acc"] == 1.0
    return model, tok, short[:2], short[2:]


def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}
def same(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- pure losses against transcriptions of the reference implementations ----

def test_losses_match_reference_formulas():
    g = torch.Generator().manual_seed(1)
    lg, ref = torch.randn(4, 9, 13, generator=g), torch.randn(4, 9, 13, generator=g)
    lb = torch.randint(0, 13, (4, 9), generator=g); lb[:, :4] = -100; lb[3, 7:] = -100
    # compute_batch_nll: shifted CE, reduction none, summed per sequence
    ce = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    ref_nll = ce(lg[..., :-1, :].transpose(-1, -2), lb[..., 1:]).sum(-1)
    nll, n = sequence_nll(lg, lb)
    torch.testing.assert_close(nll, ref_nll)
    assert n.tolist() == [5, 5, 5, 3]
    rnll, _ = sequence_nll(ref, lb)
    # compute_dpo_loss(win=None, lose=forget): -2/β logσ(β(0 - lose_log_ratio)), lose_log_ratio = -(nll - ref_nll)
    beta = 0.1
    torch.testing.assert_close(npo_loss(nll, rnll, beta), -2 / beta * F.logsigmoid(beta * (0 - (-(nll - rnll)))).mean())
    # SimNPO: loss_mask from unshifted labels equals the shifted count when the first label is -100
    mask_count = (lb != -100).sum(-1)
    torch.testing.assert_close(simnpo_loss(nll, n, 4.5, 0.3), -F.logsigmoid(4.5 * (nll / mask_count - 0.3)).mean() * 2 / 4.5)
    # compute_kl_divergence: kl_div(log p_θ, log p_ref, batchmean, log_target) over flattened positions
    kd = F.kl_div(F.log_softmax(lg, -1).view(-1, 13), F.log_softmax(ref, -1).view(-1, 13), reduction="batchmean",
                  log_target=True)
    torch.testing.assert_close(kl_loss(lg, ref), kd)
    # RMU compute_activation_loss, as written: a [b] sum divided by a [b, 1] count broadcasts to [b, b], i.e.
    # mean(sum) * mean(1/count); equal to the intended per-sequence mean when every row counts the same tokens
    a, t = torch.randn(4, 9, 6, generator=g), torch.randn(1, 1, 6, generator=g)
    literal = lambda a, t, m: ((F.mse_loss(a, t.expand_as(a), reduction="none") * m.unsqueeze(-1)).mean(dim=2).sum(dim=1)
                               / m.sum(-1, keepdim=True)).mean()
    m_eq = torch.ones(4, 9, dtype=torch.bool); m_eq[:, :3] = False
    torch.testing.assert_close(activation_loss(a, t, m_eq), literal(a, t, m_eq))
    m = lb != -100                                         # unequal counts: we use the per-sequence mean
    sq = F.mse_loss(a, t.expand_as(a), reduction="none")
    want = ((sq * m.unsqueeze(-1)).mean(dim=2).sum(dim=1) / m.sum(-1)).mean()
    torch.testing.assert_close(activation_loss(a, t, m), want)


def test_prompt_tokens_are_not_scored():
    tok = tiny_tokenizer()
    (e,) = encode_examples(tok, [dict(prompt="Q: x?\nA:", answer=" yes")])
    assert e["labels"] == [-100] * len("Q: x?\nA:") + list(b" yes")
    (s,) = encode_examples(tok, ["plain text"])
    assert s["labels"] == s["input_ids"]
    b = collate(encode_examples(tok, ["ab", "abcd"]), pad_id=256)
    assert b["labels"][0].tolist() == [97, 98, -100, -100] and b["attention_mask"][0].tolist() == [1, 1, 0, 0]


def test_mia_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    f, h = rng.normal(0, 1, 30), rng.normal(0.5, 1, 20)
    f[:5] = h[:5]  # ties
    want = roc_auc_score(np.r_[np.zeros(30), np.ones(20)], np.r_[f, h])
    assert mia_auc(f, h) == pytest.approx(want, abs=1e-12)


def test_truth_ratio_and_forget_quality(taught):
    model, tok, forget, retain = taught
    tr = truth_ratios(model, tok, forget)
    for e, r in zip(forget, tr):
        pc = example_scores(model, make_batches(tok, [e]))["prob"][0]
        pw = example_scores(model, make_batches(tok, [dict(prompt=e["prompt"], answer=a) for a in e["perturbed_answers"]]))
        wrong = torch.exp(-(pw["nll"] / pw["n"]).mean())  # geometric mean of normalised probabilities
        assert r == pytest.approx(float(wrong / pc), rel=1e-4)
    from scipy.stats import ks_2samp
    a, b = np.array([0.1, 0.5, 0.9]), np.array([0.2, 0.3, 2.0])
    assert forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)


# ---- methods on the taught tiny model ----

@pytest.mark.parametrize("method", LM_METHODS, ids=lambda f: f.__name__)
def test_method_lowers_forget_and_reverts_exactly(taught, method):
    model, tok, forget, retain = taught
    s0 = state(model)
    before = evaluate_unlearning(model, tok, forget=forget, retain=retain, texts=False)
    rec = method(model, tok, forget=forget, retain=retain, lr=3e-3, epochs=10 if method is negate else 20, batch_size=4)
    after = evaluate_unlearning(model, tok, forget=forget, retain=retain, texts=False)
    assert after["forget_prob"] < 0.7 * before["forget_prob"]
    assert rec.history and all(np.isfinite(rec.losses))
    # the delta is exactly the change of the trained tensors; nothing else moved
    cur, d = state(model), rec.delta
    for k in s0:
        if k in d.names: torch.testing.assert_close(d[k], cur[k] - s0[k], rtol=0, atol=1e-6)
        else: assert torch.equal(cur[k], s0[k]), k
    rec.revert()
    assert same(state(model), s0)
    assert evaluate_unlearning(model, tok, forget=forget, retain=retain, texts=False) == before


@pytest.mark.parametrize("retain_loss", ["nll", "kl"])
def test_retain_term_holds_retain(taught, retain_loss):
    model, tok, forget, retain = taught
    before = evaluate_unlearning(model, tok, forget=forget, retain=retain, texts=False)
    ga = gradient_ascent(model, tok, forget=forget, retain=retain, lr=3e-3, epochs=20, batch_size=4)
    ga_r = ga.checks[-1]["retain_prob"]; ga.revert()
    gd = grad_diff(model, tok, forget=forget, retain=retain, lr=3e-3, epochs=20, batch_size=4, retain_loss=retain_loss)
    gd_c = gd.checks[-1]; gd.revert()
    assert gd_c["forget_prob"] < 0.01 * before["forget_prob"]
    assert ga_r < 0.05 * before["retain_prob"]          # gradient ascent destroys the retained facts
    assert gd_c["retain_prob"] > 0.5 * before["retain_prob"] > 10 * ga_r


def test_rmu_trains_only_down_projections(taught):
    model, tok, forget, retain = taught
    rec = rmu(model, tok, forget=forget, retain=retain, lr=3e-3, epochs=5, batch_size=4)
    assert rec.names == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert rec.hparams["layer"] == 1 and rec.hparams["steering_coeff"] == 2.0
    rec.revert()


def test_rmu_positions(taught):
    model, tok, forget, retain = taught
    with pytest.raises(ValueError, match="positions"): rmu(model, tok, forget=forget, positions="all")
    s0 = state(model)
    before = evaluate_unlearning(model, tok, forget=forget, texts=False)["forget_prob"]
    rec = rmu(model, tok, forget=forget, retain=retain, lr=3e-3, epochs=10, batch_size=4, positions="predict")
    assert rec.checks[-1]["forget_prob"] < 0.7 * before and rec.hparams["positions"] == "predict"
    rec.revert()
    assert same(state(model), s0)


def test_defaults_follow_open_unlearning(taught):
    import inspect
    p = lambda f, k: inspect.signature(f).parameters[k].default
    assert (p(npo, "beta"), p(npo, "gamma"), p(npo, "alpha"), p(npo, "retain_loss")) == (0.1, 1.0, 1.0, "nll")
    assert (p(simnpo, "beta"), p(simnpo, "delta"), p(simnpo, "gamma"), p(simnpo, "alpha")) == (4.5, 0.0, 0.125, 1.0)
    assert (p(grad_diff, "gamma"), p(grad_diff, "alpha")) == (1.0, 1.0)
    assert (p(rmu, "steering_coeff"), p(rmu, "lr")) == (2.0, 5e-5)
    model, tok, forget, retain = taught
    rec = npo(model, tok, forget=forget, epochs=1)
    assert rec.hparams["lr"] == 1e-5 and rec.hparams["beta"] == 0.1
    rec.revert()


def test_early_stop(taught):
    model, tok, forget, retain = taught
    rec = npo(model, tok, forget=forget, retain=retain, lr=1e-3, epochs=50, batch_size=4, stop_ratio=0.1, check_every=1)
    assert rec.stopped_early and len(rec.history) < 50
    assert rec.checks[-1]["forget_prob"] <= 0.1 * rec.checks[0]["forget_prob"] < rec.checks[-2]["forget_prob"]
    rec.revert()


def test_dataloader_gives_same_run(taught):
    model, tok, forget, retain = taught
    from torch.utils.data import DataLoader
    dl = DataLoader(encode_examples(tok, forget), batch_size=4, collate_fn=lambda b: collate(b, tok.pad_token_id))
    r1 = npo(model, tok, forget=forget, lr=1e-3, epochs=3, batch_size=4); d1 = r1.delta; r1.revert()
    r2 = npo(model, tok, forget=dl, lr=1e-3, epochs=3); d2 = r2.delta; r2.revert()
    assert r1.losses == r2.losses and all(torch.equal(d1[k], d2[k]) for k in d1.names)


def test_bad_inputs_fail_clearly(taught):
    model, tok, forget, retain = taught
    s0 = state(model)
    with pytest.raises(ValueError, match="empty"): npo(model, tok, forget=[])
    with pytest.raises(ValueError, match="'answer'"): npo(model, tok, forget=[{"prompt": "Who?"}])
    with pytest.raises(ValueError, match="empty answer"): npo(model, tok, forget=[{"prompt": "Who?", "answer": ""}])
    with pytest.raises(ValueError, match="retain"): grad_diff(model, tok, forget=forget)
    with pytest.raises(ValueError, match="tokenizer"):
        npo(tiny_model("llama", vocab_size=200, pad_token_id=0, bos_token_id=1, eos_token_id=2), tok, forget=forget)
    with pytest.raises(ValueError, match="retain_loss"): grad_diff(model, tok, forget=forget, retain=retain, retain_loss="l2")
    with pytest.raises(TypeError, match="unexpected"): npo(model, tok, forget=forget, learning_rate=1e-3)
    with pytest.raises(TypeError, match="classifiers"): relabel(model, tok, forget=forget)
    with pytest.raises(ValueError, match="tokenizer"): npo(model, None, forget=forget)
    assert same(state(model), s0)


def test_failure_midway_reverts(taught):
    model, tok, forget, retain = taught
    s0 = state(model)
    def boom(msg):
        if "step 1" in msg: raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        npo(model, tok, forget=forget, lr=1e-2, epochs=5, check_every=1, log=boom)
    assert same(state(model), s0)


def test_demo_step_leaves_model_unchanged(taught):
    model, tok, forget, retain = taught
    s0, lines = state(model), []
    out = demo_step(model, tok, log=lines.append)
    assert same(state(model), s0) and lines[-1] == "unlearn: reverted"
    assert out["forget_prob_after"] < out["forget_prob_before"] and out["steps"] >= 1


# ---- class unlearning on a classifier ----

@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split((X / 16).astype("float32"), y, test_size=0.3, random_state=0, stratify=y)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(mlp.parameters(), 1e-2)
    xt, yt = torch.tensor(Xtr), torch.tensor(ytr)
    for _ in range(30):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad(); F.cross_entropy(mlp(xt[idx]), yt[idx]).backward(); opt.step()
    return mlp, Xtr, Xte, ytr, yte


@pytest.mark.parametrize("mode", ["random", "targeted"])
def test_class_unlearning_digits(digits, mode):
    mlp, Xtr, Xte, ytr, yte = digits
    c, s0 = 3, state(mlp)
    test = lambda: evaluate_unlearning(mlp, forget=(Xte[yte == c], yte[yte == c]), retain=(Xte[yte != c], yte[yte != c]))
    base = test()
    assert base["forget_acc"] > 0.9
    rec = relabel(mlp, forget=(Xtr[ytr == c], ytr[ytr == c]), retain=(Xtr[ytr != c], ytr[ytr != c]), mode=mode)
    m = test()
    assert m["forget_acc"] <= 0.05                         # the forgotten class is no longer recognised (test split)
    assert m["retain_acc"] >= base["retain_acc"] - 0.03    # the others keep their accuracy within 3 points
    if mode == "targeted": assert rec.hparams["target_class"] != c
    rec.revert()
    assert same(state(mlp), s0)


def test_relabel_targets():
    mlp = nn.Linear(4, 5)
    x, y = torch.randn(200, 4), torch.randint(0, 5, (200,))
    ((_, r),) = relabel_targets(mlp, [(x, y)], "random", seed=0)
    assert (r != y).all() and set(r.tolist()) == set(range(5))
    ((_, t),) = relabel_targets(mlp, [(x, y)], "targeted", target_class=2)
    assert (t == 2).all()
    with pytest.raises(ValueError, match="mode"): relabel_targets(mlp, [(x, y)], "shuffle")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(taught):
    model, tok, forget, retain = taught
    import copy
    m = copy.deepcopy(model).cuda()
    s0 = state(m)
    before = evaluate_unlearning(m, tok, forget=forget, retain=retain, texts=False)
    for f in (npo, rmu, grad_diff):
        rec = f(m, tok, forget=forget, retain=retain, lr=3e-3, epochs=10, batch_size=4, retain_loss="kl") if f is grad_diff \
            else f(m, tok, forget=forget, retain=retain, lr=3e-3, epochs=10, batch_size=4)
        assert rec.checks[-1]["forget_prob"] < before["forget_prob"]
        assert rec.delta[rec.names[0]].device.type == "cuda"
        rec.revert()
        assert same(state(m), s0)


def test_evaluate_unlearning_lm_metrics(taught):
    from model_ops.eval import perplexity
    model, tok, forget, retain = taught
    holdout = [dict(prompt="Where was Nobody Atall:", answer=" Nowhere"), dict(prompt="Which dog has Anon Y:", answer=" Rex")]
    texts = ["The quick brown fox jumps over the lazy dog.", "A second short sentence of plain text."]
    m = evaluate_unlearning(model, tok, forget=forget, retain=retain, holdout=holdout, texts=texts, retain_model=model)
    assert m["ppl"] == pytest.approx(perplexity(model, tok, texts, max_length=128))
    assert m["forget_acc"] == 1.0 and m["retain_acc"] == 1.0
    assert m["mia_auc"] == 1.0                          # learned facts have far lower loss than unseen ones
    assert m["forget_quality"] == pytest.approx(1.0)    # identical truth ratios: indistinguishable
    s = example_scores(model, make_batches(tok, forget))
    assert m["forget_prob"] == pytest.approx(float(torch.exp(-s["nll"] / s["n"]).mean()))


def test_unseen_facts_are_new_people_of_the_same_kinds():
    facts, unseen = fictitious_facts(), unseen_facts()
    person = lambda f: f["prompt"].split("\n")[0]
    assert len(unseen) >= 10 and not {person(f) for f in unseen} & {person(f) for f in facts}
    assert {f["kind"] for f in unseen} == {f["kind"] for f in facts}
    assert {f["answer"] for f in unseen} <= {f["answer"] for f in facts}   # same answer pools: only membership differs
    assert all(f["answer"] not in f["perturbed_answers"] and len(f["perturbed_answers"]) == 3 for f in unseen)


def test_freeze_guard_freezes_exactly_what_it_chose(taught):
    import copy
    model, tok, forget, retain = taught
    g = freeze_guard(model, tok, forbidden=forget, allowed=retain, frac=0.1)
    assert isinstance(g, FreezeGuard) and g.frac == pytest.approx(0.1, abs=0.01)
    m = copy.deepcopy(model); g.apply(m)
    finetune(m, tok, data=retain[:2] + forget, lr=1e-2, epochs=3, until_acc=None)
    g.remove()
    n0 = dict(model.named_parameters())
    moved = 0
    for n, p in m.named_parameters():
        assert torch.equal(p.data[g.masks[n]], n0[n].data[g.masks[n]]), n     # frozen elements untouched
        moved += int((p.data != n0[n].data)[~g.masks[n]].sum())
    assert moved > 0                                                           # the rest did train
    assert not g.hooks
    with pytest.raises(ValueError, match="frac"): freeze_guard(model, tok, forbidden=forget, allowed=retain, frac=0)
    with pytest.raises(ValueError, match="no parameter"): g.apply(nn.Linear(2, 2))
