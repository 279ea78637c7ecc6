"""The Hugging Face Hub: which files a dataset has, fetching them, downloading a model repo and
uploading an exported model, honouring HF_ENDPOINT (another base URL: a mirror, a local server) and
HF_TOKEN.

Listing goes through the Hub's own client (huggingface_hub, which tokenizers already needs): the
tree API of a dataset's parquet export (the `refs/convert/parquet` branch every Hub dataset has),
with each file's size and sha256. Files come down through urls.download_file, not the client:
huggingface_hub 2 downloads into a temporary file unique to the process (its PR #4228), so an
interrupted download starts over from zero, where download_file continues a `.part` file with a
Range request; it also checks the size and the Hub's sha256 and moves the file into place whole.
A model repo comes down through the client's snapshot_download instead, into its cache (HF_HOME):
files already there are not fetched again, and other tools that read the cache share them.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..common import PicochatError, first_line
from .urls import download_file

PARQUET_REVISION = "refs/convert/parquet"


def endpoint() -> str:
    """The Hub's base URL: $HF_ENDPOINT (a mirror, a local server), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    path: str  # in the repo
    revision: str
    size: int | None
    sha256: str | None  # the Hub's, for LFS files

    @property
    def url(self) -> str:
        return f"{endpoint()}/datasets/{self.repo}/resolve/{self.revision}/{self.path}"


def _reason(e: Exception) -> str:
    return first_line(e, 160) or type(e).__name__


def _token() -> str | None:
    """HF_TOKEN, or None: the client then uses its stored login, if any."""
    return os.environ.get("HF_TOKEN") or None


def _hub_error(e: Exception, what: str, verb: str = "download") -> PicochatError:
    """One line for a failed Hub call: what, where, and how to point picochat elsewhere."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 404:
        return PicochatError(f"not found on the Hub: {what} (HTTP 404)")
    if status in (401, 403):
        return PicochatError(f"the Hub refused {what} (HTTP {status}): set HF_TOKEN to a token with access")
    reason = _reason(e)
    return PicochatError(f"cannot {verb} {what}: {reason}" + (HINT if verb == "download" else ""))


@contextmanager
def _quiet_client():
    """The client retries a failed request 5 times over about 25 s, logging two lines each time:
    keep its retries, not its lines (a failure ends in one error line of ours)."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def list_files(repo: str, path: str | None = None, revision: str = "main") -> list[RemoteFile]:
    """Every file of a dataset repo (under `path`), with its size and sha256."""
    from huggingface_hub import HfApi
    where = f"{endpoint()}/api/datasets/{repo}/tree/{revision}" + (f"/{path}" if path else "")
    try:
        with _quiet_client():
            tree = list(HfApi(endpoint=endpoint()).list_repo_tree(repo, path, recursive=True, repo_type="dataset",
                                                                  revision=revision))
    except Exception as e:  # httpx and huggingface_hub errors, whatever their class
        raise _hub_error(e, where) from None
    return [RemoteFile(repo, f.path, revision, f.size, f.lfs.sha256 if f.lfs else None)
            for f in tree if getattr(f, "size", None) is not None]


def list_parquet(repo: str, config: str, split: str) -> list[RemoteFile]:
    """The parquet files of one config and split of a dataset's parquet export, in order."""
    dirs = {f"{config}/{split}", f"{config}/partial-{split}"}  # big splits are exported in part
    files = [f for f in list_files(repo, config, PARQUET_REVISION)
             if f.path.endswith(".parquet") and f.path.rsplit("/", 1)[0] in dirs]
    if not files:
        raise PicochatError(f"no parquet files for {config}/{split} in the Hub's export of {repo} "
                            f"({endpoint()}/api/datasets/{repo}/tree/{PARQUET_REVISION}/{config})")
    return sorted(files, key=lambda f: f.path)


HINT = (". Without a network, point HF_ENDPOINT at a mirror, or put the files in the data dir yourself "
        "(--data-dir or $PICOCHAT_DATA)")


