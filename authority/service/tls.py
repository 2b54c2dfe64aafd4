"""Server TLS credentials that follow their files: rotated without a restart.

grpc asks the fetcher for the certificate configuration at every new handshake; the fetcher
re-reads ``tls.cert_file``, ``tls.key_file`` and ``tls.client_ca_file`` when one of their
modification times (sizes, inodes) changed, or when ``reload()`` was called (SIGHUP in ``serve``).
A half-written rotation (unreadable file, a key that does not match the certificate) is logged
and the previous credentials stay in use. Established connections keep their session; new
connections get the new certificate.

grpc's TLS stack negotiates TLS 1.2 or 1.3 (1.3 preferred); older versions are refused.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import grpc

from authority.config import TlsSettings
from authority.errors import ConfigError

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int], ...]


class ReloadingCredentials:
    """The listener's TLS credentials and the files they come from."""

    def __init__(self, tls: TlsSettings) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._forced = False
        self._stamp = self._stat()
        self._pem = self._read()  # raises ConfigError at start-up
        self.reloads = 0

    @property
    def _files(self) -> tuple[Path, Path, Path]:
        return (self._tls.cert_file, self._tls.key_file, self._tls.client_ca_file)

    def _stat(self) -> Stamp:
        stamps = []
        for path in self._files:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append((-1, -1, -1))
        return tuple(stamps)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        """Read and check the files. Raises: ConfigError naming the setting."""
        from authority.settings_loader import validate_tls

        validate_tls(self._tls)
        cert, key, ca = (path.read_bytes() for path in self._files)
        return cert, key, ca

    def _configuration(self) -> Any:
        cert, key, ca = self._pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Dynamic server credentials; a client certificate is required and verified against
        the client CA when ``tls.require_client_cert``. Never raises."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), self._fetch,
            require_client_authentication=self._tls.require_client_cert)

    def reload(self) -> None:
        """Re-read the files at the next handshake even if they look unchanged. Never raises."""
        with self._lock:
            self._forced = True

    def _fetch(self) -> Any:
        """grpc's certificate configuration fetcher: a new configuration, or None for no
        change. Never raises (it runs inside grpc's handshake)."""
        try:
            with self._lock:
                stamp = self._stat()
                if stamp == self._stamp and not self._forced:
                    return None
                self._forced = False
                self._stamp = stamp
                try:
                    pem = self._read()
                except (ConfigError, OSError) as exc:
                    log.warning("TLS credentials not reloaded, keeping the previous ones: %s",
                                exc)
                    return None
                if pem == self._pem:
                    return None
                self._pem = pem
                self.reloads += 1
                log.info("TLS credentials reloaded from %s", self._tls.cert_file)
                return self._configuration()
        except Exception:  # never let an error escape into grpc's handshake
            log.exception("TLS credential fetcher failed")
            return None
