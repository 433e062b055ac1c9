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
    secrets: dict = field(default_factory=dict)    # credentials (and their file paths), exported to this process only

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


def _dvc_remote(config) -> tuple[str | None, dict]:
    """The DVC default remote's name and its config in a repo's merged config (repo + local), or (None, {})."""
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
    from dvc.repo import Repo

    root = Path(root).resolve()
    if project in (".", ""):
        return
    with Repo(str(root)) as repo:
        name, remote = _dvc_remote(repo.config)
    config = Config(dvc_dir=str(root / project / ".dvc"), validate=False)
    with config.edit("local") as local:
        if name is None:
            local.get("core", {}).pop("remote", None)
            return
        local.setdefault("remote", {})[name] = remote
        local.setdefault("core", {})["remote"] = name


def from_dvc(root: str | Path) -> Store:
    """The store for this clone: FEWSTEP_CACHE_DIR if set, else the DVC default remote, else a local folder."""
    from dvc.repo import Repo

    root = Path(root)
    if os.environ.get("FEWSTEP_CACHE_DIR"):
        return Store(str(Path(os.environ["FEWSTEP_CACHE_DIR"]).resolve()))
    with Repo(str(root)) as repo:
        return _store_for(root, repo.config)


def _store_for(root: Path, config) -> Store:
    name, remote = _dvc_remote(config)
    if name is None:
        return Store(str((root / ".fewstep" / "cache").resolve()))
    url = str(remote["url"])
    scheme = urlsplit(url).scheme if "://" in url else "file"
    if scheme == "file":
        path = Path(url)
        path = path if path.is_absolute() else (root / ".dvc" / path).resolve()
        return Store(str(path / "fewstep"), name)
    if scheme not in ("s3", "ssh", "sftp"):
        raise StoreError(f"DVC remote '{name}' ({url}): only s3://, ssh:// and local remotes can hold the flow's cache")
    settings, environment = _dvc_fs_args(config, name)
    if scheme == "s3":
        settings["config_kwargs"] = {**S3_TIMEOUTS, **settings.get("config_kwargs", {})}  # a user's own win
        return Store(url.rstrip("/") + "/fewstep", name, settings, environment)
    settings.setdefault("connect_timeout", SSH_TIMEOUT)
    return Store(f"ssh://{settings['host']}:{settings.get('port', 22)}{urlsplit(url).path.rstrip('/')}/fewstep", name,
                 settings, environment)


#: fsspec arguments that are credentials with an environment variable of their own: exported, never saved
_CREDENTIAL_ENV = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN"}
#: credentials with no such variable: a saved Prefect block would be their only way to a worker
_UNSHAREABLE = {"password": "password: use keyfile or an ssh-agent",
                "passphrase": "keyfile_passphrase: use an unencrypted key for the store, or an ssh-agent"}


def _dvc_fs_args(config, name: str) -> tuple[dict, dict]:
    """The fsspec arguments DVC itself uses for remote `name` (dvc.fs.get_cloud_fs, the filesystem `dvc push`
    opens), so a profile, credential file, TLS, encryption or SSH option set for DVC reaches the flow's store too.
    Returns (settings, environment): settings without credentials (they are saved in a Prefect block), and the
    variables that carry them (keys, and the AWS file paths DVC's S3 plugin exports) for this process only."""
    from dvc.fs import get_cloud_fs

    before = dict(os.environ)
    fs_class, fs_config, _ = get_cloud_fs(config, name=name)
    args = dict(fs_class(**fs_config).fs_args)
    environment = {k: v for k, v in os.environ.items() if before.get(k) != v}  # e.g. AWS_SHARED_CREDENTIALS_FILE
    for key, variable in _CREDENTIAL_ENV.items():
        if args.get(key):
            environment[variable] = args[key]
        args.pop(key, None)
    for key, fix in _UNSHAREABLE.items():
        if args.get(key):
            raise StoreError(f"DVC remote '{name}': the flow's store cannot use an SSH {fix}")
    if (args.get("s3_additional_kwargs") or {}).get("SSECustomerKey"):
        raise StoreError(f"DVC remote '{name}': the flow's store cannot carry sse_customer_key (it would be saved in "
                         f"a Prefect block); use sse_kms_key_id")
    args.pop("client_factory", None)  # DVC's interactive passphrase prompt: a flow has no terminal
    return {k: v for k, v in args.items() if v is not None}, environment


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