def fetch(file: RemoteFile, dest: Path, timeout: float = 30, retries: int = 5, on_bytes=None) -> Path:
    """Download `file` to `dest`, resumably, checked against the Hub's size and sha256."""
    token = os.environ.get("HF_TOKEN")
    path = download_file(file.url, dest, retries=retries, timeout=timeout, sha256=file.sha256, on_bytes=on_bytes,
                         headers={"Authorization": f"Bearer {token}"} if token else None, hint=HINT)
    if file.size is not None and path.stat().st_size != file.size:
        path.unlink()
        raise PicochatError(f"download of {file.url} is {path.stat().st_size} bytes, not {file.size}: removed")
    return path


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def check_repo_id(repo: str) -> str:
    if not REPO_ID.fullmatch(repo):
        raise PicochatError(f"--push {repo!r}: a Hub repo is USER/NAME (or ORG/NAME)")
    return repo


MODEL_REF = re.compile(rf"(?P<repo>{REPO_ID.pattern})(?:@(?P<revision>[\w.\-/]+))?")


def model_ref(text: str) -> tuple[str, str] | None:
    """OWNER/NAME[@REVISION] -> (repo, revision), or None where `text` is no such name."""
    m = MODEL_REF.fullmatch(text)
    return (m["repo"], m["revision"] or "main") if m else None


class HubUnreachable(PicochatError):
    """The Hub did not answer (no network, HF_HUB_OFFLINE, a server error): a cached copy may do."""


def _model_error(e: Exception, repo: str, revision: str) -> PicochatError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    if isinstance(e, RevisionNotFoundError):
        return PicochatError(f"the Hub's {repo} has no revision {revision!r} ({endpoint()})")
    if isinstance(e, (RepositoryNotFoundError, GatedRepoError)):
        token = "HF_TOKEN is set but cannot read it" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
        return PicochatError(f"the Hub ({endpoint()}) has no model repo {repo} that this client may read ({token}): "
                             "check the name, or set HF_TOKEN to a token with access")
    reason = _reason(e)
    return HubUnreachable(f"cannot reach the Hub for {repo} ({reason}), and its cache has no copy of it: without a "
                          "network, point HF_ENDPOINT at a mirror, or give --load a local directory")


def model_files(repo: str, revision: str) -> tuple[str, dict[str, int | None]]:
    """The commit a model repo's revision is at, and its files with their sizes."""
    from huggingface_hub import HfApi
    try:
        with _quiet_client():
            info = HfApi(endpoint=endpoint(), token=_token()).model_info(
                repo, revision=revision, files_metadata=True)
    except Exception as e:
        raise _model_error(e, repo, revision) from None
    return info.sha, {s.rfilename: s.size for s in info.siblings or []}


def cached_model(repo: str, revision: str) -> Path | None:
    """The client's cached snapshot of a model repo's revision (a branch, tag or commit), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def download_model(repo: str, revision: str, files: list[str]) -> Path:
    """Those files of a model repo's revision, into the client's cache; returns the folder that holds
    them (the cache's snapshot of the revision's commit, which the cache's refs/ then names, so that
    cached_model finds it offline)."""
    from huggingface_hub import snapshot_download
    try:
        with _quiet_client():
            return Path(snapshot_download(repo, revision=revision, allow_patterns=files, endpoint=endpoint(),
                                          token=_token()))
    except Exception as e:
        raise _model_error(e, repo, revision) from None


def upload(folder: Path, repo: str, message: str) -> str:
    """Upload a directory to a model repo on the Hub, created if it is missing, through the Hub's
    own client (HF_TOKEN or its stored login authenticates); returns the commit's URL."""
    from huggingface_hub import HfApi
    api = HfApi(endpoint=endpoint(), token=_token())
    try:
        with _quiet_client():
            api.create_repo(check_repo_id(repo), repo_type="model", exist_ok=True)
            info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message)
    except PicochatError:
        raise
    except Exception as e:
        raise _hub_error(e, f"the upload of {folder} to {endpoint()}/{repo}", verb="complete") from None
    return str(info.commit_url)
