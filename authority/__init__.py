"""ike-ticket-authority: RFC 5723 IKEv2 session-resumption tickets sealed inside an HSM or TPM."""

__version__ = "0.1.0"

__all__ = ["__version__"]
