"""kernels/gemv.py (Triton, through the interpreter on CPU) against the torch reference."""
import pytest
import torch
import triton

from lcsm_compile.kernels.gemv import gemv, gemv_blocks, gemv_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (1, 63, 97), (3, 100, 33), (8, 257, 130), (2, 1000, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_reference(M, K, N, bias):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x = torch.randn(M, K, generator=g).to(DEV)
    W = torch.randn(N, K, generator=g).to(DEV)  # nn.Linear layout; mm sees its transpose
    b = torch.randn(N, generator=g).to(DEV) if bias else None
    y = gemv(x, W.t(), b)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert _rel(y, gemv_reference(x, W.t(), b)) <= 1e-6
    # a contiguous (K, N) weight and a strided x (a column slice) give the same
    xs = torch.randn(M, 2 * K, generator=g).to(DEV)[:, ::2]
    assert _rel(gemv(xs, W.t().contiguous(), b), gemv_reference(xs, W.t(), b)) <= 1e-6


def test_gemv_fp16_accumulates_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, generator=g).half().to(DEV)
    W = torch.randn(70, 300, generator=g).half().to(DEV)
    y = gemv(x, W.t())
    assert y.dtype == torch.float16
    assert _rel(y, gemv_reference(x, W.t())) <= 2e-3  # fp16 output rounding only


def test_gemv_fp64_accumulates_in_fp64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 500, generator=g, dtype=torch.float64).to(DEV)
    W = torch.randn(40, 500, generator=g, dtype=torch.float64).to(DEV)
    b = torch.randn(40, generator=g, dtype=torch.float64).to(DEV)
    y = gemv(x, W.t(), b)
    assert y.dtype == torch.float64
    assert _rel(y, gemv_reference(x, W.t(), b)) <= 1e-13  # fp32 accumulation would be ~1e-7


def test_gemv_bad_input():
    x, w = torch.randn(9, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match="rows"):
        gemv(x, w)
    with pytest.raises(ValueError, match="want x"):
        gemv(torch.randn(1, 5), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 4), w, torch.randn(4))


def test_gpu_blocks_fill_the_machine():
    # a program per SM (132) or more where the output allows it, a power of two of rows, and whole
    # weight rows in one tile where ROWS x K fits the register budget (values a thread holds)
    for M, most, itemsize, per_thread in ((1, 16, 4, 64), (3, 8, 4, 128), (8, 8, 2, 128), (8, 8, 8, 64)):
        for N in (7, 864, 1728, 2592, 50264):
            for K in (864, 1728, 11008):
                bm, rows, bk, warps = gemv_blocks(M, N, K, itemsize=itemsize)
                assert bm == triton.next_power_of_2(M) and 1 <= rows <= most and rows & (rows - 1) == 0
                assert N // rows >= 132 or rows == 1
                assert warps == (8 if M == 1 else 1)
                assert rows * bk <= per_thread * 32 * warps
                assert bk >= K or rows * bk == per_thread * 32 * warps
    # the H200 sweep's picks at M = 8 (decode_gemv_h200_m8_warps_dot.json)
    assert gemv_blocks(8, 2592, 864) == (8, 4, 1024, 1)
    assert gemv_blocks(8, 864, 1728) == (8, 2, 2048, 1)


@pytest.mark.parametrize("M, K, N, rows, block_k", [(3, 2500, 40, 8, 512), (8, 700, 33, 4, 256), (5, 64, 9, 16, 64)])
def test_gemv_rows_longer_than_a_tile(M, K, N, rows, block_k):
    """Weight rows that need several tiles (the loop after the first, pre-wait tile), padded rows
    of x (M < BLOCK_M) and programs past the last output."""
    g = torch.Generator().manual_seed(K + N)
    x = torch.randn(M, K, generator=g).to(DEV)
    W = torch.randn(N, K, generator=g).to(DEV)
    b = torch.randn(N, generator=g).to(DEV)
    y = gemv(x, W.t(), b, blocks=(8, rows, block_k, 4))
    assert _rel(y, gemv_reference(x, W.t(), b)) <= 1e-6
