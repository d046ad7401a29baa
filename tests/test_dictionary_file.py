import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from csr_core.dictionary_file import (
    DictionaryFile,
    KindDictionaries,
    ModelFingerprint,
    bf16_atoms,
    load_dictionary,
    save_dictionary,
)

FP = ModelFingerprint("tiny", n_layers=3, n_kv_heads=2, head_dim=8, rope_theta=10000.0)


def unit_rows(n, d, seed):
    a = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def make_dictionary():
    keys = KindDictionaries(s_n=1, sparsity=4, layer_to_group=[0, 0, 1], atoms=[unit_rows(16, 8, 0), unit_rows(12, 8, 1)])
    values = KindDictionaries(s_n=2, sparsity=2, layer_to_group=[0, 0, 0], atoms=[unit_rows(20, 4, 2)])
    return DictionaryFile(FP, keys, values, provenance={"trainer": "test"})


def test_round_trip(tmp_path):
    d = make_dictionary()
    path = save_dictionary(tmp_path / "dict.safetensors", d)
    back = load_dictionary(path, model=FP)
    assert back.model == FP and back.provenance == {"trainer": "test"}
    for kind in ("keys", "values"):
        a, b = d.kind(kind), back.kind(kind)
        assert (a.s_n, a.sparsity, a.layer_to_group) == (b.s_n, b.sparsity, b.layer_to_group)
        for x, y in zip(a.atoms, b.atoms):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(back.keys.for_layer(2), d.keys.atoms[1])
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temp file"


