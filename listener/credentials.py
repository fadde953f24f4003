"""The worker's Google clients (Firestore, Cloud Storage), built from the configured credentials.

- Under the emulators: anonymous credentials, as the emulators expect (a configured key is still validated).
- A service account key (FIREBASE_SERVICE_ACCOUNT_JSON: its JSON text, base64 or a key file's path; or
  GOOGLE_APPLICATION_CREDENTIALS holding its JSON or base64, `listener.settings`): credentials from it, passed to both clients; the project defaults to the key's `project_id`. Signed
  URLs (URL_STYLE=signed) are signed offline with that key.
- Otherwise Application Default Credentials, as the Google libraries find them.
A key that the auth library cannot load stops start-up with one line naming the variable, never its content; so
does a worker with no credentials at all (no key, no Application Default Credentials).
"""

from __future__ import annotations

import os
from typing import Any

from .settings import Settings, SettingsError

NO_CREDENTIALS = (
    "no Google credentials: set FIREBASE_SERVICE_ACCOUNT_JSON to the worker's service account key (its JSON text), "
    "or run where Application Default Credentials exist"
)

BAD_KEY_PATH = (
    "GOOGLE_APPLICATION_CREDENTIALS is neither a service account key (its JSON text or base64) nor the path of a "
    "readable key file"
)
BAD_KEY_FILE = "GOOGLE_APPLICATION_CREDENTIALS names a file that holds no credentials Google's libraries can load"
UNREADABLE_KEY_FILE = "GOOGLE_APPLICATION_CREDENTIALS names a path that cannot be read as a key file"
NO_PROJECT = (
    "no Google Cloud project: set GOOGLE_CLOUD_PROJECT (credentials of a user account, or a key without its "
    "project_id, name none)"
)
UNREADABLE_ADC = (
    "the Application Default Credentials file cannot be read: set FIREBASE_SERVICE_ACCOUNT_JSON to the worker's "
    "service account key (its JSON text) instead"
)


def credentials(settings: Settings) -> tuple[Any, str | None]:
    """(credentials or None for ADC, project)."""
    found = settings.service_account
    if found is None:
        return None, settings.google_cloud_project
    variable, info = found
    from google.oauth2 import service_account

    try:
        creds = service_account.Credentials.from_service_account_info(
            info, scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
    except Exception:  # the library's message may quote the key: say only which variable
        raise SettingsError(f"{variable} holds a service account key that cannot be loaded") from None
    project = settings.google_cloud_project or info.get("project_id")
    if not project and not (settings.firestore_emulator_host and settings.storage_emulator_host):
        # Google's lookup of a project then fails as if there were no credentials (a review: told to set the key
        # it had been given).
        raise SettingsError(NO_PROJECT)
    return creds, project


# Variables Google's libraries read from `os.environ` on their own, which the settings read blank as unset, stripped.
READ_BY_THE_LIBRARIES = (
    "FIRESTORE_EMULATOR_HOST",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def emulator_variables_as_read() -> None:
    """The variables Google's libraries read, as these settings read them (a review): a blank one, which the
    settings take as unset (a compose file's `${FIRESTORE_EMULATOR_HOST}` with nothing behind it), switched a
    library to an emulator at '' (every call failed "Failed to create channel to ''", and the worker left at each
    start naming no variable), or to a project of spaces; a key file's path with a newline after it was no file to
    the library; STORAGE_EMULATOR_HOST without its scheme, which the worker's own URLs take, was the storage
    library's base URL as it stood (every upload refused)."""
    from .storage import emulator_base_url

    for name in READ_BY_THE_LIBRARIES:
        if name in os.environ and not os.environ[name].strip():
            del os.environ[name]
        elif name in os.environ:
            os.environ[name] = os.environ[name].strip()
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ["STORAGE_EMULATOR_HOST"] = emulator_base_url(os.environ["STORAGE_EMULATOR_HOST"])


def clients(settings: Settings) -> tuple[Any, Any]:
    """(firestore.Client, storage.Client) for these settings. Constructing them makes no network call."""
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import firestore, storage  # type: ignore[attr-defined]  # no type information in google-cloud-storage

    emulator_variables_as_read()
    creds, project = credentials(settings)  # validated even under the emulators: a bad key fails everywhere
    # The libraries read FIRESTORE_EMULATOR_HOST / STORAGE_EMULATOR_HOST themselves and use the emulators'
    # own credentials there.
    try:
        db = firestore.Client(project=project, credentials=None if settings.firestore_emulator_host else creds)
        files = storage.Client(project=project, credentials=None if settings.storage_emulator_host else creds)
    except DefaultCredentialsError:  # no key given and no Application Default Credentials (a RunPod worker)
        # Google's own message for a path that names no file quotes the value: a key pasted in the wrong place.
        if settings.google_application_credentials is not None:
            # A readable file whose content is no key (a review: it was told it named no readable file).
            is_file = os.path.isfile(settings.google_application_credentials.get_secret_value())
            raise SettingsError(BAD_KEY_FILE if is_file else BAD_KEY_PATH) from None
        raise SettingsError(NO_CREDENTIALS) from None
    except OSError as exc:  # Google's lookup opens the path itself: a folder, a file it may not read
        if "Project was not passed" in str(exc):  # google-cloud-core's EnvironmentError (a review: read as a bad file)
            raise SettingsError(NO_PROJECT) from None
        if settings.google_application_credentials is not None:
            raise SettingsError(UNREADABLE_KEY_FILE) from None
        raise SettingsError(f"{UNREADABLE_ADC} ({type(exc).__name__})") from None
    except (ValueError, TypeError, AttributeError):  # a file of JSON that is no object (`null`, a list): google-auth
        # calls `.get` on it (a review: a traceback, exit 1, no line naming the variable)
        if settings.google_application_credentials is not None:
            raise SettingsError(BAD_KEY_FILE) from None
        raise SettingsError(UNREADABLE_ADC) from None
    return db, files
