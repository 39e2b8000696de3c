"""STREAMREC_REQUIRE_API_KEYS: where the API must never run open (on Kubernetes the manifests set
it), an empty STREAMREC_API_KEYS is refused when the API starts -- by `streamrec serve`, the
RayService's app builder (a failed deploy) and each Serve replica (`Api.__init__`).

Not a Settings validator on purpose: ingest and the batch jobs load the same ConfigMap (the flag
included) but never get the keys' Secret, and must still start.
"""

from __future__ import annotations

from streaming.settings import Settings, SettingsError

# What the operator runs to set the keys on the k8s deployment (k8s/serving/api-keys-secret.yaml).
SET_KEYS_COMMAND = ("kubectl -n streamrec patch secret streamrec-api-keys --type merge "
                    "-p '{\"stringData\":{\"STREAMREC_API_KEYS\":\"<key1>,<key2>\"}}'")


class ApiKeysRequired(SettingsError):
    """STREAMREC_REQUIRE_API_KEYS is set and STREAMREC_API_KEYS is empty."""


def check_api_keys_required(settings: Settings) -> None:
    """Raise `ApiKeysRequired` when the API would start open although keys are required."""
    if settings.require_api_keys and not settings.api_keys:
        raise ApiKeysRequired(
            "STREAMREC_REQUIRE_API_KEYS=true but STREAMREC_API_KEYS is empty: refusing to start an API open to "
            f"anyone. Set the keys (Kubernetes: {SET_KEYS_COMMAND}; elsewhere: STREAMREC_API_KEYS=<key1>,<key2>), "
            "or set STREAMREC_REQUIRE_API_KEYS=false for an open development API.")


__all__ = ["SET_KEYS_COMMAND", "ApiKeysRequired", "check_api_keys_required"]
