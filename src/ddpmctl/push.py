"""`ddpmctl hub-push`: publish a run (exported on the fly) or a model folder to the Hugging Face Hub.

The order is cheap checks first: the arguments, the token and its owner, then the export into a
temporary folder (removed whatever happens), then one upload (:func:`ddpmctl.hub.upload`).
"""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ddpmctl import __version__
from ddpmctl import hub
from ddpmctl.errors import NetworkError, UsageError
from ddpmctl.diffusersfmt import is_diffusers_folder
from ddpmctl.export import export_diffusers_folder, export_model_folder, file_sizes
from ddpmctl.hub import HF_PREFIX, UPLOAD_PATTERNS
from ddpmctl.modelfolder import CARD_FILE, Warn, load_diffusers_folder, load_model_folder, read_model_config, resolve_source


@dataclass
class PushResult:
    repo_id: str
    url: str | None
    files: dict[str, int]
    card: str
    dry_run: bool
    revision: str | None = None
    commit_url: str | None = None
    owner_resolved: bool = True
    exported_from: str | None = None  # the run dir, when the folder was exported for this push

    def to_dict(self) -> dict:
        return asdict(self)


def _source_name(folder: Path, config: dict | None) -> str:
    run = (config or {}).get("training", {}).get("run")
    return run or folder.resolve().name


def _stage_folder(folder: Path, dest: Path, repo_id: str, diffusers: bool = False) -> None:
    """Copy the uploadable files of a model folder (a diffusers folder: with its unet/ and scheduler/);
    point the card's sample command (and diffusers' from_pretrained) at REPO_ID."""
    (load_diffusers_folder if diffusers else load_model_folder)(folder)  # refuse what `ddpmctl sample` would
    for p in sorted(folder.rglob("*") if diffusers else folder.iterdir()):
        rel = p.relative_to(folder)
        if p.is_file() and not rel.parts[0].startswith(".") and any(p.match(pat) for pat in UPLOAD_PATTERNS):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / rel)
    card = dest / CARD_FILE
    if card.is_file():
        try:
            text = card.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{folder / CARD_FILE}: not UTF-8 text; expected the model card (Markdown)") from None
        if "library_name: ddpmctl" in text or "library_name: diffusers" in text:
            source = shlex.quote(f"{HF_PREFIX}{repo_id}")
            text = re.sub(r"ddpmctl sample ('[^']*'|\S+)", lambda _: f"ddpmctl sample {source}", text)
            text = re.sub(r"DDPMPipeline\.from_pretrained\([^)]*\)", lambda _: f"DDPMPipeline.from_pretrained({repo_id!r})",
                          text)
            card.write_text(text, encoding="utf-8")


def push(
    source: Path | None,
    *,
    repo_id: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    dtype: str = "fp32",
    use_ema: bool = True,
    license: str = "mit",
    device: torch.device | str = "cpu",
    on_warning: Warn | None = None,
    format: str | None = None,
) -> PushResult:
    """Export (when given a run dir) and upload a model folder to the Hub in one commit.

    Order: check the token and resolve the owner (cheap, fails fast), export into a temporary
    folder, create the repo (exist_ok), create the branch, upload. The temporary folder is removed
    whatever happens, so a failure leaves nothing half-exported. `dry_run` needs no network.
    `format`: "ddpmctl" or "diffusers" (:func:`ddpmctl.export.export_diffusers_folder`) for a run;
    None: ddpmctl for a run, a folder's own format for a folder.
    """
    if format not in (None, "ddpmctl", "diffusers"):
        raise UsageError(f"--format {format!r}: expected ddpmctl or diffusers")
    path, kind = resolve_source(source)
    config = None
    diffusers = format == "diffusers" if kind == "run" else is_diffusers_folder(path)
    if kind == "folder" and format is not None and diffusers != (format == "diffusers"):
        raise UsageError(f"{path} is a {'diffusers' if diffusers else 'ddpmctl'} folder, not --format {format}: "
                         f"push it as it is (drop --format), or export the run with --format {format}")
    if kind == "folder" and not diffusers:
        config = read_model_config(path)
    name = hub.repo_name_for(_source_name(path, config))
    if repo_id is not None:
        hub.check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise UsageError("--revision must not be empty")

    api = None
    owner_resolved = True
    if dry_run:
        if repo_id is None:
            owner_resolved = False
            repo_id = f"<token-owner>/{name}"
    else:
        if hub.offline():
            raise NetworkError("hub-push needs the network but HF_HUB_OFFLINE=1 is set; unset it "
                               "(or use --dry-run)")
        api, owner = hub.login()  # fails fast, before any export
        if repo_id is None:
            if not owner:
                raise NetworkError("could not tell the token's user name from the Hub; pass --repo-id OWNER/NAME")
            repo_id = f"{owner}/{name}"

    with tempfile.TemporaryDirectory(prefix="ddpmctl-push-") as tmpdir:
        staged = Path(tmpdir) / "model"
        if kind == "run" and diffusers:
            export_diffusers_folder(path, staged, use_ema=use_ema, repo_id=repo_id, license=license, device=device,
                                    on_warning=on_warning)
        elif kind == "run":
            export_model_folder(path, staged, dtype=dtype, use_ema=use_ema, repo_id=repo_id,
                                license=license, device=device, on_warning=on_warning)
        else:
            staged.mkdir()
            _stage_folder(path, staged, repo_id, diffusers)
        files = file_sizes(staged)
        card = (staged / CARD_FILE).read_text(encoding="utf-8") if (staged / CARD_FILE).is_file() else ""
        url = hub.repo_url(repo_id, revision)
        result = PushResult(repo_id, url if owner_resolved else None, files, card, dry_run, revision,
                            owner_resolved=owner_resolved, exported_from=str(path) if kind == "run" else None)
        if dry_run:
            return result
        assert api is not None
        result.commit_url = hub.upload(api, staged, repo_id, private=private, revision=revision,
                                       commit_message=commit_message or f"Upload {name} (ddpmctl {__version__})")
        return result
