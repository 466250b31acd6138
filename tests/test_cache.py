"The checkpoint cache and the registry: nothing half-written is ever read, and a change of what an artifact depends on is a new key."
import json

import pytest

from vlmcourse import cache
from vlmcourse.cache import KEY_FILE, cached_artifact, write_atomically
from vlmcourse.registry import ModelEntry, model_entry, models, register


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMCOURSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(root):
    def broken(folder):
        (folder / "weights.bin").write_text("half")
        raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of training
    with pytest.raises(KeyboardInterrupt): cached_artifact("m", {"a": 1}, broken)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    p = cached_artifact("m", {"a": 1}, lambda f: (f / "weights.bin").write_text("whole"))
    assert (p / "weights.bin").read_text() == "whole"


def test_a_corrupted_hit_is_rebuilt(root):
    calls = []
    def build(folder): calls.append(1); (folder / "w").write_text(str(len(calls)))
    p = cached_artifact("m", {"a": 1}, build)
    (p / KEY_FILE).write_text("{not json")  # a hit whose key file is damaged
    assert cached_artifact("m", {"a": 1}, build) == p and len(calls) == 2
    (p / KEY_FILE).unlink()  # a folder with no key file: not ours, or half copied
    cached_artifact("m", {"a": 1}, build)
    assert len(calls) == 3 and json.loads((p / KEY_FILE).read_text())["key"] == {"a": 1}


def test_a_version_change_is_a_new_key(root, monkeypatch):
    p1 = cached_artifact("m", {"a": 1}, lambda f: None)
    monkeypatch.setattr(cache, "CACHE_FORMAT", cache.CACHE_FORMAT + 1)
    p2 = cached_artifact("m", {"a": 1}, lambda f: None)
    assert p1 != p2 and p1.exists() and p2.exists()
    monkeypatch.setattr(cache, "_version", lambda pkg: "0.0-other")  # another torch / transformers
    assert cached_artifact("m", {"a": 1}, lambda f: None) not in (p1, p2)


def test_stale_temporary_folders_are_swept(root):
    p = cached_artifact("m", {"a": 1}, lambda f: None)
    import shutil
    shutil.rmtree(p)
    stale = root / f".tmp-{p.name}-killed"
    stale.mkdir()
    cached_artifact("m", {"a": 1}, lambda f: None)
    assert not stale.exists()


def test_write_atomically_keeps_the_old_folder_when_a_rewrite_fails(tmp_path):
    target = tmp_path / "ckpt"
    write_atomically(target, lambda f: (f / "w").write_text("old"))
    def fails(f):
        (f / "w").write_text("new, half")
        raise OSError("disk full")
    with pytest.raises(OSError): write_atomically(target, fails)
    assert (target / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_registry_lists_the_course_models_and_refuses_clashes():
    ms = models()
    assert {"base", "oracle", "aligned", "cal", "plora"} <= set(ms)
    assert ms["plora"].loader == "vlmcourse.plora:load_plora" and ms["base"].loader == "vlmcourse.llava:load_vlm"
    assert ms["base"].lesson == "02_llava" and ms["aligned"].lesson == "07_preference"
    with pytest.raises(KeyError, match="there are: "): model_entry("no-such-model")
    with pytest.raises(ValueError, match="already registered"): register(ModelEntry("base", "x", "99_x", "m:f"))
    with pytest.raises(ValueError, match="module:function"): register(ModelEntry("new", "x", "99_x", "no colon"))
    with pytest.raises(ValueError, match="loader must be"): register(ModelEntry("new", "x", "99_x", "m:f", loader="load_vlm"))
    assert register(ms["base"]) == ms["base"]  # the same entry twice: a no-op


def test_an_entry_resolves_its_path_through_its_function(monkeypatch, tmp_path):
    import vlmcourse.llava as llava
    monkeypatch.setattr(llava, "oracle_vlm_path", lambda progress=True: tmp_path / "oracle")
    assert models()["oracle"].path(progress=False) == tmp_path / "oracle"


def test_an_entry_loads_with_its_own_loader(monkeypatch, tmp_path):
    import vlmcourse.plora as plora
    monkeypatch.setattr(plora, "plora_vlm_path", lambda progress=True: tmp_path / "p")
    monkeypatch.setattr(plora, "load_plora", lambda path, device=None: ("model from", path, device))
    assert models()["plora"].load(device="cpu") == ("model from", tmp_path / "p", "cpu")
