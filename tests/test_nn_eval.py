"Property and edge-case tests for model_ops.nn and model_ops.eval (tiny models only; fast)."
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model_ops.nn import (tiny_model, tiny_tokenizer, TINY_ARCHS, arch_spec, decoder_layers, layers_prefix,
                          mlp_down, mlp_up, weight_2d, is_conv1d, capture, load_model)
from model_ops.eval import (perplexity, nll, target_logprob, top1, generate, ngram_entropy, default_texts,
                            load_texts, encode)

TOK = tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_tokenizer_roundtrip(s):
    assert TOK.decode(TOK(s).input_ids) == s


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_deterministic_and_distinct(arch):
    a, b = tiny_model(arch).state_dict(), tiny_model(arch).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = tiny_model(arch, seed=1).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert tiny_model(arch).config.vocab_size >= len(TOK)


def test_archs_have_distinct_shapes():
    shapes = {arch: tuple(sorted((k, tuple(v.shape)) for k, v in tiny_model(arch).state_dict().items()))
              for arch in TINY_ARCHS}
    assert len(set(shapes.values())) == len(TINY_ARCHS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_arch_spec_names_resolve_to_parameters(arch):
    m = tiny_model(arch)
    spec = arch_spec(m)
    params = dict(m.named_parameters())
    for i in range(spec.n_layers):
        for role in list(spec.attn) + list(spec.mlp):
            assert spec.block(i, role) + ".weight" in params
    assert f"{layers_prefix(m)}.0" in dict(m.named_modules())
    assert len(decoder_layers(m)) == spec.n_layers


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_weight_2d_matches_forward(arch):
    m = tiny_model(arch)
    for mod in (mlp_down(m, 0), mlp_up(m, 1)):
        w = weight_2d(mod)
        x = torch.randn(5, w.shape[1])
        b = mod.bias if mod.bias is not None else 0
        torch.testing.assert_close(mod(x), x @ w.T + b, rtol=1e-5, atol=1e-6)
        assert is_conv1d(mod) == (arch == "gpt2")


def test_capture_records_every_call_and_removes_hooks(llama):
    mod = mlp_up(llama, 1)
    ids = TOK(["abc", "defg"], padding=True, return_tensors="pt").input_ids
    with capture(mod, outputs=False) as cap:
        llama(ids)
        llama(ids[:1])
    assert [t.shape[0] for t in cap.inputs] == [2, 1] and cap.outputs == []
    assert not mod._forward_hooks


def _ref_ppl(model, tok, texts):
    tot, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t).input_ids])
        with torch.no_grad():
            lp = model(ids).logits[0, :-1].double().log_softmax(-1)
        tot -= lp.gather(1, ids[0, 1:, None]).sum().item()
        n += ids.shape[1] - 1
    return math.exp(tot / n)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_perplexity_matches_unbatched_reference(arch):
    m = tiny_model(arch, initializer_range=0.2)     # a peaked model, so errors would show
    texts = [t[:k] for t, k in zip(default_texts(5, seed=7), (90, 10, 55, 2, 70))]
    got = perplexity(m, TOK, texts, max_length=128, batch_size=2)
    ref = _ref_ppl(m, TOK, texts)
    assert abs(got - ref) / ref < 1e-5, (got, ref)


def test_perplexity_ignores_pad_id_value(llama):
    # the pad id must never matter: a tokenizer whose pad is another id gives the same number
    texts = ["short", "a rather longer text here"]
    a = perplexity(llama, TOK, texts, batch_size=2)
    tok2 = tiny_tokenizer()
    tok2.pad_token = tok2.eos_token
    assert abs(perplexity(llama, tok2, texts, batch_size=2) - a) < 1e-6 * a


def test_perplexity_lower_for_trained_text():
    # fit a tiny model on one sentence: its perplexity must drop far below an unseen text's
    m = tiny_model("llama")
    text = "the cat sat on the mat. " * 3
    ids = TOK(text, return_tensors="pt").input_ids
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(30):
        opt.zero_grad()
        m(ids, labels=ids).loss.backward()
        opt.step()
    m.eval()
    assert perplexity(m, TOK, [text]) < 3 < perplexity(m, TOK, ["Zebras quickly vex jumping dwarfs!"])


