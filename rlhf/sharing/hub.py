"""Pushing an exported directory to the Hugging Face hub (`huggingface_hub`: create the repository,
then upload the folder). The token is the library's usual one (HF_TOKEN or `hf auth login`) and is
never printed; any failure becomes one `PushError` line that says the local export is complete."""

from __future__ import annotations

import os
import shlex
from pathlib import Path


class PushError(Exception):
    """The hub could not be reached or refused the upload; the local export is unaffected."""


def push_to_hub(directory: str | os.PathLike, repo: str, private: bool = False) -> str:
    """Upload `directory` to the model repository `repo` (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo, repo_type="model",
                          commit_message="Upload an rlhf export")
    except Exception as exc:  # the hub's errors are network, HTTP and auth errors of several libraries
        raise PushError(failure_line(repo, Path(directory), exc, private)) from None
    return str(url)


def failure_line(repo: str, directory: Path, exc: BaseException, private: bool = False) -> str:
    later = f"hf upload {shlex.quote(repo)} {shlex.quote(str(directory))}" + (" --private" if private else "")
    return (f"could not reach the Hugging Face hub to push {repo} ({_reason(exc)}); the export in {directory} is "
            f"complete, push it later with: {later}")


def _reason(exc: BaseException) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return "offline mode is on: HF_HUB_OFFLINE is set"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return f"the hub refused the token (HTTP {status}): log in with `hf auth login` or set HF_TOKEN"
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return _without_token(f"{type(exc).__name__}: {text}"[:300])


def _without_token(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "***") if token else text
