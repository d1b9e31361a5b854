"""The real huggingface_hub client against tests/hub_server.py's LocalHub: push, pull, revisions, cache, errors."""

import json
import os

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    create_repo,
    hf_hub_download,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import TOKEN, LocalHub, hub, offline_mode, use_local_hub  # noqa: F401

REPO = "local-user/tiny-model"
CONFIG = {"model_type": "llama", "hidden_size": 8}
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 4  # safetensors-like: binary, has NULs


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _push_folder(tmp_path, repo_id=REPO, **kwargs):
    folder = tmp_path / "to_push"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    return upload_folder(repo_id=repo_id, folder_path=folder, **kwargs)


def test_fixture_points_client_at_local_hub(hub, tmp_path):  # noqa: F811
    assert hub.url.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == hub.url and os.environ["HF_ENDPOINT"] == hub.url
    assert constants.HF_HUB_CACHE.startswith(str(tmp_path)) and not constants.HF_HUB_OFFLINE
    assert HfApi().whoami()["name"] == hub.user  # token comes from HF_TOKEN, set by the fixture


def test_patches_are_undone_and_server_stops(tmp_path):
    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, os.environ.get("HF_TOKEN"))
    with LocalHub() as local, use_local_hub(local, tmp_path / "home"):
        create_repo("local-user/x")
        assert ("POST", "/api/repos/create") in local.requests
        url = local.url
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, os.environ.get("HF_TOKEN")) == before
    with pytest.raises(Exception) as err:  # nothing listens any more: a connection error, not an HTTP answer
        HfApi(endpoint=url, token=TOKEN).model_info("local-user/x")
    assert not isinstance(err.value, HfHubHTTPError)


def test_push_folder_then_download_both_files(hub, tmp_path):  # noqa: F811
    url = create_repo(REPO)
    assert url.repo_id == REPO
    info = _push_folder(tmp_path)
    assert len(info.oid) == 40
    # the JSON went inline in the commit (regular), the binary through the LFS batch API + PUT
    assert any(m == "PUT" and p.startswith("/_lfs/") for m, p in hub.requests)
    config_path = hf_hub_download(REPO, "config.json")
    weights_path = hf_hub_download(REPO, "model.safetensors")
    assert json.loads(_read(config_path)) == CONFIG
    assert _read(weights_path) == WEIGHTS
    assert config_path.startswith(str(tmp_path)) and f"snapshots{os.sep}{info.oid}" in config_path

    snapshot = snapshot_download(REPO)
    assert sorted(os.listdir(snapshot)) == [".gitattributes", "config.json", "model.safetensors"]
    assert _read(os.path.join(snapshot, "model.safetensors")) == WEIGHTS
    siblings = {s.rfilename: s for s in HfApi().model_info(REPO).siblings}
    assert siblings["model.safetensors"].lfs is not None and siblings["config.json"].lfs is None


def test_branch_push_and_pull_at_branch_and_commit_sha(hub, tmp_path):  # noqa: F811
    api = HfApi()
    api.create_repo(REPO)
    main_sha = _push_folder(tmp_path).oid
    api.create_branch(REPO, branch="int4")
    commit = api.upload_file(path_or_fileobj=b'{"bits": 4}', path_in_repo="rq_config.json", repo_id=REPO,
                             revision="int4")  # fmt: skip
    assert commit.oid != main_sha
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "int4"}
    for revision in ("int4", commit.oid):
        assert _read(hf_hub_download(REPO, "rq_config.json", revision=revision)) == b'{"bits": 4}'
        assert _read(hf_hub_download(REPO, "model.safetensors", revision=revision)) == WEIGHTS
    snapshot = snapshot_download(REPO, revision="int4")
    assert os.path.basename(snapshot) == commit.oid and "rq_config.json" in os.listdir(snapshot)
    with pytest.raises(EntryNotFoundError):  # the branch commit did not touch main
        hf_hub_download(REPO, "rq_config.json", revision="main")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch")


def test_second_commit_keeps_first_revision_readable(hub, tmp_path):  # noqa: F811
    api = HfApi()
    api.create_repo(REPO)
    first = _push_folder(tmp_path).oid
    new_weights = WEIGHTS[::-1]
    second = api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("model.safetensors", new_weights),
            CommitOperationDelete("config.json"),
            CommitOperationAdd("sub/dir/notes.txt", b"v2"),
            CommitOperationAdd("README.md", b"---\nlicense: apache-2.0\n---\n# tiny\n"),  # client validates YAML
        ],
        commit_message="v2",
    ).oid
    assert second != first
    assert _read(hf_hub_download(REPO, "model.safetensors")) == new_weights
    assert _read(hf_hub_download(REPO, "model.safetensors", revision=first)) == WEIGHTS
    assert json.loads(_read(hf_hub_download(REPO, "config.json", revision=first))) == CONFIG
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "config.json")
    assert set(api.list_repo_files(REPO)) == {".gitattributes", "README.md", "model.safetensors", "sub/dir/notes.txt"}
    assert [f.path for f in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/dir"]
    # pushing the same content again is skipped by the client (preupload oids match): no empty commit
    assert api.upload_file(path_or_fileobj=b"v2", path_in_repo="sub/dir/notes.txt", repo_id=REPO).oid == second


def test_offline_pull_from_cache(hub, tmp_path):  # noqa: F811
    create_repo(REPO)
    _push_folder(tmp_path)
    online_path = hf_hub_download(REPO, "model.safetensors")
    online_snapshot = snapshot_download(REPO)
    seen = len(hub.requests)
    with offline_mode():
        assert hf_hub_download(REPO, "model.safetensors") == online_path
        assert _read(online_path) == WEIGHTS
        assert snapshot_download(REPO) == online_snapshot
        with pytest.raises(LocalEntryNotFoundError):  # never downloaded => not in the cache
            hf_hub_download(REPO, "missing.bin")
    assert len(hub.requests) == seen  # offline really made no request


def test_wrong_token_on_push_raises_401(hub, tmp_path):  # noqa: F811
    create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        create_repo("local-user/other", token="hf_wrong")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError):  # anonymous push is refused too
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert HfApi().list_repo_files(REPO) == [".gitattributes"]


def test_missing_repo_raises_repository_not_found(hub):  # noqa: F811
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("local-user/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("local-user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("local-user/does-not-exist")


def test_missing_file_raises_entry_not_found(hub):  # noqa: F811
    sha = hub.add_files(REPO, {"config.json": b"{}"})  # seed the store directly, no upload
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.json")
    assert _read(hf_hub_download(REPO, "config.json", revision=sha)) == b"{}"


def test_private_repo_needs_the_token(hub, tmp_path):  # noqa: F811
    create_repo(REPO, private=True)
    _push_folder(tmp_path)
    with pytest.raises(RepositoryNotFoundError):  # anonymous: the Hub answers 401 + RepoNotFound
        hf_hub_download(REPO, "config.json", token=False)
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(REPO, "config.json", token="hf_wrong")
    assert json.loads(_read(hf_hub_download(REPO, "config.json", token=TOKEN))) == CONFIG
    assert HfApi().model_info(REPO).private is True
