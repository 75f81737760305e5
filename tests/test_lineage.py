"Lineage (#21): every wired operation records itself, revert is exact where promised, reproduce catches a tampered parent, a chain resumes."
import json, subprocess, shutil
import pytest, torch
from model_ops.nn import tiny_model, tiny_tokenizer
from model_ops.io import save_pretrained_atomic, WeightStore
from model_ops.lineage import (read_lineage, weights_hash, history, revert, revert_plan, save_pretrained, LineageError, log_text)
from model_ops.chain import run_chain, reproduce, chain_dir, OPS

@pytest.fixture(scope='module')
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp('lin')
    torch.manual_seed(0)
    tok, base = tiny_tokenizer(), tiny_model('llama')
    save_pretrained_atomic(base, root/'base', tok=tok)
    for i in (1, 2):
        ft = tiny_model('llama'); ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters(): p.add_(0.02 * torch.randn_like(p))
        save_pretrained_atomic(ft, root/f'ft{i}', tok=tok)
    return root

def check_record(out, op, n_parents):
    "The record is in lineage.json and in the headers, names the parents, and its fingerprint is the weights' (from the bytes)."
    rec = read_lineage(out)
    assert rec['op'] == op and len(rec['parents']) == n_parents and rec['format'] == 'model_ops.lineage/1'
    assert rec['fingerprint'] == weights_hash(out)
    for meta in WeightStore.open(out).metadata.values():
        hdr = json.loads(meta['model_ops'])['lineage']
        assert hdr['op'] == op and hdr['params'] == rec['params']
    assert (out/'README.md').read_text().count('## Lineage') == 1
    return rec

def test_merge_config_and_merge_record(models, tmp_path):
    from model_ops.merge import merge_config, merge
    cfg = {'merge_method': 'ties', 'base_model': str(models/'base'), 'dtype': 'float32', 'parameters': {'density': 0.5},
           'models': [{'model': str(models/'ft1'), 'parameters': {'weight': 0.5}}, {'model': str(models/'ft2'), 'parameters': {'weight': 0.5}}]}
    merge_config(cfg, tmp_path/'m')
    rec = check_record(tmp_path/'m', 'merge', 3)
    assert [p['role'] for p in rec['parents']].count('base') == 1
    assert {p['fingerprint'] for p in rec['parents']} == {weights_hash(models/n) for n in ('base', 'ft1', 'ft2')}
    merge([models/'ft1', models/'ft2'], method='linear', weight=[0.5, 0.5], out=tmp_path/'lin')
    assert check_record(tmp_path/'lin', 'merge', 2)['params']['config']['merge_method'] == 'linear'
    assert (tmp_path/'m'/'mergekit_config.yml').is_file()        # the merge's own files are still written

def test_transfer_records(models, tmp_path):
    from model_ops.transfer import transfer
    transfer(models/'base', models/'ft1', models/'ft2', out=tmp_path/'t', alpha=0.5)
    rec = check_record(tmp_path/'t', 'transfer', 3)
    assert rec["params"]["alpha"] == 0.5 and [p["role"] for p in rec["parents"]] == ["tgt_base", "src_base", "src_tuned"]   # first: the model it changes

def test_prune_cli_records_and_reverts(models, tmp_path):
    from model_ops.prune import cli_prune
    cli_prune.__wrapped__(str(models/'ft1'), str(tmp_path/'p'), method='magnitude', sparsity=0.3)
    rec = check_record(tmp_path/'p', 'prune', 1)
    assert rec['params']['method'] == 'magnitude' and rec['undo']
    revert(tmp_path/'p', tmp_path/'back', 0)
    assert weights_hash(tmp_path/'back') == weights_hash(models/'ft1')
    r = reproduce(tmp_path/'p', tmp_path/'again')                 # the CLI's parameters are enough to rerun it
    assert r['identical'], r

