"""Dictionaries from the Hugging Face Hub, offline, from a huggingface_hub cache laid out as documented
(models--org--name/{refs,snapshots,blobs}); and the errors when there is no cached copy."""

import hashlib

import numpy as np
import pytest

from csr_core.dictionary_file import is_hub_id, load_dictionary, save_dictionary
from tests.test_dictionary_file import FP, make_dictionary

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    return cache


def publish_to_cache(cache, repo, tmp_path, filename="dictionary.safetensors"):
    """Lay a dictionary file out as huggingface_hub's cache holds a downloaded file."""
    source = save_dictionary(tmp_path / "made.safetensors", make_dictionary())
    data = source.read_bytes()
    folder = cache / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot = folder / "snapshots" / COMMIT / filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)


def test_a_hub_id_loads_from_the_offline_cache(offline_hub_cache, tmp_path):
    publish_to_cache(offline_hub_cache, "someone/csr-tiny", tmp_path)
    d = load_dictionary("someone/csr-tiny", model=FP)
    assert d.model == FP and d.keys.atoms[1].shape == (12, 8)
    assert load_dictionary("someone/csr-tiny", revision=COMMIT).values.s_n == 2


def test_offline_without_a_cached_copy_says_what_to_do(offline_hub_cache):
    with pytest.raises(ValueError, match="not in the local Hugging Face cache.*run once with network"):
        load_dictionary("someone/not-downloaded")


def test_a_repo_without_the_file_or_another_filename(offline_hub_cache, tmp_path):
    publish_to_cache(offline_hub_cache, "someone/named", tmp_path, filename="smollm2.safetensors")
    assert load_dictionary("someone/named", filename="smollm2.safetensors").model == FP
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        load_dictionary("someone/named")  # offline, the cache cannot say whether the repo has the file


def test_local_paths_are_never_taken_for_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    save_dictionary(tmp_path / "runs" / "d.safetensors", make_dictionary())
    assert not is_hub_id("runs/d.safetensors") and not is_hub_id("./x/y") and not is_hub_id("runs")
    assert is_hub_id("org/name") and not is_hub_id("a/b/c")
    assert load_dictionary("runs/d.safetensors").model == FP


def test_exported_dictionaries_carry_a_model_card_with_the_fields_users_need(tmp_path):
    from neuraldict.model_card import card_path, model_card, write_card

    d = make_dictionary()
    d.provenance.update(corpus="python-docs", train_tokens=16384, global_step=400)
    path = save_dictionary(tmp_path / "dictionary.safetensors", d)
    card = write_card(path, d, command="lightning fit --config configs/llama.yaml").read_text()
    assert card_path(path).name == "dictionary.card.md"
    for field in ("base_model: tiny", "| `tiny` | 3 | 2 | 8 |", "`python-docs`, 16384 tokens", "steps: 400",
                  "lightning fit --config configs/llama.yaml", "| keys | 2 | 16 | 1 |", "| values | 1 | 20 | 2 |"):
        assert field in card, field
    # paper layout: 32 · s · s_n / d_h for keys (s_n 1) and values (s_n 2, s / 2 per chunk), averaged
    assert "| 4 | 16.00 |" in model_card(d)
    d.runtime = {"guard_atoms": 256}
    assert "- `guard_atoms`: 256" in model_card(d)
    d.keys.sensitivity, d.values.sensitivity = np.array([1.0, 3.0, 2.0]), np.array([5.0, 4.0, 6.0])
    assert "- keys: median 2, range 1 … 3 (most sensitive: layer 1)" in model_card(d)


def test_push_uploads_the_file_and_its_card(tmp_path):
    from neuraldict.cli import push

    class FakeApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo, private, exist_ok):
            self.calls.append(("create", repo, private))
            return f"https://huggingface.co/{repo}"

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id):
            self.calls.append(("upload", path_in_repo, repo_id, path_or_fileobj))

    path = save_dictionary(tmp_path / "dictionary.safetensors", make_dictionary())
    api = FakeApi()
    assert push(str(path), "someone/csr-tiny", api=api) == "https://huggingface.co/someone/csr-tiny"
    assert [c[:3] for c in api.calls] == [("create", "someone/csr-tiny", False),
                                         ("upload", "dictionary.safetensors", "someone/csr-tiny"),
                                         ("upload", "README.md", "someone/csr-tiny")]
    assert api.calls[2][3].endswith("dictionary.card.md")
    (tmp_path / "broken.safetensors").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        push(str(tmp_path / "broken.safetensors"), "someone/x", api=FakeApi())
