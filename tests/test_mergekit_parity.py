"""Parity by default: the methods model_ops shares with mergekit 0.1.5 give mergekit's tensors bit for bit, on tiny float32
and bfloat16 models (math in bfloat16, float32 or float16), in the recipe's dtype (or the inputs' own when the recipe names none), with mergekit's order for
equal magnitudes at a density cut, and for DARE/DELLA with `seed=None` the draws of torch's global generator in
mergekit's order (`--random-seed N` there, `torch.manual_seed(N)` here). `precise=True` keeps model_ops' own choices
(float32 math, lowest-index ties), checked here to differ where they should.

mergekit runs once, as `mergekit-multi` over one multi-document file holding every recipe (one import of mergekit
instead of one per recipe); each document goes through `run_merge`, which seeds the global generator first."""
import pytest, torch
from mergekit_runs import load as _load, tiny_models, mergekit_multi
from model_ops.merge.api import merge_config
from model_ops.merge.config import plan_merge
from model_ops.merge.executor import stream_merge

pytest.importorskip("mergekit")

SEED = 1234
N_LAYERS = 2
# recipes written for this test; {base}, {a}, {b}, {c} become model folders
DETERMINISTIC = {
    "linear": """
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.6}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.1}}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: [0.2, 0.5]}}
parameters:
  lambda: 0.9
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.4, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.6, weight: 0.3}}
  - model: {c}
    parameters: {{density: 0.25, weight: 0.4}}
parameters:
  normalize: true
""",
    "ties2": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, weight: 1.0}}
  - model: {b}
    parameters: {{density: 0.5, weight: 1.0}}
parameters:
  normalize: false
  int8_mask: true
""",
    "ties_rescale": """
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.3, weight: 0.8}}
  - model: {b}
    parameters: {{density: 0.7, weight: 0.6}}
parameters:
  rescale: true
  lambda: 1.2
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.7, gamma: 0.05, weight: 0.6}}
  - model: {b}
    parameters: {{density: 0.5, gamma: 0.02, weight: 0.4}}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.8, gamma: 0.01, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.6, gamma: 0.03, weight: 0.5}}
  - model: {c}
    parameters: {{density: 0.9, gamma: 0.1, weight: 0.2}}
""",
    "slerp": """
merge_method: slerp
base_model: {a}
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
      - model: {b}
        layer_range: [0, 2]
parameters:
  t:
    - filter: self_attn
      value: [0.1, 0.7]
    - filter: mlp
      value: [0.8, 0.3]
    - value: 0.4
""",
    "nuslerp": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.9}}
""",
    "nuslerp_rows": """
merge_method: nuslerp
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.5}}
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
""",
    "model_stock_filter": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
parameters:
  filter_wise: true
""",
    "linear_sum": """
merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {a}
    parameters: {{weight: 0.25}}
  - model: {c}
    parameters: {{weight: 0.25}}
parameters:
  normalize: false
""",
    "breadcrumbs_rescale": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.6, gamma: 0.02, weight: 1.0}}
  - model: {c}
    parameters: {{density: 0.4, gamma: 0.05, weight: 0.5}}
parameters:
  rescale: true
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
""",
}
RANDOM = {
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, weight: 0.6}}
  - model: {b}
    parameters: {{density: 0.3, weight: 0.5}}
""",
    "dare_linear": """
merge_method: dare_linear
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.6, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.4, weight: 0.5}}
""",
    "della": """
merge_method: della
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.5, epsilon: 0.1, weight: 0.5}}
  - model: {b}
    parameters: {{density: 0.6, epsilon: 0.2, weight: 0.4}}
parameters:
  lambda: 1.1
""",
    "della_linear": """
merge_method: della_linear
base_model: {base}
models:
  - model: {a}
    parameters: {{density: 0.4, epsilon: 0.15, weight: 0.7}}
  - model: {b}
    parameters: {{density: 0.7, epsilon: 0.1, weight: 0.3}}
