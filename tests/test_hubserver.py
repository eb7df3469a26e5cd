"""The fake Hub speaks the protocol huggingface_hub expects, and its faults do what they say."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

from tests.hubserver import HubServer, commit_of

DATA = bytes(range(256)) * 1000  # 256 kB


def test_metadata_via_huggingface_hub(hub: HubServer) -> None:
    hub.add_file("org/m", "m.gguf", DATA)
    url = hf_hub_url("org/m", "m.gguf", revision="main", endpoint=hub.url)
    meta = get_hf_file_metadata(url)
    assert meta.etag == hashlib.sha256(DATA).hexdigest()
    assert meta.size == len(DATA)
    assert meta.commit_hash == commit_of("org/m", "main")
    assert meta.location.startswith(hub.cdn_url + "/_lfs/")


def test_pinned_commit_resolves(hub: HubServer) -> None:
    hub.add_file("org/m", "m.gguf", DATA)
    commit = commit_of("org/m", "main")
    meta = get_hf_file_metadata(hf_hub_url("org/m", "m.gguf", revision=commit, endpoint=hub.url))
    assert meta.commit_hash == commit


def test_range_requests(hub: HubServer) -> None:
    hub.add_file("org/m", "m.gguf", DATA)
    url = hf_hub_url("org/m", "m.gguf", endpoint=hub.url)
    with httpx.Client(follow_redirects=True) as c:
        r = c.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == DATA[10:20]
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(DATA)}"
        assert c.get(url, headers={"Range": "bytes=-5"}).content == DATA[-5:]
        assert c.get(url, headers={"Range": f"bytes={len(DATA)}-"}).status_code == 416
        hub.faults.ignore_range = True
        r = c.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 200 and r.content == DATA


def test_errors_carry_hub_error_codes(hub: HubServer) -> None:
    hub.add_file("org/m", "m.gguf", DATA)
    hub.add_file("org/gated", "g.gguf", DATA)
    hub.gate("org/gated", "hf_right")
    with pytest.raises(EntryNotFoundError):
        get_hf_file_metadata(hf_hub_url("org/m", "nope.gguf", endpoint=hub.url))
    with pytest.raises(RevisionNotFoundError):
        get_hf_file_metadata(hf_hub_url("org/m", "m.gguf", revision="v9", endpoint=hub.url))
    with pytest.raises(RepositoryNotFoundError):
        get_hf_file_metadata(hf_hub_url("org/none", "m.gguf", endpoint=hub.url))
    with pytest.raises(GatedRepoError) as no_token:
        get_hf_file_metadata(hf_hub_url("org/gated", "g.gguf", endpoint=hub.url))
    assert no_token.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as wrong:
        get_hf_file_metadata(hf_hub_url("org/gated", "g.gguf", endpoint=hub.url), token="hf_wrong")
    assert wrong.value.response.status_code == 403
    assert get_hf_file_metadata(hf_hub_url("org/gated", "g.gguf", endpoint=hub.url), token="hf_right").size


def test_api_lists_siblings(hub: HubServer) -> None:
    hub.add_file("org/m", "a.gguf", DATA)
    hub.add_file("org/m", "README.md", b"hi", lfs=False)
    info = HfApi(endpoint=hub.url).model_info("org/m")
    assert sorted(s.rfilename for s in info.siblings or []) == ["README.md", "a.gguf"]


def test_body_faults(hub: HubServer) -> None:
    hub.add_file("org/m", "m.gguf", DATA)
    url = hf_hub_url("org/m", "m.gguf", endpoint=hub.url)
    with httpx.Client(follow_redirects=True) as c:
        hub.faults.flip_at, hub.faults.times = 1000, 1
        body = c.get(url).content
        assert len(body) == len(DATA) and body != DATA and body[1000] == DATA[1000] ^ 0xFF
        assert c.get(url).content == DATA  # times=1: only the first body request
        hub.faults.clear()
        hub.faults.drop_at = 5000
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(url)
        hub.faults.clear()
        hub.faults.stall_at, hub.faults.stall_s = 100, 5
        with pytest.raises(httpx.ReadTimeout):
            c.get(url, timeout=0.5)
        hub.faults.clear()
        hub.faults.size_delta = -10
        assert c.get(url).content == DATA[:-10]
        hub.faults.clear()
        hub.faults.status = 401
        assert c.get(url).status_code == 401
