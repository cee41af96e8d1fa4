"""Loading by Hugging Face Hub id through the Hub cache (bd3lm.hub.resolve_model_dir and BD3LM.from_pretrained).

The cache is built by hand in the Hub's snapshot layout (models--org--name/{refs/main, blobs/<hash>,
snapshots/<commit>/<file> -> ../../blobs/<hash>}), not by huggingface_hub, so the tests check that the library
finds what a real download leaves on disk.
"""

from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import HUB_COMMIT as COMMIT
from conftest import tiny_model, write_snapshot
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from transformers import AutoModelForMaskedLM

import bd3lm
from bd3lm.hub import resolve_model_dir

REPO = "tiny-org/bd3lm-tiny"


def logits_of(model) -> torch.Tensor:
    x = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


def test_hub_id_loads_from_the_cache_like_the_directory(tmp_path, hub_cache):
    src = tmp_path / "saved"
    tiny_model(seed=0).save_pretrained(src)
    snap = write_snapshot(hub_cache, REPO, src)
    assert resolve_model_dir(REPO) == snap
    assert resolve_model_dir(REPO, revision=COMMIT) == snap
    by_id = bd3lm.BD3LM.from_pretrained(REPO)
    by_dir = bd3lm.BD3LM.from_pretrained(src)
    assert torch.equal(logits_of(by_id), logits_of(by_dir))
    assert isinstance(bd3lm.BD3LM.from_pretrained(REPO, revision=COMMIT), bd3lm.BD3LM)
    assert torch.equal(logits_of(AutoModelForMaskedLM.from_pretrained(REPO)), logits_of(by_dir))


def test_explicit_cache_dir_is_used(tmp_path):
    src = tmp_path / "saved"
    tiny_model(seed=2).save_pretrained(src)
    other = tmp_path / "other_cache"
    snap = write_snapshot(other, REPO, src)
    assert resolve_model_dir(REPO, cache_dir=other) == snap
    model = bd3lm.BD3LM.from_pretrained(REPO, cache_dir=str(other))
    assert torch.equal(logits_of(model), logits_of(bd3lm.BD3LM.from_pretrained(src)))


def test_missing_id_offline_is_a_one_line_error(hub_cache):
    for call in (lambda: resolve_model_dir("tiny-org/not-there"),
                 lambda: bd3lm.BD3LM.from_pretrained("tiny-org/not-there")):
        with pytest.raises(FileNotFoundError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg
        assert "'tiny-org/not-there'" in msg and "not in the local Hugging Face cache" in msg
        assert "hf download tiny-org/not-there" in msg and "HF_HUB_OFFLINE" in msg


def test_cached_config_without_weights_offline_is_a_one_line_error(tmp_path, hub_cache):
    src = tmp_path / "saved"
    tiny_model().save_pretrained(src)
    write_snapshot(hub_cache, REPO, src, files=("config.json",))
    with pytest.raises(FileNotFoundError, match="has no weights in the local cache") as err:
        bd3lm.BD3LM.from_pretrained(REPO)
    assert "\n" not in str(err.value)


def test_local_directory_shadows_the_hub_id(tmp_path, hub_cache, monkeypatch):
    cached, local = tmp_path / "cached", tmp_path / "work" / REPO
    tiny_model(seed=0).save_pretrained(cached)
    tiny_model(seed=1).save_pretrained(local)
    write_snapshot(hub_cache, REPO, cached)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_model_dir(REPO) == Path(REPO)
    loaded = logits_of(bd3lm.BD3LM.from_pretrained(REPO))
    assert torch.equal(loaded, logits_of(bd3lm.BD3LM.from_pretrained(local)))
    assert not torch.equal(loaded, logits_of(bd3lm.BD3LM.from_pretrained(cached)))


def test_a_missing_path_that_is_no_hub_id_says_it_does_not_exist(tmp_path, hub_cache):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "a" / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model_dir(tmp_path / "file")


def test_downloads_only_when_online(tmp_path, hub_cache, monkeypatch):
    """Online and not cached: one download of the config and safetensors files only; local_files_only=True (or
    offline) never downloads."""
    src = tmp_path / "saved"
    tiny_model().save_pretrained(src)
    calls = []

    def fake_snapshot_download(repo_id, *, local_files_only=False, cache_dir=None, **kw):
        calls.append(dict(repo_id=repo_id, local_files_only=local_files_only, **kw))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(write_snapshot(hub_cache, repo_id, src))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve_model_dir(REPO)  # HF_HUB_OFFLINE: the cache look-up only
    assert [c["local_files_only"] for c in calls] == [True]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls.clear()
    with pytest.raises(FileNotFoundError, match="local_files_only=True"):
        resolve_model_dir(REPO, local_files_only=True)
    assert [c["local_files_only"] for c in calls] == [True]
    calls.clear()
    folder = resolve_model_dir(REPO)
    assert [c["local_files_only"] for c in calls] == [True, False]
    repo_files = ["README.md", "config.json", "configuration_bd3lm.py", "model.safetensors", "modeling_bd3lm.py",
                  "pytorch_model.bin", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    fetched = list(filter_repo_objects(repo_files, allow_patterns=calls[1]["allow_patterns"]))
    assert fetched == ["config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                       "model.safetensors.index.json"]
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_a_failed_download_is_a_one_line_error(hub_cache, monkeypatch):
    def failing(repo_id, *, local_files_only=False, **kw):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise LocalEntryNotFoundError("Got: ConnectError: no route\nAn error happened while trying to locate files")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OSError, match="could not download model 'tiny-org/bd3lm-tiny'") as err:
        resolve_model_dir(REPO)
    assert "\n" not in str(err.value) and "no route" in str(err.value)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """``runs/hf`` with ``runs/`` present is a mistyped local path: reported as missing, with no Hub lookup even
    when online."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("looked up on the Hub"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory 'runs/hf' does not exist \(its parent"):
        resolve_model_dir("runs/hf")
