"""The team store: where stage outputs, the flow's cache keys and its results live.

One place for everything a team shares: the DVC default remote. DVC keeps stage outputs and its
run-cache there (`dvc push` / `dvc pull --run-cache`); the Prefect flow keeps its keys and results beside
them under `<remote url>/fewstep/` through fsspec (s3fs for `s3://`, sshfs for `ssh://`). Without a
remote, a local folder (FEWSTEP_CACHE_DIR, default .fewstep/cache) serves one machine or a shared disk.

Credentials never go into a committed file or a saved Prefect block: they come from the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.ssh) or from `.dvc/config.local`, which git ignores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import fsspec

#: Network bounds for remotes, so a dead or silent server fails a stage in seconds instead of hanging
#: for minutes (botocore's and asyncssh's defaults retry and wait far longer).
S3_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}
SSH_TIMEOUT = 15


class StoreError(RuntimeError):
    """The remote is misconfigured or unreachable, phrased as one line naming it."""


@dataclass
class Store:
    """Where keys and results live: a URL (or local path) plus the fsspec settings to reach it."""

    url: str                                   # s3://bucket/prefix/fewstep, ssh://host/path/fewstep, or a path
    remote: str | None = None                  # the DVC remote it belongs to (None: a local cache folder)
    settings: dict = field(default_factory=dict)   # fsspec settings, no secrets (saved in a Prefect block)
    secrets: dict = field(default_factory=dict)    # credentials, exported to this process only

    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme if "://" in self.url else "file"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def dvc_url(self) -> str:
        """The DVC remote's own root (the store lives in its `fewstep/` folder)."""
        return self.url.rsplit("/fewstep", 1)[0]

    def describe(self) -> str:
        return f"remote '{self.remote}' ({self.url})" if self.remote else f"local cache {self.url}"

    def path(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    def filesystem(self):
        """The fsspec filesystem behind the store (credentials from the environment)."""
        self.export_secrets()
        if self.is_local:
            return fsspec.filesystem("file")
        if self.protocol in ("ssh", "sftp"):
            register_sftp_fix()
        return fsspec.filesystem(self.protocol, **self.settings)

    def block(self, sub: str):
        """A Prefect file-system block rooted at `<store>/<sub>` (keys, results)."""
        from prefect.filesystems import LocalFileSystem, RemoteFileSystem

        self.export_secrets()
        if self.is_local:
            return LocalFileSystem(basepath=str(Path(self.url) / sub))
        if self.protocol in ("ssh", "sftp"):
            register_sftp_fix()
        return RemoteFileSystem(basepath=self.path(sub), settings=self.settings)

    def check(self) -> None:
        """Reach the store once, so a wrong credential or a dead server is one line before any stage runs
        (Prefect's cache lookup would otherwise read an unreachable key as a miss)."""
        try:
            fs = self.filesystem()
            path = self.url if self.is_local else fs._strip_protocol(self.url)
            if self.protocol == "s3":
                fs.ls(path.split("/", 1)[0])  # the bucket: present whenever the remote is usable
            else:
                fs.makedirs(path, exist_ok=True)
        except Exception as exc:  # any transport or auth error, from whichever fsspec backend
            text = next((l.strip() for l in str(exc).splitlines() if l.strip()), type(exc).__name__)
            raise StoreError(f"cannot reach {self.describe()}: {type(exc).__name__}: {text}") from None

    def export_secrets(self) -> None:
        for name, value in self.secrets.items():
            os.environ.setdefault(name, value)


def _dvc_remote(root: Path) -> tuple[str | None, dict]:
    """The DVC default remote's name and merged config (repo + local), or (None, {})."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        config = repo.config
        name = config["core"].get("remote")
        if not name:
            return None, {}
        if name not in config["remote"]:
            raise StoreError(f"DVC default remote '{name}' is not defined in .dvc/config")
        return name, dict(config["remote"][name])


def share_remote(root: str | Path, project: str) -> None:
    """Give a pipeline's own DVC project (pipelines/<name>, `dvc init --subdir`) the root project's default
    remote, in its git-ignored config.local, so its `dvc push/pull` reach the team's store. DVC projects do
    not inherit config, and a second hand-kept copy of the remote would drift."""
    from dvc.config import Config

    root = Path(root).resolve()
    if project in (".", ""):
        return
    name, remote = _dvc_remote(root)
    config = Config(dvc_dir=str(root / project / ".dvc"), validate=False)
    with config.edit("local") as local:
        if name is None:
            local.get("core", {}).pop("remote", None)
            return
        local.setdefault("remote", {})[name] = remote
        local.setdefault("core", {})["remote"] = name


def from_dvc(root: str | Path) -> Store:
    """The store for this clone: FEWSTEP_CACHE_DIR if set, else the DVC default remote, else a local folder."""
    root = Path(root)
    if os.environ.get("FEWSTEP_CACHE_DIR"):
        return Store(str(Path(os.environ["FEWSTEP_CACHE_DIR"]).resolve()))
    name, remote = _dvc_remote(root)
    if name is None:
        return Store(str((root / ".fewstep" / "cache").resolve()))
    url = str(remote["url"])
    scheme = urlsplit(url).scheme if "://" in url else "file"
    if scheme == "s3":
        client = {"endpoint_url": remote["endpointurl"]} if remote.get("endpointurl") else {}
        if remote.get("region"):
            client["region_name"] = remote["region"]
        secrets = {}
        if remote.get("access_key_id"):
            secrets = {"AWS_ACCESS_KEY_ID": remote["access_key_id"],
                       "AWS_SECRET_ACCESS_KEY": remote.get("secret_access_key", "")}
        return Store(url.rstrip("/") + "/fewstep", name, {"client_kwargs": client, "config_kwargs": S3_TIMEOUTS}, secrets)
    if scheme in ("ssh", "sftp"):
        parts = urlsplit(url)
        settings = {"host": parts.hostname, "port": int(remote.get("port") or parts.port or 22),
                    "username": remote.get("user") or parts.username or os.environ.get("USER", "root"),
                    "known_hosts": None, "connect_timeout": SSH_TIMEOUT}
        if remote.get("keyfile"):
            settings["client_keys"] = [str(remote["keyfile"])]
        return Store(f"ssh://{parts.hostname}:{settings['port']}{parts.path.rstrip('/')}/fewstep", name, settings)
    if scheme == "file":
        path = Path(url)
        path = path if path.is_absolute() else (root / ".dvc" / path).resolve()
        return Store(str(path / "fewstep"), name)
    raise StoreError(f"DVC remote '{name}' ({url}): only s3://, ssh:// and local remotes can hold the flow's cache")


_FIXED = False


def register_sftp_fix() -> None:
    """sshfs's mkdir/makedirs keep the `ssh://host` prefix of the paths Prefect hands them (fsspec/sshfs#46),
    so writes fail and Prefect only logs it. Strip the protocol first, for both names sshfs serves."""
    global _FIXED
    if _FIXED:
        return
    import warnings

    from fsspec.asyn import sync_wrapper

    with warnings.catch_warnings():  # asyncssh still names DSA types, which cryptography deprecates: not ours
        warnings.filterwarnings("ignore", message=".*DSA is deprecated")
        from sshfs import SSHFileSystem

    class _SSHFileSystem(SSHFileSystem):
        async def _makedirs(self, path, *args, **kwargs):
            return await super()._makedirs(self._strip_protocol(path), *args, **kwargs)

        async def _mkdir(self, path, *args, **kwargs):
            return await super()._mkdir(self._strip_protocol(path), *args, **kwargs)

        makedirs = sync_wrapper(_makedirs)  # sshfs binds its sync wrappers to its own coroutines
        mkdir = sync_wrapper(_mkdir)

    for protocol in ("ssh", "sftp"):
        fsspec.register_implementation(protocol, _SSHFileSystem, clobber=True)
    _FIXED = True
