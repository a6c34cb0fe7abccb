"""Data-subject rights: erasure (crypto-shredding), export, lookup by email."""
