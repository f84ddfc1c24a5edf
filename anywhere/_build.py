"""Build information.  This committed copy is the one a source checkout runs with.

The package builds (packaging/build.py: the tarball, the .deb and the .rpm) overwrite it in their
own copy of the source, never in the repository, with the commit they were built from, e.g.
``commit = "main-0123456789ab"``.  With ``commit = None`` anywhere.common.version_line() asks git
at run time (a checkout), else says "unknown".
"""

commit: str | None = None
