"Tests for model_ops.delta and model_ops.transfer (plain pytest; no fastcore star-import)."
import copy, json, math
import pytest, torch
from model_ops.delta import Delta, snapshot, content_fingerprint, module_tensors
from model_ops.nn import tiny_model
from model_ops.io import WeightStore, save_model


def bits(t):
    "Raw bytes of a tensor, for bit-exact comparisons (NaN-safe)"
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8)


def perturbed(model, seed=1, scale=0.01):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


@pytest.fixture(scope="module")
def trio():
    base = tiny_model("llama", seed=0)
    return base, perturbed(base, 1), perturbed(base, 2)


def test_between_equals_subtraction(trio):
    base, tuned, _ = trio
    d = Delta.between(base, tuned)
    sb, st = base.state_dict(), tuned.state_dict()
    assert len(d) > 0
    for n in d.names: assert torch.equal(d[n], st[n] - sb[n]), n
    d64 = Delta.between(base, tuned, dtype=torch.float64)
    for n in d64.names: assert torch.equal(d64[n], st[n].double() - sb[n].double())


def test_algebra(trio):
    base, t1, t2 = trio
    a, b = Delta.between(base, t1), Delta.between(base, t2)
    for n in a.names:
        assert torch.equal((a + b)[n], a[n] + b[n])
        assert torch.equal((a - b)[n], a[n] - b[n])
        assert torch.equal((-a)[n], -a[n])
        assert torch.equal((3 * a)[n], a[n] * 3)
    assert (a + b).base_fingerprint == a.base_fingerprint


def test_apply_revert_bit_exact(trio):
    base, tuned, _ = trio
    d = Delta.between(base, tuned)
    m = copy.deepcopy(base)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    h = d.apply(m, alpha=0.7)
    changed = [k for k, v in m.state_dict().items() if not torch.equal(v, ref[k])]
    assert changed, "apply changed nothing"
    h.revert()
    for k, v in m.state_dict().items(): assert torch.equal(bits(v), bits(ref[k])), k


def test_apply_alpha_one_recovers_tuned(trio):
    base, tuned, _ = trio
    d = Delta.between(base, tuned, dtype=torch.float64)
    m = copy.deepcopy(base)
    d.apply(m)
    st = tuned.state_dict()
    for k, v in m.state_dict().items():
        # float64 delta: base + (tuned - base) rounds back to tuned exactly
        assert torch.equal(v, st[k]), k


