"""The seven methods of `model_ops.merge.more_methods` end to end against mergekit 0.1.5: recipe-shaped YAML on tiny
float32 and bfloat16 models, through `merge_config` and through mergekit's command line, compared tensor by tensor.

mergekit runs once, as `mergekit-multi` on one multi-document file holding every recipe: each document goes through
the same `run_merge` with the same options as `mergekit-yaml`, and one process costs one import of mergekit (about
15 s here) instead of one per recipe. `test_mergekit_yaml_gives_the_same_files` checks that `mergekit-yaml` itself
writes the same bits for one recipe."""
import subprocess
import pytest, torch
from mergekit_runs import load as _load, mergekit_cmd as _mergekit_cmd, tiny_models, mergekit_multi
from model_ops.merge.api import merge_config
from model_ops.merge.config import plan_merge
from model_ops.merge.executor import read_tensor

pytest.importorskip("mergekit")

N_LAYERS = 3
RECIPES = {      # as published recipes are written; {base}, {a}, ... become model folders
    "sce": """
merge_method: sce
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters:
  select_topk: 0.6
""",
    "karcher": """
models:
  - model: {a}
  - model: {b}
merge_method: karcher
base_model: {base}
parameters:
  max_iter: 20
  tol: 1e-7
""",
    "multislerp": """
merge_method: multislerp
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: 0.5
  - model: {b}
    parameters:
      weight: [0.2, 0.6]
  - model: {c}
    parameters:
      weight: 0.3
parameters:
  normalize_weights: true
""",
    "nearswap": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
      - model: {a}
        layer_range: [0, 3]
merge_method: nearswap
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0.001, 0.02]
    - value: 0.005
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {a}
""",
    "ram": """
merge_method: ram
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters:
  epsilon: 1e-5
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {a}
  - model: {b}
parameters:
  r: 0.3
  alpha: 0.5
  epsilon: 0.0001
""",
}
# variant -> (models' dtype, the recipe's dtype lines)
VARIANTS = {"f32": ("f32", ""), "bf16": ("bf16", "dtype: bfloat16\n"), "bf16_f32math": ("bf16", "dtype: float32\nout_dtype: bfloat16\n")}
NAMES = [f"{m}_{v}" for v in VARIANTS for m in RECIPES]

def _text(method, variant, models):
    tag, extra = VARIANTS[variant]
    return RECIPES[method].format(**{k: models[tag, k] for k in ("base", "a", "b", "c")}).lstrip() + extra

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Tiny base and three sparse fine-tunes in float32 and bfloat16; every recipe merged once by mergekit."
    root = tmp_path_factory.mktemp("mergekit_methods")
    models = tiny_models(root, N_LAYERS, (0.7, 0.5, 0.9), 0.02, 10)
    texts = {f"{m}_{v}": _text(m, v, models) for v in VARIANTS for m in RECIPES}
    mergekit_multi(root, texts)
    return root, models, texts

def _ours(runs, name):
    root, _, texts = runs
    p = root / f"{name}.yml"
    p.write_text(texts[name])
    return _load(merge_config(str(p), root / "mo" / name, workers=1, copy_tokenizer=False))

@pytest.mark.parametrize("name", [n for n in NAMES if not n.endswith("_bf16")])
def test_bit_for_bit(runs, name):
    "float32 models, and bfloat16 models with `dtype: float32`: every tensor equals mergekit's, bits and dtype."
    ours, ref = _ours(runs, name), _load(runs[0] / "mk" / name)
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), (name, k, (ours[k].float() - ref[k].float()).abs().max())

def _in_recipe_dtype(plan):
    "Every tensor of `plan` merged from inputs in the recipe's dtype, as mergekit computes (the executor uses float32)."
    out = {}
    for j in plan.jobs:
        load = lambda i, n: read_tensor(plan.models[i].store, n).to(plan.dtype)
        xs, b = [load(i, n) for i, n in j.inputs], (load(*j.base) if j.base is not None else None)
        out[j.out] = plan.method.fn(xs, b, **j.params, seed=0, name=j.out)
    return out

@pytest.mark.parametrize("method", list(RECIPES))
def test_bf16_recipe_computed_in_bf16_is_mergekits(runs, method):
    "`dtype: bfloat16`: our plan and functions, given bfloat16 tensors, give mergekit's file bit for bit."
    root, _, texts = runs
    name = f"{method}_bf16"
    ref, got = _load(root / "mk" / name), _in_recipe_dtype(plan_merge(texts[name]))
    assert sorted(got) == sorted(ref)
    for k in ref: assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), (name, k)
    # (Arcee Fusion's mask and RAM+'s λ are float32: mergekit writes those results as float32)
    assert {v.dtype for v in ref.values()} == {torch.float32 if method in ("arcee_fusion", "ramplus_tl") else torch.bfloat16}

def _ulp(x):
    "The spacing of bfloat16 numbers at the largest magnitude of `x`."
    return 2.0 ** (torch.floor(torch.log2(x.float().abs().max().clamp(min=2.0 ** -100))).item() - 7)

@pytest.mark.parametrize("method", list(RECIPES))
def test_bf16_recipe_through_merge_config(runs, method):
    """`dtype: bfloat16` through `merge_config` (float32 math, the bfloat16 result): each tensor within 2 bfloat16 steps of
    its largest entry from mergekit's; SCE and Arcee Fusion may also flip a selection, which moves an entry by at most
    twice (SCE: between two weighted means of task vectors) or once (Arcee Fusion: base or fine-tune) the largest task vector."""
    root, models, _ = runs
    name = f"{method}_bf16"
    ours, ref = _ours(runs, name), _load(root / "mk" / name)
    base = _load(models["bf16", "base"])
    fts = [_load(models["bf16", n]) for n in "abc"]
    for k in ref:
        tau = max((f[k].float() - base[k].float()).abs().max().item() for f in fts)
        tol = 2 * _ulp(ref[k]) + {"sce": 2 * tau, "arcee_fusion": tau}.get(method, 0.0)
        assert ours[k].dtype == torch.bfloat16
        assert (ours[k].float() - ref[k].to(torch.bfloat16).float()).abs().max().item() <= tol, (name, k)

def test_mergekit_yaml_gives_the_same_files(runs):
    "One recipe through `mergekit-yaml` itself: the same tensors as its `mergekit-multi` stage, bit for bit."
    root, _, texts = runs
    p = root / "sce_alone.yml"
    p.write_text(texts["sce_bf16"])
    r = subprocess.run([_mergekit_cmd("mergekit-yaml"), str(p), str(root / "mk_yaml"), "--no-copy-tokenizer", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _load(root / "mk_yaml"), _load(root / "mk" / "sce_bf16")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