def test_target_logprob_is_a_log_probability(llama):
    # each ASCII character is one byte token: the 128 single-token targets' probabilities add up to the softmax mass
    lps = target_logprob(llama, TOK, ["Hi"] * 128, [chr(b) for b in range(128)], batch_size=50)
    with torch.no_grad():
        probs = llama(torch.tensor([TOK("Hi").input_ids])).logits[0, -1].softmax(-1)
    assert abs(sum(math.exp(lp) for lp in lps) - probs[:128].sum().item()) < 1e-5
    assert max(range(128), key=lambda b: lps[b]) == int(probs[:128].argmax())


def test_top1_and_generate_agree(llama):
    p = "Once upon a time"
    assert generate(llama, TOK, p, max_new_tokens=1, stop_at_eos=False) == top1(llama, TOK, p)


def test_encode_keeps_bos_drops_nothing():
    btok = tiny_tokenizer(add_bos=True)
    assert encode(btok, "ab") == [257, 97, 98]
    assert encode(TOK, "ab") == [97, 98]


def test_ngram_entropy_permutation_invariant():
    a = ngram_entropy(["one two three four", "a b a b a b"])
    b = ngram_entropy(["a b a b a b", "one two three four"])
    assert a == b and a > 0


def test_load_texts_path_errors(tmp_path):
    with pytest.raises(ValueError, match="not an existing file"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_texts(tmp_path / "bad.jsonl")


def test_load_model_missing_path():
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model("./definitely/not/here")


def test_perplexity_clamps_window_to_model_context():
    m = tiny_model("gpt2", n_positions=32)
    text = ["x" * 100 + " some more text to cross the window"]
    assert perplexity(m, TOK, text, max_length=256) == perplexity(m, TOK, text, max_length=32)


def test_target_accuracy_matches_argmax(llama):
    from model_ops.eval import target_accuracy
    p, t = "Hello", " world"
    f = encode(TOK, p + t)
    with torch.no_grad():
        am = llama(torch.tensor([f])).logits[0].argmax(-1)
    want = sum(int(am[i - 1]) == f[i] for i in range(5, len(f))) / (len(f) - 5)
    assert target_accuracy(llama, TOK, p, t) == want
    assert target_accuracy(llama, TOK, p, t, exact=True) == float(want == 1.0)


def test_prediction_flips_counts():
    from model_ops.eval import prediction_flips
    r = prediction_flips([0, 1, 1, 0, 1], [1, 1, 0, 0, 0], labels=[1, 1, 1, 1, 0])
    assert r["acc_before"] == 0.4 and r["acc_after"] == 0.6
    assert r["negative_flips"] == 0.2 and r["positive_flips"] == 0.4 and r["changed"] == 0.6
    assert r["acc_after"] - r["acc_before"] == pytest.approx(r["positive_flips"] - r["negative_flips"])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(1, 64), st.data())
def test_windows_score_every_token_once(n, max_length, data):
    from model_ops.eval import _windows
    stride = data.draw(st.integers(1, max_length))
    ids = list(range(n))
    scored = []
    for w, k in _windows(ids, max_length, stride):
        assert 0 < len(w) <= max_length and 0 < k <= len(w)
        scored += w[len(w) - k:]
    assert scored == ids          # in order, each exactly once (position 0 is skipped later: it has no context)


def test_load_model_reads_hub_ids_from_the_cache(tmp_path, monkeypatch):
    "A Hub id `org/name[@revision]` loads from the Hugging Face cache (laid out by hand, offline); an id it lacks is named."
    from mergekit_runs import hub_cache
    from model_ops.nn import tiny_model, tiny_tokenizer, load_model
    tm = tiny_model("qwen2"); tm.save_pretrained(tmp_path / "tiny"); tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    hub_cache(tmp_path / "hf", "org/tiny", tmp_path / "tiny", "c" * 40)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf")); monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for ref in ("org/tiny", "org/tiny@" + "c" * 40):
        m, _ = load_model(ref)
        assert type(m).__name__ == "Qwen2ForCausalLM" and all(torch.equal(p, q) for p, q in zip(m.state_dict().values(), tm.state_dict().values()))
    with pytest.raises(ValueError, match="does not hold model 'org/absent'"): load_model("org/absent")
