"""An independent RFC 9162 reference: tree hash, proofs and their verifiers, from the RFC's text.

Nothing here imports ``firstmile.audit``: the recursive definitions of §2.1.1
(MTH), §2.1.3.1 (PATH) and §2.1.4.1 (PROOF/SUBPROOF) and the verification
algorithms of §2.1.3.2 and §2.1.4.2 are written out again, so that the builder's
proofs are checked by code that shares nothing with it. The integration tests
import :func:`rfc_verify_inclusion` and :func:`rfc_verify_consistency` from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def rfc_leaf(entry: bytes) -> bytes:
    """MTH({d(0)}) = HASH(0x00 || d(0))."""
    return _sha(b"\x00" + entry)


def _k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def rfc_mth(leaves: Sequence[bytes]) -> bytes:
    """§2.1.1 over leaf *hashes* (the leaf-hash step already applied)."""
    n = len(leaves)
    if n == 0:
        return _sha(b"")
    if n == 1:
        return leaves[0]
    k = _k(n)
    return _sha(b"\x01" + rfc_mth(leaves[:k]) + rfc_mth(leaves[k:]))


def rfc_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """§2.1.3.1 PATH(m, D[n])."""
    n = len(leaves)
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*rfc_path(m, leaves[:k]), rfc_mth(leaves[k:])]
    return [*rfc_path(m - k, leaves[k:]), rfc_mth(leaves[:k])]


def rfc_proof(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """§2.1.4.1 PROOF(m, D[n]) = SUBPROOF(m, D[n], true)."""

    def subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
        n = len(d)
        if m == n:
            return [] if b else [rfc_mth(d)]
        k = _k(n)
        if m <= k:
            return [*subproof(m, d[:k], b), rfc_mth(d[k:])]
        return [*subproof(m - k, d[k:], False), rfc_mth(d[:k])]

    return subproof(m, leaves, True)


def rfc_verify_inclusion(leaf_index: int, tree_size: int, leaf: bytes, path: Sequence[bytes], root: bytes) -> bool:
    """§2.1.3.2, step by step."""
    if leaf_index >= tree_size or leaf_index < 0:  # 1.
        return False
    fn = leaf_index  # 2.
    sn = tree_size - 1
    r = leaf  # 3.
    for p in path:  # 4.
        if sn == 0:  # a.
            return False
        if fn % 2 == 1 or fn == sn:  # b.
            r = _sha(b"\x01" + p + r)  # i.
            if fn % 2 == 0:  # ii.
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            r = _sha(b"\x01" + r + p)
        fn //= 2  # c.
        sn //= 2
    return sn == 0 and r == root  # 5.


def rfc_verify_consistency(
    first: int, second: int, first_hash: bytes, second_hash: bytes, consistency_path: Sequence[bytes]
) -> bool:
    """§2.1.4.2, step by step (first == second: an empty path and equal roots)."""
    if first <= 0 or first > second:
        return False
    if first == second:
        return len(consistency_path) == 0 and first_hash == second_hash
    path = list(consistency_path)
    if first & (first - 1) == 0:  # 1. first is an exact power of 2
        path = [first_hash, *path]
    if not path:
        return False
    fn = first - 1  # 2.
    sn = second - 1
    if fn % 2 == 1:  # 3.
        while fn % 2 == 1:
            fn //= 2
            sn //= 2
    fr = path[0]  # 4.
    sr = path[0]
    for c in path[1:]:  # 5.
        if sn == 0:  # a.
            return False
        if fn % 2 == 1 or fn == sn:  # b.
            fr = _sha(b"\x01" + c + fr)  # i.
            sr = _sha(b"\x01" + c + sr)
            if fn % 2 == 0:  # ii.
                while not (fn % 2 == 1 or fn == 0):
                    fn //= 2
                    sn //= 2
        else:
            sr = _sha(b"\x01" + sr + c)
        fn //= 2  # c.
        sn //= 2
    return fr == first_hash and sr == second_hash and sn == 0  # 6.


# Reference vectors of the certificate-transparency project's Merkle tree tests.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


@pytest.mark.parametrize("size", range(1, 9))
def test_reference_matches_the_ct_vectors(size: int) -> None:
    leaves = [rfc_leaf(d) for d in CT_LEAVES[:size]]
    assert rfc_mth(leaves).hex() == CT_ROOTS[size - 1]


def test_reference_proofs_verify_with_the_reference_verifiers() -> None:
    leaves = [rfc_leaf(bytes([i])) for i in range(33)]
    for n in range(1, len(leaves) + 1):
        root = rfc_mth(leaves[:n])
        for m in range(n):
            assert rfc_verify_inclusion(m, n, leaves[m], rfc_path(m, leaves[:n]), root)
        for m in range(1, n + 1):
            assert rfc_verify_consistency(m, n, rfc_mth(leaves[:m]), root, rfc_proof(m, leaves[:n]))


def test_reference_verifiers_refuse_wrong_proofs() -> None:
    leaves = [rfc_leaf(bytes([i])) for i in range(13)]
    root = rfc_mth(leaves)
    path = rfc_path(5, leaves)
    assert not rfc_verify_inclusion(6, 13, leaves[5], path, root)
    assert not rfc_verify_inclusion(5, 13, leaves[6], path, root)
    assert not rfc_verify_inclusion(5, 13, leaves[5], path[:-1], root)
    assert not rfc_verify_inclusion(5, 13, leaves[5], [*path, path[0]], root)
    assert not rfc_verify_inclusion(13, 13, leaves[5], path, root)
    proof = rfc_proof(7, leaves)
    assert not rfc_verify_consistency(7, 13, rfc_mth(leaves[:6]), root, proof)
    assert not rfc_verify_consistency(6, 13, rfc_mth(leaves[:7]), root, proof)
    assert not rfc_verify_consistency(7, 13, rfc_mth(leaves[:7]), root, proof[:-1])