def test_foreign_base_refused(trio, tmp_path):
    base, tuned, _ = trio
    d = Delta.between(base, tuned)
    foreign = tiny_model("llama", seed=5)
    with pytest.raises(ValueError, match="different base"):
        d.apply(foreign)
    d2 = Delta.load(d.save(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match="different base"):
        d2.apply(foreign)
    ref = {k: v.clone() for k, v in foreign.state_dict().items()}
    d2.apply(foreign, force=True).revert()
    for k, v in foreign.state_dict().items(): assert torch.equal(v, ref[k])


def test_save_load_round_trip(trio, tmp_path):
    base, tuned, _ = trio
    d = Delta.between(base, tuned, meta=dict(note="x"))
    p = d.save(tmp_path / "sub")
    assert p.name == "delta.safetensors"
    e = Delta.load(tmp_path / "sub")
    assert e.names == d.names and e.meta == d.meta and e.base_fingerprint == d.base_fingerprint
    for n in d.names: assert torch.equal(bits(e[n]), bits(d[n]))


def test_snapshot_delta_and_revert(trio):
    base, _, _ = trio
    m = copy.deepcopy(base)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    name = "model.layers.1.mlp.down_proj.weight"
    s = snapshot(m, [name])
    assert s.names == [name]
    with torch.no_grad(): m.get_parameter(name).mul_(1.5)
    d = s.delta()
    assert torch.allclose(d[name], ref[name] * 0.5, atol=1e-6)
    assert s.changed() == [name]
    s.revert()
    for k, v in m.state_dict().items(): assert torch.equal(bits(v), bits(ref[k])), k
    # the delta applies back onto the reverted model (same base fingerprint)
    h = d.apply(m)
    assert torch.allclose(m.get_parameter(name), ref[name] * 1.5, atol=1e-6)
    h.revert()


def test_apply_to_stored_model(trio, tmp_path):
    base, tuned, _ = trio
    src = save_model(base, tmp_path / "base")
    d = Delta.between(src, tuned)
    out = d.apply(src, alpha=1.0, out=tmp_path / "out")
    s, st = WeightStore.open(out), WeightStore.open(src)
    tuned_sd = tuned.state_dict()
    for n in s.keys():
        exp = st[n] + d[n] if n in d else st[n]
        assert torch.equal(s[n], exp), n
        assert torch.allclose(s[n], tuned_sd[n], atol=1e-6)
    foreign = save_model(tiny_model("llama", seed=9), tmp_path / "foreign")
    with pytest.raises(ValueError, match="different base"):
        d.apply(foreign, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ---- compression ----
from model_ops.delta import magnitude, dare, quantize, low_rank, keep_count, Quantized, Sparse, LowRank


@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 0.5, 0.9])
def test_magnitude_keeps_exactly_k(trio, density):
    base, tuned, _ = trio
    d = Delta.between(base, tuned).sparsify(density)
    for n in d.names:
        numel = d[n].numel()
        assert int((d[n] != 0).sum()) == keep_count(numel, density) == max(1, int(density * numel + 1e-9))
        # the kept entries are the largest in magnitude
        full = Delta.between(base, tuned)[n].reshape(-1).abs()
        kept = full[d[n].reshape(-1) != 0]
        if kept.numel() < full.numel():
            assert kept.min() >= full[d[n].reshape(-1) == 0].max()


def test_dare_seeded_order_independent_and_density(trio):
    base, tuned, _ = trio
    d = Delta.between(base, tuned)
    a = d.sparsify(0.3, method="dare", seed=11)
    rev = Delta({n: d[n] for n in reversed(d.names)}).sparsify(0.3, method="dare", seed=11)
    b = d.select(include="mlp").sparsify(0.3, method="dare", seed=11)   # subset processed alone
    for n in d.names: assert torch.equal(a[n], rev[n])
    for n in b.names: assert torch.equal(a[n], b[n])
    c = d.sparsify(0.3, method="dare", seed=12)
    assert any(not torch.equal(a[n], c[n]) for n in d.names)
    kept = sum(int((a[n] != 0).sum()) for n in a.names)
    total = d.numel
    sd = math.sqrt(total * 0.3 * 0.7)
    assert abs(kept - 0.3 * total) < 5 * sd
    for n in a.names:   # kept values rescaled by 1/p
        m = a[n] != 0
        assert torch.allclose(a[n][m], d[n][m] / 0.3, rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_error_bounded(trio, bits):
    base, tuned, _ = trio
    d = Delta.between(base, tuned)
    q = d.quantize(bits)
    for n in d.names:
        p = q.tensors[n]
        assert isinstance(p, Quantized)
        scale = p.parts["scale"]
        err = (q[n] - d[n]).reshape(scale.numel(), -1).abs()
        assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all(), n
    assert q.report.bytes < q.report.dense_bytes / (3.5 if bits == 8 else 6)
    assert 0 < q.report.rel_error < (0.01 if bits == 8 else 0.15)


def test_low_rank_energy_bound_and_rank(trio):
    base, tuned, _ = trio
    d = Delta.between(base, tuned)
    for energy in (0.5, 0.9):
        lr = d.low_rank(energy=energy)
        for r in lr.report.rows:
            assert r["rel_error"] <= math.sqrt(1 - energy) + 1e-5, r
    x = torch.randn(30, 4) @ torch.randn(4, 20)
    f = low_rank(x, rank=4)
    assert isinstance(f, LowRank) and torch.allclose(f.dense(), x, atol=1e-4)


def test_packed_save_load_round_trip(trio, tmp_path):
    base, tuned, _ = trio
    d = Delta.between(base, tuned)
    for comp in (d.sparsify(0.2), d.quantize(4), d.low_rank(rank=2), d.sparsify(0.5, method="dare", seed=1)):
        e = Delta.load(comp.save(tmp_path / "c.safetensors"))
        for n in comp.names:
            assert type(e.tensors[n]) is type(comp.tensors[n])
            assert torch.equal(e[n], comp[n])
        assert e.base_fingerprint == d.base_fingerprint


def test_cosine_and_norms(trio):
    base, t1, t2 = trio
    a, b = Delta.between(base, t1), Delta.between(base, t2)
    assert abs(a.cosine(2 * a, by="all") - 1) < 1e-9
    c = a.cosine(b, by="tensor")
    n = a.names[3]
    ref = torch.nn.functional.cosine_similarity(a[n].reshape(1, -1).double(), b[n].reshape(1, -1).double()).item()
    assert abs(c[n] - ref) < 1e-9
    assert abs(a.norms("all") - math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in a.names))) < 1e-9


