"""The Merkle tree builder against the independent RFC 9162 reference in test_audit_rfc9162."""

from __future__ import annotations

import hashlib
import random

import pytest

from firstmile.audit.merkle import EMPTY_ROOT, MerkleTree, verify_consistency, verify_inclusion
from tests.unit.test_audit_rfc9162 import (
    CT_LEAVES,
    CT_ROOTS,
    rfc_leaf,
    rfc_mth,
    rfc_path,
    rfc_proof,
    rfc_verify_consistency,
    rfc_verify_inclusion,
)


def _leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(b"\x00" + i.to_bytes(4, "big")).digest() for i in range(n)]


def test_ct_vectors() -> None:
    tree = MerkleTree(rfc_leaf(d) for d in CT_LEAVES)
    assert [tree.root(n).hex() for n in range(1, 9)] == CT_ROOTS
    assert tree.root(0) == EMPTY_ROOT == hashlib.sha256(b"").digest()


def test_roots_and_proofs_equal_the_reference_for_every_size() -> None:
    leaves = _leaves(70)
    tree = MerkleTree()
    for n, leaf in enumerate(leaves, start=1):
        tree.append(leaf)  # grown one leaf at a time: the incremental path
        assert tree.root() == rfc_mth(leaves[:n])
    for n in range(1, 71):
        for m in range(n):
            assert tree.inclusion_proof(m, n) == rfc_path(m, leaves[:n]), (m, n)
        for m in range(1, n + 1):
            assert tree.consistency_proof(m, n) == rfc_proof(m, leaves[:n]), (m, n)


def test_bulk_and_incremental_builds_agree() -> None:
    leaves = _leaves(1000)
    one = MerkleTree(leaves)
    two = MerkleTree()
    rng = random.Random(7)
    at = 0
    while at < len(leaves):
        step = rng.randint(1, 90)
        two.extend(leaves[at : at + step])
        at += step
    for n in (1, 2, 3, 255, 256, 257, 511, 999, 1000):
        assert one.root(n) == two.root(n) == rfc_mth(leaves[:n])


def test_large_tree_proofs_verify_independently() -> None:
    n = 100_003
    leaves = _leaves(n)
    tree = MerkleTree(leaves)
    rng = random.Random(11)
    for size in (n, 65_536, 65_537, 99_999):
        root = tree.root(size)
        for index in [0, size - 1, *rng.sample(range(size), 20)]:
            path = tree.inclusion_proof(index, size)
            assert len(path) <= size.bit_length()
            assert rfc_verify_inclusion(index, size, leaves[index], path, root)
            assert verify_inclusion(leaves[index], index, size, path, root)
        first = rng.randrange(1, size)
        proof = tree.consistency_proof(first, size)
        assert rfc_verify_consistency(first, size, tree.root(first), root, proof)
        assert verify_consistency(first, size, proof, tree.root(first), root)


def test_library_verifiers_agree_with_the_reference_on_good_and_bad_proofs() -> None:
    leaves = _leaves(37)
    tree = MerkleTree(leaves)
    rng = random.Random(3)
    for _ in range(300):
        size = rng.randint(1, 37)
        index = rng.randrange(size)
        root = tree.root(size)
        path = tree.inclusion_proof(index, size)
        bad_index = rng.randrange(size + 2)
        candidates = [path, path[:-1], [*path, leaves[0]], [bytes(32), *path[1:]]] if path else [path, [leaves[0]]]
        for proof in candidates:
            assert verify_inclusion(leaves[index], bad_index, size, proof, root) == rfc_verify_inclusion(
                bad_index, size, leaves[index], proof, root
            )
        first = rng.randint(1, size)
        proof = tree.consistency_proof(first, size)
        for candidate_first, candidate in ((first, proof), (max(1, first - 1), proof), (first, proof[1:])):
            assert verify_consistency(
                candidate_first, size, candidate, tree.root(candidate_first), root
            ) == rfc_verify_consistency(candidate_first, size, tree.root(candidate_first), root, candidate)


def test_bad_arguments() -> None:
    tree = MerkleTree(_leaves(5))
    with pytest.raises(ValueError):
        tree.root(6)
    with pytest.raises(ValueError):
        tree.inclusion_proof(5, 5)
    with pytest.raises(ValueError):
        tree.consistency_proof(0, 5)
    with pytest.raises(ValueError):
        tree.extend_packed(b"short")
    assert tree.consistency_proof(5, 5) == []
    assert not verify_inclusion(tree.leaf(0), 0, 0, [], tree.root())
