"""Key backends: the only modules that import a vendor library (python-pkcs11, tpm2-pytss)."""

from authority.backends.base import BackendInfo, KeyBackend

__all__ = ["BackendInfo", "KeyBackend"]
