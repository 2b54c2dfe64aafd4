"""PKCS#11 key backend: ticket keys are AES-256 token objects; seal and unseal run in the token.

The only package of the authority that imports python-pkcs11. Its modules, one idea each:

* ``_cryptoki``: ctypes view of the same module (OS-locking re-initialisation, raw calls).
* ``_errors``: the one translation of device errors into the authority's.
* ``_module``: the process-wide module registry (one module, one SOFTHSM2_CONF, counted users).
* ``_token``: finding the token and the checks before logging in.
* ``_keys``: key ids, labels, lookup and attributes.
* ``_template``: the key template, what other tokens may refuse of it, the read-back check.
* ``_login``: opening a backend's sessions under the token-wide login.
* ``_gcm``: AES-GCM on one session's raw handle (the hot path).
* ``_pool``: the fair session pool, which is also the object (create/destroy) lock.
* ``_crypt``: sealing and unsealing items in one borrowed session.
* ``backend``: :class:`Pkcs11Backend`.
* ``provisioning``: initialising a token in-process (the embedded SoftHSM2 token).
* ``_rawck``: raw calls with nested templates (CKA_UNWRAP_TEMPLATE), which python-pkcs11 lacks.
* ``_wrap``: the cluster KEK, transport keys and wrapped copies of ticket keys (issue 15).
* ``officer``: :class:`SecurityOfficer`, the SO session that makes and moves the cluster KEK.
"""

from authority.backends.pkcs11._keys import KEY_LABEL_PREFIX, key_label
from authority.backends.pkcs11.backend import Pkcs11Backend
from authority.backends.pkcs11.provisioning import initialize_token_if_missing

__all__ = ["KEY_LABEL_PREFIX", "Pkcs11Backend", "initialize_token_if_missing", "key_label"]
