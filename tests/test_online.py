"""Offline by default, online when the user is: qbench follows the user's own HF_*_OFFLINE
settings and its messages say what to set.  Nothing here touches a network."""
import os
import shutil
import subprocess

import pytest

from qbench.online import is_offline, offline_hint
from qbench.paths import REPO_ROOT
from qbench.zoo import UnknownModelError, resolve_model


def test_messages_name_the_setting_and_never_claim_offline_when_the_user_is_online(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert is_offline("HF_DATASETS_OFFLINE") and "set HF_DATASETS_OFFLINE=0" in offline_hint("HF_DATASETS_OFFLINE",
                                                                                              "dataset")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    hint = offline_hint("HF_DATASETS_OFFLINE", "dataset")
    assert not is_offline("HF_DATASETS_OFFLINE") and "=1" not in hint and "allows downloads" in hint


def test_a_hub_model_id_not_in_the_cache_says_what_to_set():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the suite runs offline
    with pytest.raises(UnknownModelError, match="as a Hub model id.*set HF_HUB_OFFLINE=0"):
        resolve_model("qbench-tests/surely-not-a-model")


def test_a_hub_model_id_resolves_to_its_snapshot(monkeypatch, micro_checkpoint):
    """The Hub path as the user gets it online, with the download replaced by a local folder."""
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or
                        str(micro_checkpoint))
    ref = resolve_model("some-org/some-model")
    assert asked == ["some-org/some-model"] and ref.name == "some-org/some-model" and ref.checkpoint_hash


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_keeps_the_users_offline_settings():
    def value(env):
        out = subprocess.run(["make", "-pn", "-f", str(REPO_ROOT / "Makefile"), "clean-venv"], env={**os.environ, **env},
                             capture_output=True, text=True, cwd=REPO_ROOT).stdout
        return [line for line in out.splitlines() if line.startswith("HF_HUB_OFFLINE =")]

    assert value({"HF_HUB_OFFLINE": "0"}) == ["HF_HUB_OFFLINE = 0"]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run(["make", "-pn", "clean-venv"], env=env, capture_output=True, text=True, cwd=REPO_ROOT).stdout
    assert "HF_HUB_OFFLINE = 1" in out.splitlines()