def test_save_pretrained_in_memory_steps_revert_exactly(models, tmp_path):
    from model_ops.nn import load_model
    m, _ = load_model(str(models/'ft1'))
    with torch.no_grad(): m.model.layers[0].mlp.down_proj.weight[2, :5] += 1          # an edit-like change
    save_pretrained(m, tmp_path/'e', op='edit', params={'rows': [2]}, parents=[models/'ft1'])
    with torch.no_grad(): m.model.layers[1].self_attn.q_proj.weight[:, ::2] = 0         # pruning-like zeros
    save_pretrained(m, tmp_path/'z', op='prune', params={}, parents=[tmp_path/'e'])
    with torch.no_grad():
        for p in m.parameters(): p.mul_(1.001)                                          # changes everything
    save_pretrained(m, tmp_path/'d', op='distill', params={}, parents={'student': tmp_path/'z', 'teacher': models/'base'})
    assert [r['op'] for r in history(tmp_path/'d')] == ['edit', 'prune', 'distill']
    assert [bool(r['undo']) for r in history(tmp_path/'d')] == [True, True, False]
    for k, want in ((2, tmp_path/'z'), (1, tmp_path/'e'), (0, models/'ft1')):
        revert(tmp_path/'d', tmp_path/f'r{k}', k)
        assert weights_hash(tmp_path/f'r{k}') == weights_hash(want), k
    shutil.rmtree(tmp_path/'z')           # the distillation stored no undo data: without its parent it cannot be undone
    assert 'not revertible' in revert_plan(tmp_path/'d', 2)[0][1]
    with pytest.raises(LineageError, match='step 3 \\(distill\\) is not revertible'): revert(tmp_path/'d', tmp_path/'no', 2)
    assert not (tmp_path/'no').exists()
    revert(tmp_path/'e', tmp_path/'still', 0)               # steps that stored undo data still go back without it
    assert weights_hash(tmp_path/'still') == weights_hash(models/'ft1')

RECIPE = """
steps:
  - op: merge
    config:
      merge_method: task_arithmetic
      base_model: {base}
      dtype: float32
      models:
        - {{model: {ft1}, parameters: {{weight: 0.7}}}}
        - {{model: {ft2}, parameters: {{weight: 0.3}}}}
  - op: edit
    method: rome
    requests: [{{prompt: "The capital of France is", subject: France, target_new: " Rome"}}]
    mom2: false
    steps: 3
  - op: prune
    method: magnitude
    sparsity: 0.3
  - op: distill
    teacher: start
    steps: 1
    batch_size: 2
    seqlen: 16
"""

def test_chain_tampered_parent_and_resume(models, tmp_path):
    work = tmp_path/'in'; shutil.copytree(models, work)
    recipe = RECIPE.format(base=work/'base', ft1=work/'ft1', ft2=work/'ft2')
    real, logs = OPS['distill'], []
    OPS['distill'] = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt): run_chain(recipe, tmp_path/'out', log=logs.append)
    finally: OPS['distill'] = real
    assert len(logs) == 3 and not (tmp_path/'out').exists()
    logs = []
    rec = run_chain(recipe, tmp_path/'out', log=logs.append)
    assert ['skipped' in l for l in logs] == [True, True, True, False]
    assert [r['op'] for r in history(tmp_path/'out')] == ['merge', 'edit', 'prune', 'distill']
    assert reproduce(tmp_path/'out', tmp_path/'rep')['identical']
    # a tampered input of the merge: bytes changed in place, header (and its stored checksums) untouched
    f = work/'ft2'/'model.safetensors'; raw = bytearray(f.read_bytes()); raw[-4:] = b'\x00\x00\x80\x3f'; f.write_bytes(bytes(raw))
    with pytest.raises(LineageError, match='changed since the step ran'): reproduce(chain_dir(tmp_path/'out')/'01-merge', tmp_path/'rep2')
    assert not (tmp_path/'rep2').exists()
    logs = []
    run_chain(recipe, tmp_path/'out', log=logs.append)           # the chain notices it too, and reruns from the merge
    assert not any('skipped' in l for l in logs)
    assert read_lineage(tmp_path/'out')['fingerprint'] != rec['fingerprint']

