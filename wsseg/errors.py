"""Exceptions that tell the user which file, key or name is at fault."""

import contextlib


class WssegError(Exception):
    """Base class of every error wsseg raises on purpose."""


class ConfigError(WssegError):
    """A recipe or override is invalid. Holds every problem found, not only the first."""

    def __init__(self, problems, source=None):
        self.problems = list(problems) if not isinstance(problems, str) else [problems]
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid recipe{where}:\n{lines}")


class DataError(WssegError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class WeightsUnavailableError(WssegError):
    """Requested pretrained weights cannot be loaded (offline, missing package or file)."""


class UnknownNameError(WssegError, KeyError):
    """A name is not in a registry; the message lists the valid names."""

    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class StageFailure(WssegError):
    """An unexpected error inside a stage, said in one line: the stage, the image it was processing, the cause,
    where the traceback is and the command that continues the run."""

    def __init__(self, cause: BaseException, stage: str = "", image: str = "", log_file=None, resume_command=""):
        self.cause, self.stage, self.image = cause, stage, image
        where = f"stage {stage}" if stage else "the run"
        on = f" on image {image}" if image else ""
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        trace = f" (traceback in {log_file})" if log_file else ""
        go_on = f"; after fixing the cause, continue with: {resume_command}" if resume_command else ""
        super().__init__(f"{where} failed{on}: {type(cause).__name__}{': ' + detail if detail else ''}{trace}{go_on}")


@contextlib.contextmanager
def about(stage: str = "", image=None):
    """Tag an exception raised inside with the stage and image it happened in (the innermost tag wins), so
    the run can say where it stopped without every loop catching errors. `image` may be a callable, asked
    only when something fails."""
    try:
        yield
    except Exception as exc:
        if stage and not getattr(exc, "wsseg_stage", None):
            exc.wsseg_stage = stage
        if image is not None and not getattr(exc, "wsseg_image", None):
            try:
                exc.wsseg_image = str(image() if callable(image) else image)
            except Exception:  # naming the image must never hide the error itself
                pass
        raise
