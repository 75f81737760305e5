"Corruption and atomicity tests for model_ops.io: every damaged file gives a clean ModelIOError, never a crash or a hang."
import json, os, random, subprocess, sys, signal, time
from pathlib import Path
import pytest, torch
from safetensors.torch import save_file
from model_ops.io import WeightStore, ModelIOError, save_model, verify_store, read_header

def _model(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f'model.layers.{i}.mlp.down_proj.weight': torch.randn(8, 16, generator=g) for i in range(3)}
    sd['model.embed_tokens.weight'] = torch.randn(32, 8, generator=g).to(torch.bfloat16)
    return save_model(sd, tmp_path / 'm', config={'architectures': ['LlamaForCausalLM']}, metadata={'operation': 'test'}), sd

def _open_and_check(p):
    s = WeightStore.open(p)
    for k in s.keys(): s[k]
    verify_store(p)

def test_roundtrip_intact(tmp_path):
    p, sd = _model(tmp_path)
    s = WeightStore.open(p)
    assert set(s.keys()) == set(sd)
    for k, v in sd.items(): assert torch.equal(s[k], v)
    assert verify_store(p) == len(sd)

@pytest.mark.parametrize('seed', range(3))
def test_every_truncation_is_a_clean_error(tmp_path, seed):
    p, _ = _model(tmp_path)
    f = p / 'model.safetensors'
    raw = f.read_bytes()
    n = struct_len = int.from_bytes(raw[:8], 'little')
    positions = sorted(set(list(range(0, 8 + n + 16)) + random.Random(seed).sample(range(len(raw)), 200)))
    for pos in positions:
        if pos >= len(raw): continue
        f.write_bytes(raw[:pos])
        with pytest.raises(ModelIOError): _open_and_check(p)
    f.write_bytes(raw)

@pytest.mark.parametrize('seed', range(3))
def test_every_flipped_byte_is_a_clean_error(tmp_path, seed):
    "A single flipped bit anywhere (header, metadata, checksums or data) is caught at open or by verify_store."
    p, _ = _model(tmp_path)
    f = p / 'model.safetensors'
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    rng = random.Random(seed)
    positions = list(range(8 + n)) if seed == 0 else rng.sample(range(len(raw)), 400)
    for pos in positions:
        bad = bytearray(raw); bad[pos] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(bad))
        with pytest.raises(ModelIOError): _open_and_check(p)
    f.write_bytes(raw); _open_and_check(p)

def test_foreign_safetensors_flips_never_crash(tmp_path):
    "Files written by plain safetensors (no checksums): a flip either raises ModelIOError or leaves a readable file."
    f = tmp_path / 'x.safetensors'
    save_file({'a': torch.randn(4, 4), 'b': torch.arange(10)}, f, metadata={'format': 'pt'})
    raw = f.read_bytes(); rng = random.Random(1)
    for pos in range(len(raw)):
        bad = bytearray(raw); bad[pos] ^= 1 << rng.randrange(8); f.write_bytes(bytes(bad))
        try:
            s = WeightStore.open(f); [s[k] for k in s.keys()]
        except ModelIOError: pass

def test_index_problems(tmp_path):
    p = save_model({f'w{i}': torch.ones(100) for i in range(4)}, tmp_path / 'm', max_shard_size=450)
    idx = p / 'model.safetensors.index.json'
    j = json.loads(idx.read_text())
    shards = sorted(set(j['weight_map'].values()))
    (p / shards[-1]).rename(tmp_path / 'away')
    with pytest.raises(ModelIOError, match='missing'): WeightStore.open(p)
    (tmp_path / 'away').rename(p / shards[-1])
    j2 = dict(j, weight_map=dict(j['weight_map'], w0='../../etc/passwd')); idx.write_text(json.dumps(j2))
    with pytest.raises(ModelIOError, match='outside the folder'): WeightStore.open(p)
    j3 = dict(j, weight_map=dict(j['weight_map'], ghost=shards[0])); idx.write_text(json.dumps(j3))
    with pytest.raises(ModelIOError, match="no such tensor"): WeightStore.open(p)
    idx.write_text('{not json'); 
    with pytest.raises(ModelIOError, match='not a valid JSON index'): WeightStore.open(p)

def test_duplicate_names_across_files(tmp_path):
    save_file({'a': torch.ones(1)}, tmp_path / 'one.safetensors'); save_file({'a': torch.ones(1)}, tmp_path / 'two.safetensors')
    with pytest.raises(ModelIOError, match='duplicate tensor name'): WeightStore.open(tmp_path)

def test_bin_is_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self): return (os.system, ('touch ' + str(tmp_path / 'pwned'),))
    torch.save({'w': torch.ones(2), 'x': Evil()}, tmp_path / 'pytorch_model.bin')
    with pytest.raises(ModelIOError): WeightStore.open(tmp_path)
    assert not (tmp_path / 'pwned').exists()
    torch.save({'w': torch.ones(2)}, tmp_path / 'pytorch_model.bin')
    assert torch.equal(WeightStore.open(tmp_path)['w'], torch.ones(2))

def test_killed_writer_leaves_no_complete_output(tmp_path):
    "kill -9 a process in the middle of save_model: the output folder never appears half-written."
    code = ("import torch, sys; from model_ops.io import save_model\n"
            "sd = ({f'w{i}': torch.randn(256, 1024)} for i in range(400))\n"
            "def gen():\n  for d in sd: yield from d.items()\n"
            f"save_model(gen(), {str(tmp_path / 'out')!r}, max_shard_size='4MB')\n")
    for delay in (0.5, 1.5, 3.0):
        p = subprocess.Popen([sys.executable, '-c', code])
        time.sleep(delay); p.send_signal(signal.SIGKILL); p.wait()
        out = tmp_path / 'out'
        if out.exists():  # only possible when the write had finished: then it must be complete and valid
            assert verify_store(out) == 400
            import shutil; shutil.rmtree(out)

from hypothesis import given, settings, strategies as st, HealthCheck
_DT = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64]

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=6),
       dts=st.lists(st.sampled_from(range(len(_DT))), min_size=6, max_size=6), shard=st.integers(1, 400), seed=st.integers(0, 10**6))
def test_roundtrip_property(tmp_path_factory, shapes, dts, shard, seed):
    "Any tensors, any dtypes (zero-size and scalars included), any shard size: written and read back bit for bit, rows too."
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, shp in enumerate(shapes):
        dt = _DT[dts[i]]
        x = torch.randint(0, 100, shp, generator=g) if not dt.is_floating_point else torch.randn(shp, generator=g, dtype=torch.float64)
        sd[f't{i}'] = x.to(dt)
    out = save_model(sd, tmp_path_factory.mktemp('rt') / 'm', max_shard_size=shard)
    s = WeightStore.open(out)
    assert sorted(s.keys()) == sorted(sd)
    for k, v in sd.items():
        assert s.dtype(k) == v.dtype and tuple(s.shape(k)) == tuple(v.shape)
        assert torch.equal(s[k], v)
        if v.dim() >= 1: assert torch.equal(s.rows(k, 1, 3), v[1:3])
    assert verify_store(out, finite=False) == len(sd)