# ---- transfer ----
from model_ops.transfer import transfer, diff, flip_metrics, weight_signature, cli_transfer, cli_diff


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    d = tmp_path_factory.mktemp("versions")
    sb = tiny_model("llama", seed=0)
    st, tb = perturbed(sb, 1, 0.02), perturbed(sb, 2, 0.005)
    tb_bf16 = copy.deepcopy(tb).to(torch.bfloat16)
    paths = dict(sb=save_model(sb, d / "sb"), st=save_model(st, d / "st"), tb=save_model(tb, d / "tb"),
                 tb16=save_model(tb_bf16, d / "tb16", max_shard_size="20KB"))
    return d, paths


@pytest.mark.parametrize("alpha", [1.0, 0.5, -0.3])
@pytest.mark.parametrize("tgt", ["tb", "tb16"])
def test_transfer_exact_every_tensor(versions, alpha, tgt):
    d, p = versions
    out = transfer(p["sb"], p["st"], p[tgt], out=d / f"out_{tgt}_{alpha}", alpha=alpha)
    S, B, T, G = (WeightStore.open(x) for x in (out, p["sb"], p["st"], p[tgt]))
    assert S.keys() == G.keys()
    for n in G.keys():
        exp = (G[n].double() + alpha * (T[n].double() - B[n].double())).to(G.dtype(n))
        assert S.dtype(n) == G.dtype(n)
        assert torch.equal(bits(S[n]), bits(exp)), n
    assert json.loads((out / "config.json").read_text())["vocab_size"] == G.config["vocab_size"]


def test_transfer_in_memory_matches_stored(versions):
    d, p = versions
    sd = transfer(p["sb"], p["st"], p["tb"])
    S = WeightStore.open(transfer(p["sb"], p["st"], p["tb"], out=d / "mem_vs_disk"))
    for n in S.keys(): assert torch.equal(S[n], sd[n])