def test_cli_commands(models, tmp_path):
    from model_ops.cli import COMMANDS
    assert {'log', 'revert', 'reproduce', 'run', 'diff'} <= set(COMMANDS)
    (tmp_path/'r.yml').write_text("model: %s\nsteps:\n  - {op: prune, method: magnitude, sparsity: 0.5}\n" % (models/'ft1'))
    run = lambda *a: subprocess.run(['model-ops', *map(str, a)], capture_output=True, text=True, timeout=600)
    r = run('run', tmp_path/'r.yml', tmp_path/'o'); assert r.returncode == 0, r.stderr
    r = run('log', tmp_path/'o'); assert r.returncode == 0 and 'step 1 prune' in r.stdout, r.stderr
    r = run('revert', tmp_path/'o', tmp_path/'b', '--to', '0'); assert r.returncode == 0, r.stderr
    assert weights_hash(tmp_path/'b') == weights_hash(models/'ft1')
    r = run('reproduce', tmp_path/'o', tmp_path/'n'); assert r.returncode == 0 and 'bit-identical' in r.stdout, r.stderr
    r = run('log', models/'ft1'); assert r.returncode == 2 and 'no lineage record' in r.stderr and 'Traceback' not in r.stderr
    r = run('run', tmp_path/'nope.yml', tmp_path/'o2'); assert r.returncode == 2 and 'no such file' in r.stderr

# --- #21, session 8: outputs that had no record (checkpoints, the multi-process merge, extract-lora), whole-history
#     reproduce, the cost switch, transfer and unlearn inside a chain

def test_checkpoint_save_and_conversions_record(models, tmp_path):
    from model_ops.checkpoint import save, verify, hf_to_dcp, dcp_to_hf, save_tp, reshard, tp_split, llama_layout, load
    from model_ops.lineage import files_hash
    from model_ops.nn import load_model
    m, _ = load_model(str(models/'ft1'))
    save(tmp_path/'ck', model=m, step=7, metadata={'run': 'a'})
    rec = read_lineage(tmp_path/'ck')
    assert rec['op'] == 'checkpoint' and rec['parents'] == [] and rec['params']['step'] == 7 and rec['params']['metadata'] == {'run': 'a'}
    assert rec['fingerprint'] == weights_hash(tmp_path/'ck') == weights_hash(models/'ft1')      # the model's tensors, from the bytes
    hdr = json.loads(WeightStore.open(tmp_path/'ck').metadata['model.safetensors']['model_ops'])['lineage']
    assert hdr['op'] == 'checkpoint' and hdr['params'] == rec['params']
    verify(tmp_path/'ck'); load(tmp_path/'ck', model=m)                  # the checkpoint still verifies and loads
    save(tmp_path/'bg', model=m, step=8, background=True).result()       # a background save (another thread) records itself too
    assert read_lineage(tmp_path/'bg')['params']['step'] == 8
    # converted FROM a checkpoint: the source is the parent, its record carried
    hf_to_dcp(tmp_path/'ck', tmp_path/'dcp')
    r = read_lineage(tmp_path/'dcp')
    assert r['op'] == 'convert' and r['params']['to'] == 'dcp' and r['parents'][0]['fingerprint'] == rec['fingerprint']
    assert r['fingerprint'] == files_hash(tmp_path/'dcp') == files_hash(tmp_path/'dcp', stored=True)    # a DCP folder: by its files
    dcp_to_hf(tmp_path/'dcp', tmp_path/'hf', config=models/'ft1')
    assert [s['op'] for s in history(tmp_path/'hf')] == ['checkpoint', 'convert', 'convert']
    assert weights_hash(tmp_path/'hf') == weights_hash(models/'ft1')
    # tensor-parallel -> universal: reshard names the TP folder as its parent
    lay, sd = llama_layout(), {k: v for k, v in m.state_dict().items() if 'embed' not in k and 'lm_head' not in k}
    ranks = [{} for _ in range(2)]
    for k, v in sd.items():
        for i, s in enumerate(tp_split(v, lay.rule(k, v.ndim), 2)): ranks[i][k] = s
    save_tp(ranks, tmp_path/'tp', lay)
    reshard(tmp_path/'tp', tmp_path/'uni')
    r = read_lineage(tmp_path/'uni')
    assert r['op'] == 'reshard' and r['parents'][0]['lineage']['op'] == 'checkpoint' and r['fingerprint'] == files_hash(tmp_path/'uni')
    f = tmp_path/'tp'/'tp-00-of-02.safetensors'; raw = bytearray(f.read_bytes()); raw[-1] ^= 1; f.write_bytes(bytes(raw))
    assert files_hash(tmp_path/'tp') != r['parents'][0]['fingerprint'] == files_hash(tmp_path/'tp', stored=True)   # a changed byte is seen

