"""Version stamps on pickled estimators, so a file from another release is caught."""

from __future__ import annotations

import warnings

from .exceptions import SkpadimVersionWarning

# Bump when the pickled state of an estimator changes incompatibly.
STATE_FORMAT = 1


class VersionedStateMixin:
    """Records the skpadim version and state format in pickles; checks on load."""

    def __getstate__(self):
        from . import __version__

        state = dict(super().__getstate__())  # a copy: never touch the live object
        state["_skpadim_version"] = __version__
        state["_skpadim_state_format"] = STATE_FORMAT
        return state

    def __setstate__(self, state):
        from . import __version__

        state = dict(state)
        saved_format = state.pop("_skpadim_state_format", None)
        saved_version = state.pop("_skpadim_version", "unknown")
        if saved_format != STATE_FORMAT:
            raise ValueError(
                f"This {type(self).__name__} was saved by skpadim {saved_version} in "
                f"state format {saved_format}; skpadim {__version__} reads format "
                f"{STATE_FORMAT}. Install skpadim=={saved_version} to load it, or "
                "refit the model."
            )
        if saved_version != __version__:
            warnings.warn(
                f"Loading a {type(self).__name__} saved by skpadim {saved_version} "
                f"into skpadim {__version__}. The state format is the same, but "
                "results may differ; refit to be safe.",
                SkpadimVersionWarning,
                stacklevel=2,
            )
        super().__setstate__(state)
