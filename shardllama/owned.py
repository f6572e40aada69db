"""Whether a file or directory that shardllama reads back (a cached kernel, its calibration) is the user's own.

A cache directory can be shared (``SHARDLLAMA_CACHE=/tmp/...``) or planted: what is read from it must belong
to this user and be writable by no one else, or someone else chose its contents.
"""

from __future__ import annotations

import os
import stat


def problem(st: os.stat_result, directory: bool = False) -> str | None:
    """Why ``st`` (an lstat) is not this user's own regular file (or directory), or None when it is."""
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        return "not a directory" if directory else "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None