def test_distributed_merge_records(models, tmp_path):
    from model_ops.merge import merge_config
    cfg = {'merge_method': 'linear', 'dtype': 'float32',
           'models': [{'model': str(models/'ft1'), 'parameters': {'weight': 0.5}}, {'model': str(models/'ft2'), 'parameters': {'weight': 0.5}}]}
    merge_config(cfg, tmp_path/'one')
    merge_config(cfg, tmp_path/'two', rank=1, world_size=2)      # rank 1 writes its part and returns; rank 0 joins them
    merge_config(cfg, tmp_path/'two', rank=0, world_size=2)
    rec = check_record(tmp_path/'two', 'merge', 2)
    assert rec['fingerprint'] == read_lineage(tmp_path/'one')['fingerprint']       # the same weights as one process
    for meta in WeightStore.open(tmp_path/'two').metadata.values():               # both ranks' shards carry the record
        assert json.loads(meta['model_ops'])['lineage']['params'] == rec['params']

def test_extract_lora_records(models, tmp_path):
    from model_ops.merge.toolbox import extract_lora
    extract_lora(models/'base', models/'ft1', tmp_path/'lora', max_rank=4)
    rec = read_lineage(tmp_path/'lora')
    assert rec['op'] == 'extract_lora' and [p['role'] for p in rec['parents']] == ['base', 'tuned'] and rec['params']['max_rank'] == 4
    assert [p['fingerprint'] for p in rec['parents']] == [weights_hash(models/'base'), weights_hash(models/'ft1')]
    assert rec['fingerprint'] == weights_hash(tmp_path/'lora') and rec['reports']['ranks']['max'] == 4
    hdr = json.loads(WeightStore.open(tmp_path/'lora').metadata['adapter_model.safetensors']['model_ops'])['lineage']
    assert hdr['op'] == 'extract_lora'

def test_lineage_fast_and_off(models, tmp_path):
    "Inputs written without model_ops checksums: 'full' hashes them, 'fast' samples (and says so), 'off' writes no record; weights identical."
    from safetensors.torch import save_file, load_file
    from model_ops.merge import merge_config
    from model_ops.io import fingerprint
    for n in ('ft1', 'ft2'):
        shutil.copytree(models/n, tmp_path/n); f = tmp_path/n/'model.safetensors'; save_file(load_file(f), f, metadata={'format': 'pt'})
    cfg = {'merge_method': 'linear', 'dtype': 'float32',
           'models': [{'model': str(tmp_path/n), 'parameters': {'weight': 0.5}} for n in ('ft1', 'ft2')]}
    out = {how: merge_config(cfg, tmp_path/how, lineage=how) for how in ('full', 'fast', 'off')}
    full, fast = read_lineage(out['full']), read_lineage(out['fast'])
    assert read_lineage(out['off']) is None and not (out['off']/'lineage.json').exists()
    assert [p['fingerprint'] for p in full['parents']] == [weights_hash(tmp_path/n) for n in ('ft1', 'ft2')]
    assert [(p['fingerprint'], p['fingerprint_kind']) for p in fast['parents']] == [(fingerprint(tmp_path/n), 'sampled') for n in ('ft1', 'ft2')]
    assert full['fingerprint'] == fast['fingerprint'] == weights_hash(out['off'])
    assert reproduce(out['fast'], tmp_path/'rep')['identical']        # reproduce checks the sampled fingerprint it was given
    with pytest.raises(LineageError, match="lineage='frob'"): merge_config(cfg, tmp_path/'x', lineage='frob')
    # parents with stored checksums: 'fast' uses them, exact and free
    merge_config(cfg, tmp_path/'m2', lineage='fast')
    two = {'merge_method': 'linear', 'dtype': 'float32', 'models': [{'model': str(tmp_path/'m2'), 'parameters': {'weight': 1.0}}]}
    p = read_lineage(merge_config(two, tmp_path/'m3', lineage='fast'))['parents'][0]
    assert p['fingerprint'] == weights_hash(tmp_path/'m2') and 'fingerprint_kind' not in p
    # the notebook front door `merge(...)` passes the switch through
    from model_ops.merge import merge
    merge([tmp_path/'ft1', tmp_path/'ft2'], 'linear', out=tmp_path/'f_off', weight=[0.5, 0.5], dtype='float32', lineage='off')
    assert read_lineage(tmp_path/'f_off') is None and weights_hash(tmp_path/'f_off') == weights_hash(out['off'])
    merge([tmp_path/'ft1', tmp_path/'ft2'], 'linear', out=tmp_path/'f_fast', weight=[0.5, 0.5], dtype='float32', lineage='fast')
    assert read_lineage(tmp_path/'f_fast')['parents'][0]['fingerprint_kind'] == 'sampled'

