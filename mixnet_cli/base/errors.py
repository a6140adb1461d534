"""Exceptions meant to be shown to the user.

Every error raised on purpose by the library is a :class:`MixnetError`. Its message is one line that names the
thing that failed, says what is wrong and what to do next; the CLI prints it as ``Error: <message>``. Each class
also subclasses the matching built-in exception, so library users can catch ``FileNotFoundError`` or
``ConnectionError`` without knowing ours.
"""

from __future__ import annotations


class MixnetError(Exception):
    """Base class: a failure the user can act on. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(MixnetError, ValueError):
    """The command line or API call itself is wrong (exit code 2, like click's usage errors)."""

    exit_code = 2


class UnknownModelError(UsageError, KeyError):
    """A model name that is not in the manifest."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ManifestError(MixnetError):
    """The weights manifest shipped with the package is malformed (a packaging bug)."""


class ImageError(MixnetError):
    """One input image could not be read; other images in the same run are still classified."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    pass


class ImageUnreadableError(ImageError, PermissionError):
    pass


class NotAnImageError(ImageError, ValueError):
    pass


class TruncatedImageError(ImageError, ValueError):
    pass


class ImageTooLargeError(ImageError, ValueError):
    pass


class DownloadError(MixnetError, ConnectionError):
    """Weights could not be fetched: network down, server error, timeout."""


class UnknownHostError(DownloadError):
    """A URL's host name does not resolve: not a failure that passes with a retry (a typo, no DNS, no network)."""


class OfflineError(DownloadError):
    """A download was needed but offline mode forbids the network."""


class WeightsError(MixnetError, ValueError):
    """A weights file is corrupt, truncated, of the wrong model, or fails its checksum."""


class UnsafeWeightsError(WeightsError):
    """A weights file asks the unpickler for something a real ``.pdparams`` never needs."""


class DeviceError(MixnetError, RuntimeError):
    """The requested device (a GPU) is not available."""


class EngineError(MixnetError, RuntimeError):
    """An inference engine is not installed, or a model could not be converted for it (or failed its check)."""


class LibraryError(MixnetError, ImportError):
    """A library mixnet needs is installed but cannot load (OpenCV without a system library it links)."""


class CacheError(MixnetError, OSError):
    """The cache directory cannot be created or written."""


class ServiceError(MixnetError, ConnectionError):
    """A ``mixnet serve`` service could not be reached, or refused a request."""


class Overloaded(MixnetError, RuntimeError):
    """A service's queue is full: the caller should try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
