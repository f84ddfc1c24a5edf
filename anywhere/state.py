"""Run-time state that must survive a restart or a crash: the proxies, in STATE_DIR/proxies.json.

Written atomically: a temporary file in the same directory, fsync, rename over the old file,
fsync the directory.  A reader therefore sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile

STATE_FILE = "proxies.json"
FORMAT = 1


class StateError(Exception):
    pass


def path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def load(state_dir: str) -> list[dict]:
    """The stored proxies ([] if there is no state yet).  Raises StateError naming the file."""
    return load_all(state_dir)[0]


def load_all(state_dir: str) -> tuple[list[dict], dict]:
    """The stored proxies and counters (([], {}) if there is no state yet).  Raises StateError."""
    file = path(state_dir)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return [], {}
    except (OSError, ValueError) as exc:
        raise StateError(f"{file}: cannot read the stored proxies: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("proxies"), list):
        raise StateError(f"{file}: not an Anywhere state file of format {FORMAT}")
    stats = data.get("stats")
    return [p for p in data["proxies"] if isinstance(p, dict)], stats if isinstance(stats, dict) else {}


def save(state_dir: str, proxies: list[dict], stats: dict | None = None) -> None:
    """Replace the stored proxies (and counters) atomically.  Raises OSError on failure (the old file stays)."""
    os.makedirs(state_dir, mode=0o750, exist_ok=True)
    data: dict = {"format": FORMAT, "proxies": proxies}
    if stats is not None:
        data["stats"] = stats
    body = json.dumps(data, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".proxies.", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path(state_dir))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