def _rewrite(path, *, tensors=None, meta_edit=None, drop_meta=False):
    """Re-save a valid file with one thing broken."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        meta = json.loads(f.metadata()["csr_dictionary"])
    t = load_file(str(path))
    if tensors:
        tensors(t)
    if meta_edit:
        meta_edit(meta)
    save_file(t, str(path), metadata=None if drop_meta else {"csr_dictionary": json.dumps(meta)})


@pytest.mark.parametrize(
    "breakage, message",
    [
        (dict(drop_meta=True), "metadata key 'csr_dictionary' is missing"),
        (dict(meta_edit=lambda m: m.update(format_version=99)), "format_version 99 is unknown"),
        (dict(meta_edit=lambda m: m["keys"].pop("s_n")), "'keys.s_n' is missing"),
        (dict(meta_edit=lambda m: m.pop("model")), "'model' is missing"),
        (dict(tensors=lambda t: t.pop("keys/group_1")), "tensor 'keys/group_1' is missing"),
        (dict(tensors=lambda t: t.update({"keys/group_0": unit_rows(16, 6, 0)})), r"shape \(16, 6\), expected"),
        (dict(tensors=lambda t: t.update({"keys/group_0": unit_rows(15, 8, 0)})), "n_atoms\\[0\\] = 16 but tensor"),
        (dict(tensors=lambda t: t["values/group_0"].__setitem__((3, 1), np.nan)), "non-finite"),
        (dict(tensors=lambda t: t["values/group_0"].__setitem__(5, 0.0)), "atom 5 has norm 0"),
        (dict(tensors=lambda t: t["values/group_0"].__setitem__(5, t["values/group_0"][5] * 1.006)), "atom 5 has norm 1.006"),
        (dict(meta_edit=lambda m: m["values"].update(layer_to_group=[0, 0])), "has 2 entries, model.n_layers is 3"),
        (dict(meta_edit=lambda m: m["keys"].update(layer_to_group=[0, 2, 1])), "names groups \\[2\\]"),
        (dict(meta_edit=lambda m: m["values"].update(s_n=3)), "s_n = 3 must be a positive divisor of head_dim = 8"),
        (dict(meta_edit=lambda m: m["model"].update(head_dim="8")), "'model.head_dim' = '8' has the wrong type"),
        (dict(meta_edit=lambda m: m.update(format_version=1.0)), "format_version 1.0 is unknown"),
        (dict(meta_edit=lambda m: m.update(format_version=True)), "format_version True is unknown"),
        (dict(meta_edit=lambda m: m["keys"].update(sparsity=True)), "keys.sparsity = True must be a positive integer"),
        (dict(tensors=lambda t: t.update({"keys/bonus": unit_rows(2, 8, 0)})), r"tensors \['keys/bonus'\] are not part"),
        (dict(tensors=lambda t: t.update({"keys/group_0": t["keys/group_0"].astype(np.float16)})), "must be float32"),
        (dict(tensors=lambda t: t.update({"keys/group_0": t["keys/group_0"].astype(np.int64)})), "must be float32"),
    ],
)
def test_bad_files_are_rejected_with_the_field_named(tmp_path, breakage, message):
    path = save_dictionary(tmp_path / "dict.safetensors", make_dictionary())
    _rewrite(path, **breakage)
    with pytest.raises(ValueError, match=message) as error:
        load_dictionary(path)
    assert str(path) in str(error.value)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _not_safetensors(path):
    path.write_bytes(b"this is plain text, not a dictionary file" * 10)


def _bad_json(path):
    t = load_file(str(path))
    save_file(t, str(path), metadata={"csr_dictionary": "{not json"})


@pytest.mark.parametrize("damage, message", [(_truncate, "not a readable safetensors file"),
                                             (_not_safetensors, "not a readable safetensors file"),
                                             (_bad_json, "is not valid JSON")])
def test_damaged_files_are_a_value_error_naming_the_path(tmp_path, damage, message):
    path = save_dictionary(tmp_path / "dict.safetensors", make_dictionary())
    damage(path)
    with pytest.raises(ValueError, match=message) as error:
        load_dictionary(path)
    assert str(path) in str(error.value)


def test_a_directory_is_called_a_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory, not a dictionary file"):
        load_dictionary(tmp_path)


def test_dictionary_for_another_model_is_rejected(tmp_path):
    path = save_dictionary(tmp_path / "dict.safetensors", make_dictionary())
    other = ModelFingerprint("smol", n_layers=3, n_kv_heads=2, head_dim=64, rope_theta=10000.0)
    with pytest.raises(ValueError, match="head_dim: dictionary has 8, model has 64"):
        load_dictionary(path, model=other)


def test_reader_needs_no_torch(tmp_path):
    path = save_dictionary(tmp_path / "dict.safetensors", make_dictionary())
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from csr_core.dictionary_file import load_dictionary\n"
        f"d = load_dictionary({str(path)!r}); print(d.keys.atoms[1].shape)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(12, 8)"


def test_the_command_a_model_mismatch_suggests_parses(tmp_path):
    """The error names a command to run; its flags must exist (checked by parsing it with --print_config)."""
    import re
    import shlex

    path = save_dictionary(tmp_path / "dict.safetensors", make_dictionary())
    other = ModelFingerprint("some/model", n_layers=3, n_kv_heads=2, head_dim=64, rope_theta=10000.0)
    with pytest.raises(ValueError) as error:
        load_dictionary(path, model=other)
    command = re.search(r"`(lightning fit [^`]+)`", str(error.value)).group(1)
    args = shlex.split(command)[1:] + ["--print_config"]
    run = subprocess.run([sys.executable, "-c", "from neuraldict.cli import lightning_main; lightning_main()", *args],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "model: some/model" in run.stdout


def test_bf16_atoms_are_the_nearest_bf16_values_and_stay_unit_norm(tmp_path):
    """What neuraldict exports: each entry rounded to bf16 (nearest, ties to even: torch's rounding), idempotent, rows
    within the file's norm tolerance (2⁻⁸ at worst), so the file writes and reads them back unchanged."""
    torch = pytest.importorskip("torch")
    a = unit_rows(500, 64, 3)
    a[0, :3] = [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(2.0**-130)]  # ties (to even: down, up) and a subnormal
    rounded = bf16_atoms(a)
    assert rounded.dtype == np.float32 and rounded.shape == a.shape
    np.testing.assert_array_equal(rounded, torch.from_numpy(a).to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(bf16_atoms(rounded), rounded)
    unit = bf16_atoms(unit_rows(2000, 64, 4))
    assert np.abs(np.linalg.norm(unit.astype(np.float64), axis=1) - 1).max() <= 2.0**-8
    d = make_dictionary()
    d.keys.atoms = [bf16_atoms(x) for x in d.keys.atoms]
    np.testing.assert_array_equal(load_dictionary(save_dictionary(tmp_path / "d.safetensors", d)).keys.atoms[1], d.keys.atoms[1])
