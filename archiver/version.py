"""The installed version of archiver, recorded in every manifest and Parquet file."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prefect-archiver")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"