""",
}
RECIPES = DETERMINISTIC | RANDOM
# variant -> (models' dtype, the recipe's dtype lines)
VARIANTS = {"f32": ("f32", ""), "bf16": ("bf16", "dtype: bfloat16\n"), "bf16own": ("bf16", ""),
            "bf16_f32math": ("bf16", "dtype: float32\nout_dtype: bfloat16\n"), "f32_f16math": ("f32", "dtype: float16\n")}

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "A tiny base and three fine-tunes in float32 and bfloat16; every recipe merged once by mergekit (seeded)."
    root = tmp_path_factory.mktemp("mergekit_parity")
    models = tiny_models(root, N_LAYERS, (0.8, 0.6, 0.9), 0.01, 20)
    texts = {}
    for v, (tag, extra) in VARIANTS.items():
        for meth, r in RECIPES.items():
            texts[f"{meth}_{v}"] = r.format(**{k: models[tag, k] for k in ("base", "a", "b", "c")}).lstrip() + extra
    mergekit_multi(root, texts, "--random-seed", str(SEED))
    return root, models, texts

def _same(ours, ref, name):
    assert sorted(ours) == sorted(ref), name
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, (name, k, ours[k].dtype, ref[k].dtype)
        assert torch.equal(ours[k], ref[k]), (name, k, (ours[k].float() - ref[k].float()).abs().max().item())

@pytest.mark.parametrize("name", [f"{m}_{v}" for v in VARIANTS for m in DETERMINISTIC])
def test_deterministic_bit_for_bit(runs, name):
    "Every deterministic method through `merge_config` (the defaults): mergekit's file, every tensor, bits and dtype."
    root, _, texts = runs
    p = root / f"{name}.yml"; p.write_text(texts[name])
    _same(_load(merge_config(str(p), root / "mo" / name, workers=1, copy_tokenizer=False)), _load(root / "mk" / name), name)

@pytest.mark.parametrize("name", [f"{m}_{v}" for v in VARIANTS for m in RANDOM])
def test_random_seed_none_draws_as_mergekit(runs, name):
    "DARE/DELLA with `seed=None` after `torch.manual_seed(N)`: mergekit's `--random-seed N` output, bit for bit."
    root, _, texts = runs
    plan = plan_merge(texts[name])
    torch.manual_seed(SEED)
    _same(dict(stream_merge(plan, seed=None, workers=2)), _load(root / "mk" / name), name)   # (global draws: in plan order)

def test_precise_keeps_our_choices(runs):
    """`precise=True`: float32 math and lowest-index ties. On bfloat16 TIES it differs from mergekit (ties straddle the cut,
    sign elections flip), by at most twice the largest task vector of a tensor; on float32 models nothing changes but the ties."""
    root, models, texts = runs
    plan = plan_merge(texts["ties_bf16"])
    ours = dict(stream_merge(plan, workers=1, precise=True))
    ref = _load(root / "mk" / "ties_bf16")
    base = _load(models["bf16", "base"])
    fts = [_load(models["bf16", n]) for n in "abc"]
    differ = 0
    for k in ref:
        tau = max((f[k].float() - base[k].float()).abs().max().item() for f in fts)
        d = (ours[k].float() - ref[k].float()).abs().max().item()
        assert d <= 2 * tau, (k, d, tau)   # (a flipped election moves an entry from one mean task vector to the other)
        differ += not torch.equal(ours[k], ref[k])
    assert differ > 0       # the tiny bfloat16 models do have equal magnitudes at the cut

def test_seeded_draws_are_ours(runs):
    "`seed=N` keeps the order-independent per-tensor draws: the same bits with one or two workers, not mergekit's."
    root, _, texts = runs
    plan = plan_merge(texts["dare_ties_f32"])
    a, b = dict(stream_merge(plan, seed=5, workers=1)), dict(stream_merge(plan, seed=5, workers=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ref = _load(root / "mk" / "dare_ties_f32")
    assert any(not torch.equal(a[k], ref[k]) for k in ref)
