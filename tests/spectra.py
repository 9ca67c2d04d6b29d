"""Symmetric test matrices with known spectra, and a matvec that records how it is called."""

import torch

F64 = torch.float64


def known_matrix(values, seed=0):
    """Q diag(values) Q^T with a random orthogonal Q (float64)."""
    values = torch.as_tensor(values, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=F64))
    return (q * values) @ q.T


def counting(matrix):
    """matvec for ``matrix`` that records the width of every block it is given."""
    widths = []

    def matvec(block):
        widths.append(block.shape[1])
        return matrix @ block

    return matvec, widths
