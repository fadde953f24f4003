"""Temporary alias while tests move to devtools.emulators."""
from devtools.emulators import *  # noqa: F401,F403
from devtools.emulators import STARTED, EmulatorUnavailable  # noqa: F401
