"""RFC 6962 / RFC 9162 Merkle trees over a tenant's audit leaves (pure, no I/O).

:class:`MerkleTree` is append-only and keeps every *complete* subtree hash: level
``h`` holds the hashes of the aligned subtrees of ``2**h`` leaves, packed 32
bytes each in one ``bytearray`` (about 64 bytes per leaf in all). Any tree head
``MTH(D[0:n])`` for ``n <= size`` and any inclusion or consistency proof then
needs O(log n) stored nodes and at most O(log² n) hash computations for the
ragged right edge; building is O(n) once and O(1) amortised per appended leaf.

The verifiers follow RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""``MTH({})``: the hash of the empty string."""


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only Merkle tree of leaf hashes with all complete subtree hashes cached."""

    __slots__ = ("_levels",)

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def append(self, leaf: bytes) -> None:
        self.extend_packed(leaf)

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        self.extend_packed(b"".join(leaf_hashes))

    def extend_packed(self, packed: bytes | bytearray | memoryview) -> None:
        """Append leaf hashes given back to back (32 bytes each)."""
        if len(packed) % HASH_SIZE:
            raise ValueError("leaf hashes must be 32 bytes each")
        if not packed:
            return
        self._levels[0] += packed
        height = 0
        while True:
            lower = self._levels[height]
            pairs = len(lower) // (2 * HASH_SIZE)
            if pairs == 0:
                break
            if height + 1 == len(self._levels):
                self._levels.append(bytearray())
            upper = self._levels[height + 1]
            done = len(upper) // HASH_SIZE
            if done == pairs:
                break
            view = memoryview(lower)
            sha = hashlib.sha256
            parts = []
            for i in range(done, pairs):
                start = 2 * HASH_SIZE * i
                h = sha(b"\x01")
                h.update(view[start : start + 2 * HASH_SIZE])
                parts.append(h.digest())
            view.release()
            upper += b"".join(parts)
            height += 1

    def leaf(self, index: int) -> bytes:
        if not 0 <= index < self.size:
            raise IndexError(f"leaf {index} outside a tree of {self.size}")
        return self._node(0, index)

    def _node(self, height: int, index: int) -> bytes:
        start = index * HASH_SIZE
        return bytes(self._levels[height][start : start + HASH_SIZE])

    def _hash(self, lo: int, hi: int) -> bytes:
        """``MTH(D[lo:hi])``; ``lo`` is a multiple of the smallest power of two >= ``hi - lo``."""
        n = hi - lo
        if n & (n - 1) == 0:
            height = n.bit_length() - 1
            return self._node(height, lo >> height)
        k = _split(n)
        return node_hash(self._hash(lo, lo + k), self._hash(lo + k, hi))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} outside 0..{self.size}")

    def root(self, size: int | None = None) -> bytes:
        """``MTH(D[0:size])`` (default: the whole tree)."""
        size = self.size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._hash(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 §2.1.3.1 ``PATH(index, D[0:size])``."""
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} outside a tree of {size}")
        path: list[bytes] = []
        lo, hi, m = 0, size, index
        # iterative PATH: descend, collecting siblings top-down, then reverse to leaf-first order
        while hi - lo > 1:
            k = _split(hi - lo)
            if m < k:
                path.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._hash(lo, lo + k))
                lo, m = lo + k, m - k
        path.reverse()
        return path

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 §2.1.4.1 ``PROOF(first, D[0:second])``."""
        self._check_size(second)
        if not 0 < first <= second:
            raise ValueError(f"consistency needs 0 < first <= second, got {first}, {second}")
        proof: list[bytes] = []
        lo, hi, m, whole = 0, second, first, True
        while m != hi - lo:
            k = _split(hi - lo)
            if m <= k:
                proof.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._hash(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        if not whole:
            proof.append(self._hash(lo, hi))
        proof.reverse()
        return proof


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: whether ``proof`` shows ``leaf`` at ``index`` in the tree ``(size, root)``."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes) -> bool:
    """RFC 9162 §2.1.4.2: whether ``proof`` shows tree ``(first, first_root)`` is a prefix of ``(second, ...)``."""
    if not 0 < first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    path = list(proof)
    if first & (first - 1) == 0:  # a power of two: the first tree is a node of the second
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root