def test_reproduce_all_three_steps(models, tmp_path, monkeypatch):
    from model_ops.cli import COMMANDS
    work = tmp_path/'in'; shutil.copytree(models, work)
    recipe = RECIPE.format(base=work/'base', ft1=work/'ft1', ft2=work/'ft2').split('  - op: distill')[0]     # merge, edit, prune
    run_chain(recipe, tmp_path/'out', log=lambda s: None)
    shutil.move(chain_dir(tmp_path/'out'), tmp_path/'aside')     # no intermediates: the whole history reruns from the roots
    r = reproduce(tmp_path/'out', tmp_path/'new', steps='all')
    assert r['identical'] and [s['op'] for s in r['steps']] == ['merge', 'edit', 'prune'] and all(s['identical'] for s in r['steps'])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.new')] == []        # the temporary area is gone
    shutil.move(tmp_path/'aside', chain_dir(tmp_path/'out'))
    # an editor that no longer gives the recorded result (here: two optimisation steps instead of three) is named, with its tensor
    real = OPS['edit']
    monkeypatch.setitem(OPS, 'edit', lambda params, parents, out: real(dict(params, steps=2), parents, out))
    r = reproduce(tmp_path/'out', tmp_path/'new2', steps='all')
    assert not r['identical'] and r['first_bad_step'] == 2 and [s['identical'] for s in r['steps']] == [True, False]
    assert 'mlp' in r['first_difference']                                  # ROME's matrix, found against the recorded 02-edit
    assert weights_hash(tmp_path/'new2') == r['steps'][-1]['reproduced']    # the differing rerun is kept in NEW for a look
    monkeypatch.setitem(OPS, 'edit', real)
    # a tampered root parent stops it before anything runs
    f = work/'ft2'/'model.safetensors'; raw = bytearray(f.read_bytes()); raw[-4:] = b'\x00\x00\x80\x3f'; f.write_bytes(bytes(raw))
    with pytest.raises(LineageError, match='changed since the step ran'): reproduce(tmp_path/'out', tmp_path/'new3', steps='all')
    assert not (tmp_path/'new3').exists()
    r = subprocess.run(['model-ops', 'reproduce', str(tmp_path/'out'), str(tmp_path/'new4'), '--all'], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and 'changed since the step ran' in r.stderr

def test_chain_with_transfer_and_unlearn(models, tmp_path):
    recipe = {'model': str(models/'base'), 'steps': [
        {'op': 'transfer', 'src_base': str(models/'base'), 'src_tuned': str(models/'ft1'), 'alpha': 0.5},
        {'op': 'unlearn', 'method': 'gradient_ascent', 'forget': ['The capital of France is Paris.'], 'epochs': 2, 'lr': 1e-3, 'batch_size': 1},
        {'op': 'prune', 'method': 'magnitude', 'sparsity': 0.2}]}
    rec = run_chain(recipe, tmp_path/'out', log=lambda s: None)
    hist = history(tmp_path/'out')
    assert [r['op'] for r in hist] == ['transfer', 'unlearn', 'prune'] and rec['fingerprint'] == weights_hash(tmp_path/'out')
    assert [p['role'] for p in hist[0]['parents']] == ['tgt_base', 'src_base', 'src_tuned']
    assert hist[1]['params']['method'] == 'gradient_ascent' and hist[1]['params']['forget'] == ['The capital of France is Paris.']
    tr = chain_dir(tmp_path/'out')/'01-transfer'
    from model_ops.transfer import transfer
    want = transfer(models/'base', models/'ft1', models/'base', alpha=0.5)          # the reference: transfer called directly
    got = WeightStore.open(tr)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert weights_hash(tmp_path/'out') != weights_hash(tr)
    r = reproduce(tmp_path/'out', tmp_path/'rep', steps='all')
    assert r['identical'] and [s['op'] for s in r['steps']] == ['transfer', 'unlearn', 'prune']
    revert(tmp_path/'out', tmp_path/'back', 1)                                       # back to the transfer's output
    assert weights_hash(tmp_path/'back') == weights_hash(tr)
