"""The Hugging Face Hub boundary: every call into huggingface_hub's network API is here.

`ddpmctl sample hf:OWNER/NAME[@REV]` downloads a snapshot (:func:`download`, offline-aware, only
:data:`DOWNLOAD_PATTERNS`: never a pickle, never ONNX); `ddpmctl hub-push` (:mod:`ddpmctl.push`)
logs in (:func:`login`) and uploads a staged model folder in one commit (:func:`upload`). Every
call goes through :func:`_hub_call`, which turns HTTP and network failures into one
:class:`NetworkError` line. What the files mean is :mod:`ddpmctl.modelfolder`'s business.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ddpmctl import __version__
from ddpmctl.errors import DdpmctlError, NetworkError, UsageError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

# What `ddpmctl sample hf:...` downloads: weights, config, card, grid. Never a pickle, never ONNX.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.md", "*.png"]
# What a model folder may carry to the Hub.
UPLOAD_PATTERNS = DOWNLOAD_PATTERNS + ["*.onnx", "*.onnx.data"]
HF_PREFIX = "hf:"
# `hf` is not on PATH when ddpmctl came with pipx: HF_TOKEN, or pipx running the Hub's own CLI, work there.
LOGIN_HELP = ("set HF_TOKEN to a token with write access from https://huggingface.co/settings/tokens, or log in "
              "once with `hf auth login` (installed with pipx: `pipx run --spec huggingface_hub hf auth login`)")


def parse_hf(source: str) -> tuple[str, str | None]:
    """'hf:OWNER/NAME[@REV]' -> (repo_id, revision)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ref = source[len(HF_PREFIX):].lstrip("/")
    repo_id, _, rev = ref.partition("@")
    if not repo_id or (_ and not rev):
        raise UsageError(f"{source!r}: expected hf:OWNER/NAME or hf:OWNER/NAME@REVISION")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"{source!r}: invalid repo id ({str(exc).splitlines()[0]})") from None
    return repo_id, rev or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def download(source: str) -> Path:
    """hf:OWNER/NAME[@REV] -> a local snapshot folder (huggingface_hub's cache; offline-aware)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, rev = parse_hf(source)
    try:
        with _hub_call(f"downloading {source}", repo_id=repo_id, revision=rev):
            path = huggingface_hub.snapshot_download(
                repo_id, revision=rev, allow_patterns=DOWNLOAD_PATTERNS,
                library_name="ddpmctl", library_version=__version__)
    except LocalEntryNotFoundError:
        if offline():
            raise NetworkError(f"{source} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                               "downloading it; unset HF_HUB_OFFLINE to fetch it once") from None
        raise NetworkError(f"{source}: cannot reach the Hugging Face Hub and it is not in the local cache") from None
    return Path(path)


@contextmanager
def _hub_call(action: str, *, repo_id: str | None = None, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / HTTP / network exceptions into one-line DdpmctlErrors."""
    from huggingface_hub import errors as hfe

    try:
        yield
    except DdpmctlError:
        raise
    except hfe.LocalEntryNotFoundError:
        raise
    except hfe.LocalTokenNotFoundError:
        raise NetworkError(f"{action}: no Hugging Face token; {LOGIN_HELP}") from None
    except hfe.GatedRepoError:
        raise NetworkError(f"{action}: {repo_id} is gated; accept its conditions on the Hub and log in "
                           f"({LOGIN_HELP})") from None
    except hfe.RepositoryNotFoundError:
        raise NetworkError(f"{action}: repository {repo_id} not found (or private: {LOGIN_HELP})") from None
    except hfe.RevisionNotFoundError:
        raise NetworkError(f"{action}: revision {revision!r} not found in {repo_id}") from None
    except hfe.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise NetworkError(f"{action}: the Hugging Face token is invalid or expired (HTTP 401); "
                               f"{LOGIN_HELP}") from None
        if status == 403:
            raise NetworkError(f"{action}: the token may not write to {repo_id} (HTTP 403); use a token with "
                               f"write access to that namespace ({LOGIN_HELP})") from None
        detail = getattr(exc, "server_message", None) or str(exc)
        raise NetworkError(f"{action}: HTTP {status or 'error'}: {_one_line(detail)}") from None
    except hfe.HFValidationError as exc:
        raise UsageError(f"{action}: {_one_line(str(exc))}") from None
    except (OSError, TimeoutError) as exc:
        raise NetworkError(f"{action}: {_one_line(str(exc)) or exc.__class__.__name__}") from None
    except Exception as exc:  # noqa: BLE001 - httpx/requests transport errors have no common public base
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "huggingface_hub"):
            raise NetworkError(f"{action}: network error ({exc.__class__.__name__}: "
                               f"{_one_line(str(exc))})") from None
        raise


def _one_line(text: str) -> str:
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line[:300]


def repo_name_for(name: str) -> str:
    """A run or folder name -> a valid Hub repo name ([A-Za-z0-9._-], no '--' or '..', <= 96 chars)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    s = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", s)).strip("-.")[:96].strip("-.")
    return s or "ddpmctl-model"


def get_token() -> str | None:
    """HF_TOKEN, else huggingface_hub's login cache."""
    import huggingface_hub

    return huggingface_hub.get_token()


def login() -> tuple[HfApi, str | None]:
    """An HfApi holding the user's token, and the token owner's user name (None when the Hub does not
    say); fails fast on a missing, invalid or expired token."""
    from huggingface_hub import HfApi

    with _hub_call("reading the Hugging Face token"):
        token = get_token()
    if not token:
        raise NetworkError(f"no Hugging Face token found; {LOGIN_HELP}")
    api = HfApi(token=token)
    with _hub_call("checking the Hugging Face token"):
        who = api.whoami()
    owner = who.get("name") if isinstance(who, dict) else None
    return api, owner or None


def repo_url(repo_id: str, revision: str | None = None) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo_id}" + (f"/tree/{revision}" if revision else "")


def upload(api: HfApi, folder: Path, repo_id: str, *, private: bool, revision: str | None,
           commit_message: str) -> str | None:
    """Create the model repo (exist_ok) and the branch, then upload FOLDER in one commit; its URL."""
    with _hub_call(f"creating {repo_id}", repo_id=repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        with _hub_call(f"creating branch {revision} of {repo_id}", repo_id=repo_id, revision=revision):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with _hub_call(f"uploading to {repo_id}", repo_id=repo_id, revision=revision):
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                 revision=revision, commit_message=commit_message)
    return getattr(info, "commit_url", None)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise UsageError(f"--repo-id {repo_id!r}: expected OWNER/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"--repo-id {repo_id!r}: {_one_line(str(exc))}") from None
