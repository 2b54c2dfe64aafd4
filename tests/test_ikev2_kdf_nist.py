"""IKEv2 key derivation against NIST's CAVS 17.3 IKEv2 KDF file (every record of every section),
plus the RFC 5723 resumption step, which has no official vectors: known answers computed here
with the standard library's hmac (and pinned values cross-checked with ``openssl mac``), and the
RFC 7296 §2.14 key-length split for AEAD and non-AEAD suites.

The .fax format: ``#`` comments; section headers in brackets, ``[name = value]`` (lengths in
bits) or ``[SHA-x]``; a new ``[g^ir length = ...]`` opens a new section; records are
``name = hex`` lines, each record starting with ``COUNT = n``.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from authority.ikev2 import (
    SaKeys,
    UnknownTransformError,
    child_keymat,
    derive_ike_keys,
    derive_resumed_keys,
    ike_keymat,
    key_lengths,
    prf_key_length,
    prf_plus,
    rekey_skeyseed,
    resumption_skeyseed,
    skeyseed,
    split_keys,
)

VECTORS = Path(__file__).parent / "vectors" / "nist-cavs-ikev2-kdf.fax"
PRF_BY_HASH = {"SHA-1": 2, "SHA-256": 5, "SHA-384": 6, "SHA-512": 7}
DIGEST_BY_PRF = {2: "sha1", 5: "sha256", 6: "sha384", 7: "sha512"}
SECTION_PARAMS = ("g^ir length", "Ni length", "Nr length", "DKM length", "Child SA DKM length")
RECORD_FIELDS = ("Ni", "Nr", "g^ir", "g^ir (new)", "SPIi", "SPIr", "SKEYSEED", "DKM",
                 "DKM(Child SA)", "DKM(Child SA D-H)", "SKEYSEED(Rekey)")
# What the file holds: every section, in order (hash, g^ir bits, Ni/Nr bits). The file's own
# header lists 12 cases (g^ir 256/2048/8192 x 4 hashes) but only these 9 sections are present.
EXPECTED_SECTIONS = [
    ("SHA-1", 256, 64), ("SHA-1", 256, 2048), ("SHA-256", 256, 64), ("SHA-256", 256, 2048),
    ("SHA-384", 256, 64), ("SHA-384", 256, 2048), ("SHA-512", 256, 64),
    ("SHA-512", 256, 2048), ("SHA-1", 8192, 64),
]
RECORDS_PER_SECTION = 100


@dataclass(frozen=True)
class Section:
    hash_name: str
    params: tuple[tuple[str, int], ...]

    def bits(self, name: str) -> int:
        return dict(self.params)[name]

    @property
    def prf_id(self) -> int:
        return PRF_BY_HASH[self.hash_name]


@dataclass(frozen=True)
class Record:
    section: Section
    count: int
    values: tuple[tuple[str, bytes], ...]

    def __getitem__(self, name: str) -> bytes:
        return dict(self.values)[name]

    @property
    def ident(self) -> str:
        s = self.section
        return f"{s.hash_name}-gir{s.bits('g^ir length')}-Ni{s.bits('Ni length')}-#{self.count}"


class FaxError(Exception):
    pass


def _close_record(current: dict[str, str] | None, section: Section | None,
                  out: list[Record]) -> None:
    if current is None:
        return
    assert section is not None
    missing = set(RECORD_FIELDS) - set(current)
    if missing or set(current) - set(RECORD_FIELDS) - {"COUNT"}:
        raise FaxError(f"record COUNT={current.get('COUNT')}: fields {sorted(current)}")
    values = tuple((name, bytes.fromhex(current[name])) for name in RECORD_FIELDS)
    out.append(Record(section, int(current["COUNT"]), values))


def parse_fax(text: str) -> list[Record]:
    """Every record of the file; raises FaxError on any line it does not understand."""
    records: list[Record] = []
    params: dict[str, int] = {}
    hash_name: str | None = None
    section: Section | None = None
    current: dict[str, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        header = re.fullmatch(r"\[(.+?)(?: = (\d+))?\]", line)
        if header:
            _close_record(current, section, records)
            current, section = None, None
            name, value = header.groups()
            if name == "g^ir length":
                params, hash_name = {}, None
            if value is None:
                hash_name = name
            else:
                params[name] = int(value)
            continue
        field = re.fullmatch(r"(.+?) = ([0-9a-fA-F]*)", line)
        if not field:
            raise FaxError(f"line {number}: cannot parse {line!r}")
        name, value = field.groups()
        if name == "COUNT":
            _close_record(current, section, records)
            if section is None:
                if hash_name not in PRF_BY_HASH or set(params) != set(SECTION_PARAMS):
                    raise FaxError(f"line {number}: incomplete section header")
                section = Section(hash_name, tuple(sorted(params.items())))
            current = {"COUNT": value}
        elif current is None or name in current:
            raise FaxError(f"line {number}: field {name!r} outside a record or repeated")
        else:
            current[name] = value
    _close_record(current, section, records)
    return records


TEXT = VECTORS.read_text(encoding="ascii")
RECORDS = parse_fax(TEXT)


def test_every_record_is_parsed() -> None:
    count_lines = len(re.findall(r"^COUNT = \d+\s*$", TEXT, flags=re.MULTILINE))
    assert count_lines == len(RECORDS) == len(EXPECTED_SECTIONS) * RECORDS_PER_SECTION == 900


def test_sections_are_the_expected_ones() -> None:
    sections: list[Section] = []
    for record in RECORDS:
        if not sections or sections[-1] is not record.section:
            sections.append(record.section)
    got = [(s.hash_name, s.bits("g^ir length"), s.bits("Ni length")) for s in sections]
    assert got == EXPECTED_SECTIONS
    for section in sections:
        counts = [r.count for r in RECORDS if r.section is section]
        assert counts == list(range(RECORDS_PER_SECTION))


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.ident)
def test_field_lengths_match_section_header(record: Record) -> None:
    section = record.section
    assert len(record["Ni"]) * 8 == section.bits("Ni length")
    assert len(record["Nr"]) * 8 == section.bits("Nr length")
    assert len(record["g^ir"]) * 8 == len(record["g^ir (new)"]) * 8 == section.bits("g^ir length")
    assert len(record["DKM"]) * 8 == section.bits("DKM length")
    assert len(record["DKM(Child SA)"]) * 8 == section.bits("Child SA DKM length")
    assert len(record["DKM(Child SA D-H)"]) * 8 == section.bits("Child SA DKM length")
    assert len(record["SPIi"]) == len(record["SPIr"]) == 8


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.ident)
def test_nist_record(record: Record) -> None:
    prf_id = record.section.prf_id
    ni, nr, g_ir, g_ir_new = record["Ni"], record["Nr"], record["g^ir"], record["g^ir (new)"]
    seed = skeyseed(prf_id, ni, nr, g_ir)
    assert seed == record["SKEYSEED"]
    dkm = ike_keymat(prf_id, seed, ni, nr, record["SPIi"], record["SPIr"], len(record["DKM"]))
    assert dkm == record["DKM"]
    sk_d = dkm[: prf_key_length(prf_id)]
    child_len = len(record["DKM(Child SA)"])
    assert child_keymat(prf_id, sk_d, ni, nr, length=child_len) == record["DKM(Child SA)"]
    assert child_keymat(prf_id, sk_d, ni, nr, g_ir_new, child_len) == record["DKM(Child SA D-H)"]
    assert rekey_skeyseed(prf_id, sk_d, g_ir_new, ni, nr) == record["SKEYSEED(Rekey)"]


def test_parser_refuses_unknown_lines() -> None:
    with pytest.raises(FaxError):
        parse_fax("[g^ir length = 256]\n[SHA-1]\nbogus line\n")
    with pytest.raises(FaxError):
        parse_fax("COUNT = 0\nNi = 00\n")  # no section header


# --- RFC 5723 §5.1 resumption: independent known answers -------------------------------------

NI = bytes(range(0x40, 0x60))
NR = bytes(range(0x80, 0xA0))
SPI_I = bytes.fromhex("0102030405060708")
SPI_R = bytes.fromhex("1112131415161718")


def ref_prf_plus(digest: str, key: bytes, seed: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(key, block + seed + bytes([counter]), digest).digest()
        out += block
        counter += 1
    return out[:length]


def ref_resumed(digest: str, sk_d_old: bytes, sizes: tuple[int, ...]) -> tuple[bytes, ...]:
    seed = hmac.new(sk_d_old, b"Resumption" + NI + NR, digest).digest()
    keymat = ref_prf_plus(digest, seed, NI + NR + SPI_I + SPI_R, sum(sizes))
    parts, offset = [], 0
    for size in sizes:
        parts.append(keymat[offset : offset + size])
        offset += size
    return (seed, *parts)


def as_tuple(keys: SaKeys) -> tuple[bytes, ...]:
    return (keys.sk_d, keys.sk_ai, keys.sk_ar, keys.sk_ei, keys.sk_er, keys.sk_pi, keys.sk_pr)


def test_resumption_kat_sha256_aes_gcm_16_256() -> None:
    sk_d_old = bytes(range(32))
    seed, *expected = ref_resumed("sha256", sk_d_old, (32, 0, 0, 36, 36, 32, 32))
    # Pinned, also computed with `openssl mac -digest SHA256 ... HMAC`.
    assert seed.hex() == "eb2796b8af31610c6cad1f2f6413e1069a361ab84c209c0308317f4a0d7932f7"
    assert expected[0].hex() == "03c93227fcd44a532a1d614641c4a5c94bdd7ef2d7a1c86fd9e327d7e77fa679"
    assert resumption_skeyseed(5, sk_d_old, NI, NR) == seed
    keys = derive_resumed_keys(5, sk_d_old, NI, NR, SPI_I, SPI_R, 20, 256, 0)
    assert as_tuple(keys) == tuple(expected)


def test_resumption_kat_sha1_aes_cbc_128_hmac_sha1_96() -> None:
    sk_d_old = bytes(range(20))
    seed, *expected = ref_resumed("sha1", sk_d_old, (20, 20, 20, 16, 16, 20, 20))
    assert seed.hex() == "ebacab27409c2decc6bfe30869ee90fba82279d8"
    assert expected[0].hex() == "03f771057309846c77199e789555b4afecaa147b"
    assert resumption_skeyseed(2, sk_d_old, NI, NR) == seed
    keys = derive_resumed_keys(2, sk_d_old, NI, NR, SPI_I, SPI_R, 12, 128, 2)
    assert as_tuple(keys) == tuple(expected)


@pytest.mark.parametrize("prf_id", [5, 6, 7])
def test_resumption_kat_sha2_ctr_with_matching_integrity(prf_id: int) -> None:
    digest = DIGEST_BY_PRF[prf_id]
    size = prf_key_length(prf_id)
    integ = {5: 12, 6: 13, 7: 14}[prf_id]
    sk_d_old = bytes(range(100, 100 + size))
    seed, *expected = ref_resumed(digest, sk_d_old, (size, size, size, 36, 36, size, size))
    keys = derive_resumed_keys(prf_id, sk_d_old, NI, NR, SPI_I, SPI_R, 13, 256, integ)
    assert resumption_skeyseed(prf_id, sk_d_old, NI, NR) == seed
    assert as_tuple(keys) == tuple(expected)


def test_resumption_label_has_no_nul_and_is_a_prefix() -> None:
    sk_d_old = bytes(32)
    with_nul = hmac.new(sk_d_old, b"Resumption\x00" + NI + NR, "sha256").digest()
    assert resumption_skeyseed(5, sk_d_old, NI, NR) != with_nul


# --- RFC 7296 §2.14 key lengths ------------------------------------------------------------

# (prf, encr, key bits, integ) -> (SK_d, SK_a, SK_e, SK_p)
SPLITS = [
    ((2, 12, 128, 2), (20, 20, 16, 20)),     # AES-CBC-128, HMAC-SHA1-96
    ((5, 12, 256, 12), (32, 32, 32, 32)),    # AES-CBC-256, HMAC-SHA2-256-128
    ((6, 12, 192, 13), (48, 48, 24, 48)),    # AES-CBC-192, HMAC-SHA2-384-192
    ((7, 12, 128, 14), (64, 64, 16, 64)),    # AES-CBC-128, HMAC-SHA2-512-256
    ((4, 12, 128, 5), (16, 16, 16, 16)),     # AES-XCBC PRF and AES-XCBC-96
    ((8, 12, 128, 8), (16, 16, 16, 16)),     # AES-CMAC PRF and AES-CMAC-96
    ((5, 13, 128, 12), (32, 32, 20, 32)),    # AES-CTR: key + 4-octet nonce
    ((5, 13, 256, 12), (32, 32, 36, 32)),
    ((5, 14, 128, 0), (32, 0, 19, 32)),      # AES-CCM-8: key + 3-octet salt
    ((6, 16, 256, 0), (48, 0, 35, 48)),      # AES-CCM-16
    ((5, 18, 128, 0), (32, 0, 20, 32)),      # AES-GCM-8: key + 4-octet salt
    ((8, 19, 192, 0), (16, 0, 28, 16)),      # AES-GCM-12
    ((7, 20, 256, 0), (64, 0, 36, 64)),      # AES-GCM-16
    ((5, 28, 256, 0), (32, 0, 36, 32)),      # ChaCha20-Poly1305: 32 + 4
    ((5, 28, 0, 0), (32, 0, 36, 32)),        # ... without a Key Length attribute
]


@pytest.mark.parametrize(("suite", "sizes"), SPLITS, ids=[str(s) for s, _ in SPLITS])
def test_split_lengths(suite: tuple[int, int, int, int], sizes: tuple[int, ...]) -> None:
    prf_id, encr_id, bits, integ_id = suite
    lengths = key_lengths(prf_id, encr_id, bits, integ_id)
    assert (lengths.sk_d, lengths.sk_a, lengths.sk_e, lengths.sk_p) == sizes
    sk_d_old = bytes(range(prf_key_length(prf_id)))
    keys = derive_resumed_keys(prf_id, sk_d_old, NI, NR, SPI_I, SPI_R, encr_id, bits, integ_id)
    d, a, e, p = sizes
    assert [len(k) for k in as_tuple(keys)] == [d, a, a, e, e, p, p]
    seed = resumption_skeyseed(prf_id, sk_d_old, NI, NR)
    keymat = prf_plus(prf_id, seed, NI + NR + SPI_I + SPI_R, lengths.total)
    assert b"".join(as_tuple(keys)) == keymat
    assert derive_ike_keys(prf_id, seed, NI, NR, SPI_I, SPI_R, encr_id, bits, integ_id) == keys


def test_aead_and_non_aead_splits_differ_only_where_they_should() -> None:
    sk_d_old = bytes(range(32))
    gcm = derive_resumed_keys(5, sk_d_old, NI, NR, SPI_I, SPI_R, 20, 128, 0)
    cbc = derive_resumed_keys(5, sk_d_old, NI, NR, SPI_I, SPI_R, 12, 128, 12)
    assert gcm.sk_d == cbc.sk_d                       # same prefix of prf+
    assert gcm.sk_ai == gcm.sk_ar == b""
    assert gcm.sk_ei == cbc.sk_ai[:20]                # AEAD: SK_e follows SK_d directly
    assert len(gcm.sk_ei) == 20 and len(cbc.sk_ei) == 16


@pytest.mark.parametrize(("suite", "error"), [
    ((5, 3, 192, 2), UnknownTransformError),   # 3DES: not supported
    ((5, 12, 128, 1), UnknownTransformError),  # HMAC-MD5-96: not supported
    ((1, 12, 128, 2), UnknownTransformError),  # PRF_HMAC_MD5: not supported
    ((5, 20, 128, 12), ValueError),            # AEAD with an integrity transform
    ((5, 12, 128, 0), ValueError),             # non-AEAD without one
    ((5, 13, 128, 0), ValueError),             # AES-CTR is not AEAD
    ((5, 12, 100, 12), ValueError),            # no such AES key size
    ((5, 28, 128, 0), ValueError),             # ChaCha20 key is 256 bits
])
def test_bad_suites(suite: tuple[int, int, int, int], error: type[Exception]) -> None:
    prf_id, encr_id, bits, integ_id = suite
    with pytest.raises(error):
        key_lengths(prf_id, encr_id, bits, integ_id)
    with pytest.raises(error):
        derive_resumed_keys(prf_id, bytes(32), NI, NR, SPI_I, SPI_R, encr_id, bits, integ_id)


def test_unknown_transform_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown encryption transform id 3"):
        key_lengths(5, 3, 128, 2)


@pytest.mark.parametrize("sk_d_old", [b"", bytes(31), bytes(33), bytes(64)])
def test_sk_d_old_must_have_the_prf_key_length(sk_d_old: bytes) -> None:
    with pytest.raises(ValueError, match="SK_d_old must be 32 octets"):
        resumption_skeyseed(5, sk_d_old, NI, NR)


@pytest.mark.parametrize(("spi_i", "spi_r"), [
    (bytes(8), SPI_R), (SPI_I, bytes(8)), (SPI_I[:7], SPI_R), (SPI_I, SPI_R + b"\x00")])
def test_spis_must_be_eight_non_zero_octets(spi_i: bytes, spi_r: bytes) -> None:
    with pytest.raises(ValueError, match="SPI"):
        derive_resumed_keys(5, bytes(32), NI, NR, spi_i, spi_r, 20, 128, 0)


def test_empty_nonces_are_refused() -> None:
    with pytest.raises(ValueError, match="Ni and Nr"):
        resumption_skeyseed(5, bytes(32), b"", NR)
    with pytest.raises(ValueError, match="Ni and Nr"):
        skeyseed(5, NI, b"", b"gir")


def test_sa_keys_repr_hides_key_octets() -> None:
    keys = derive_resumed_keys(5, bytes(range(32)), NI, NR, SPI_I, SPI_R, 12, 256, 12)
    text = repr(keys) + str(keys)
    for key in as_tuple(keys):
        if key:
            assert key.hex() not in text
            assert repr(key) not in text
    assert "sk_ei=<32 octets>" in text


def test_split_keys_needs_exact_length() -> None:
    lengths = key_lengths(5, 20, 128, 0)
    with pytest.raises(ValueError, match="octets of keying material"):
        split_keys(bytes(lengths.total - 1), lengths)
    assert split_keys(bytes(range(lengths.total)), lengths).sk_pr == bytes(range(104, 136))


def test_child_keymat_needs_a_length() -> None:
    with pytest.raises(ValueError, match="length is required"):
        child_keymat(5, bytes(32), NI, NR)
    assert child_keymat(5, bytes(32), NI, NR, length=0) == b""