def test_transfer_shape_errors_and_vocab_policies(versions, tmp_path):
    d, p = versions
    wide = tiny_model("llama", seed=0, intermediate_size=96)
    with pytest.raises(ValueError, match=r"mlp.*shape.*same architecture"):
        transfer(p["sb"], p["st"], wide, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    G = WeightStore.open(p["tb"]); B = WeightStore.open(p["sb"])
    big = {k: v.clone() for k, v in WeightStore.open(p["st"]).items()}
    e, h = "model.embed_tokens.weight", "lm_head.weight"
    for k in (e, h): big[k] = torch.cat([big[k], torch.randn(3, big[k].shape[1])])
    with pytest.raises(ValueError, match="vocab='pad_zero'"):
        transfer(p["sb"], big, p["tb"])
    r = transfer(p["sb"], big, p["tb"], vocab="pad_zero")
    for k in (e, h):
        assert r[k].shape[0] == G.shape(k)[0] + 3
        assert torch.equal(r[k][-3:], big[k][-3:])
        assert torch.equal(r[k][:-3], (G[k].double() + big[k][:-3].double() - B[k].double()).float())
    r = transfer(p["sb"], big, p["tb"], vocab="skip_embed")
    assert torch.equal(r[e], G[e]) and torch.equal(r[h], G[h])
    r = transfer(p["sb"], big, p["tb"], vocab={5: G.shape(e)[0] + 1}, alpha=1.0)
    assert torch.equal(r[e][5], big[e][G.shape(e)[0] + 1]) and torch.equal(r[e][6:], G[e][6:])


def test_diff_bump_rules(versions, tmp_path):
    d, p = versions
    assert diff(p["sb"], p["st"]).bump == "minor"
    assert diff(p["tb"], p["tb16"]).bump == "minor"         # dtype change
    assert diff(p["sb"], p["sb"]).bump == "none"
    wide = save_model(tiny_model("llama", seed=0, intermediate_size=96), tmp_path / "wide")
    r = diff(p["sb"], wide)
    assert r.bump == "major" and r.reshaped and "intermediate_size" in r.config_changes
    r = diff(p["sb"], p["st"])
    n = "model.layers.0.mlp.up_proj.weight"
    A, B = WeightStore.open(p["sb"]), WeightStore.open(p["st"])
    assert abs(r.rel_change[n] - float((B[n].double() - A[n].double()).norm() / A[n].double().norm())) < 1e-9


def test_flip_metrics_against_hand_count():
    import random
    from scipy.stats import binomtest
    rnd = random.Random(0)
    y = [rnd.randrange(4) for _ in range(200)]
    old = [t if rnd.random() < 0.7 else rnd.randrange(4) for t in y]
    new = [t if rnd.random() < 0.6 else rnd.randrange(4) for t in y]
    m = flip_metrics(y, old, new)
    nf = sum(o == t != n for t, o, n in zip(y, old, new))
    pf = sum(n == t != o for t, o, n in zip(y, old, new))
    inc = sum(o != t and n != t and o != n for t, o, n in zip(y, old, new))
    assert (m["negative_flips"], m["positive_flips"], m["both_wrong_different"]) == (nf, pf, inc)
    assert m["NFR"] == nf / 200 and m["PFR"] == pf / 200 and m["inconsistent_errors"] == inc / 200
    assert abs(m["acc_new"] - m["acc_old"] - (m["PFR"] - m["NFR"])) < 1e-12
    assert m["mcnemar_p"] == pytest.approx(binomtest(nf, nf + pf, 0.5).pvalue)


def test_weight_signature_projection_and_removal(versions):
    d, p = versions
    pre = tiny_model("llama", seed=0)
    clean, robust = perturbed(pre, 3, 0.01), perturbed(pre, 4, 0.01)
    sig = weight_signature(pre, robust, clean, shallow=1, bits=None)
    assert sig.names and all(".layers.0." in n for n in sig.names)
    cl = Delta.between(pre, clean)
    for n in sig.names:
        assert abs(float((sig[n].double() * cl[n].double()).sum())) < 1e-6 * float(sig[n].norm() * cl[n].norm() + 1e-12)
    q = weight_signature(pre, robust, clean, shallow=1, bits=8)
    assert q.storage_bytes() < sig.storage_bytes() / 3.5
    m = copy.deepcopy(clean)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    h = q.apply(m, alpha=2.0)
    assert not torch.equal(m.state_dict()[sig.names[0]], ref[sig.names[0]])
    h.revert()
    for k, v in m.state_dict().items(): assert torch.equal(v, ref[k])


def test_cli(versions, tmp_path, capsys):
    d, p = versions
    out = cli_transfer(str(p["sb"]), str(p["st"]), str(p["tb"]), str(tmp_path / "o"), alpha=2.0)
    S, B, T, G = (WeightStore.open(x) for x in (out, p["sb"], p["st"], p["tb"]))
    for n in G.keys(): assert torch.equal(S[n], (G[n].double() + 2.0 * (T[n].double() - B[n].double())).float())
    r = cli_diff(str(p["tb"]), str(out))
    txt = capsys.readouterr().out
    assert r.bump == "minor" and "MINOR" in txt and "rule:" in txt


def test_transfer_chunked_rows_identical(versions, monkeypatch):
    import model_ops.transfer as tr
    d, p = versions
    ref = transfer(p["sb"], p["st"], p["tb16"], alpha=0.7)
    monkeypatch.setattr(tr, "CHUNK", 100)     # force row-block computation for every 2-D tensor
    got = transfer(p["sb"], p["st"], p["tb16"], alpha=0.7)
    for n in ref: assert torch.equal(bits(got[n]), bits(ref[n])), n


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_other_architectures_apply_revert(arch, tmp_path):
    base = tiny_model(arch, seed=0)
    tuned = perturbed(base, 1)
    d = Delta.between(base, tuned)
    assert d.names and not any(n == "lm_head.weight" for n in d.names if arch == "gpt2")   # tied head once
    m = copy.deepcopy(base)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    h = d.apply(m)
    for k, v in m.state_dict().items():
        if v.is_floating_point(): assert torch.allclose(v, tuned.state_dict()[k], atol=1e-6), k
    h.revert()
    for k, v in m.state_dict().items(): assert torch.equal(bits(v), bits(ref[k])), k
    # stored round trip through a folder (tied weights absent on disk)
    src = save_model(base, tmp_path / "b")
    out = d.apply(src, out=tmp_path / "o")
    S = WeightStore.open(out)
    for n in S.keys():
        if S[n].is_floating_point(): assert torch.allclose(S[n], tuned.state_dict()[n], atol=1e-6), n


def test_transfer_selected_tensors_only(versions):
    d, p = versions
    r = transfer(p["sb"], p["st"], p["tb"], layers=[1], include=r"\.mlp\.")
    B, T, G = (WeightStore.open(p[k]) for k in ("sb", "st", "tb"))
    moved = [n for n in G.keys() if not torch.equal(r[n], G[n])]
    assert moved and all(".layers.1.mlp." in n for n in moved)
    for n in moved: assert torch.equal(r[n], (G[n].double() + T[n].double() - B[n].double()).float())


def test_diff_header_only(versions):
    d, p = versions
    assert diff(p["sb"], p["st"], values=False).bump == "minor"
    assert diff(p["sb"], p["sb"], values=False).bump == "none"
    r = diff(p["sb"], p["st"], values=False)
    assert r.rel_change == {} and "sampled rows" in r.reason


def test_transfer_never_overwrites_an_input(tmp_path):
    "An output that is an input, holds one or lies inside one is refused before anything is read, even with overwrite=True (links followed)."
    import hashlib
    sb = tiny_model("llama", seed=0)
    p = dict(sb=save_model(sb, tmp_path / "in" / "sb"), st=save_model(perturbed(sb, 1, 0.02), tmp_path / "in" / "st"),
             tb=save_model(perturbed(sb, 2, 0.005), tmp_path / "in" / "tb"))
    (tmp_path / "link").symlink_to(tmp_path / "in")
    snap = lambda: {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((tmp_path / "in").rglob("*")) if f.is_file()}
    before = snap()
    for out, says in [(tmp_path / "in", "contains the input"), (tmp_path, "contains the input"), (p["tb"], "is the input"),
                      (p["sb"], "is the input"), (p["st"] / "sub", "lies inside the input"), (tmp_path / "link" / "st", "is the input")]:
        with pytest.raises(ValueError, match=says): transfer(p["sb"], p["st"], p["tb"], out=out, overwrite=True)
        with pytest.raises(ValueError, match=says): cli_transfer(str(p["sb"]), str(p["st"]), str(p["tb"]), str(out), overwrite=True)
        assert snap() == before
    assert transfer(p["sb"], p["st"], p["tb"], out=tmp_path / "out").is_dir()      # a sibling folder is fine
