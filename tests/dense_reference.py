"""Dense O(N^3) CKNNA written straight from the formula (docs/facts.md §2, Song et al. eq. 5).

Independent of harness/: full N x N kernels, masks and products, float64, so the fast
engine can be checked against it. Ties are avoided by the tests' inputs."""
import torch


def hsic_unbiased(K, L):
    m = K.shape[0]
    Kt = K.clone().fill_diagonal_(0)
    Lt = L.clone().fill_diagonal_(0)
    value = ((Kt * Lt.T).sum()
             + Kt.sum() * Lt.sum() / ((m - 1) * (m - 2))
             - 2 * (Kt @ Lt).sum() / (m - 2))
    return value / (m * (m - 3))


def knn_mask(K, k):
    n = K.shape[0]
    Kh = K.clone().fill_diagonal_(float("-inf"))
    idx = torch.topk(Kh, k, dim=1).indices
    return torch.zeros(n, n, dtype=K.dtype).scatter_(1, idx, 1.0)


def dense_cknna(A, B, k, dtype=torch.float64):
    """float64 for exact checks; float32 reproduces the reference's cost for benchmarks."""
    A, B = A.to(dtype), B.to(dtype)
    K, L = A @ A.T, B @ B.T
    mk, ml = knn_mask(K, k), knn_mask(L, k)

    def sim(X, Y, mask):
        return hsic_unbiased(mask * X, mask * Y)

    kl = sim(K, L, mk * ml)
    kk = sim(K, K, mk)
    ll = sim(L, L, ml)
    return (kl / (torch.sqrt(kk * ll) + 1e-6)).item()


def dense_mutual_knn(A, B, k, dtype=torch.float64):
    A, B = A.to(dtype), B.to(dtype)
    mk, ml = knn_mask(A @ A.T, k), knn_mask(B @ B.T, k)
    return ((mk * ml).sum(1) / k).mean().item()


def dense_unbiased_cka(A, B):
    A, B = A.double(), B.double()
    K, L = A @ A.T, B @ B.T
    return (hsic_unbiased(K, L) / torch.sqrt(hsic_unbiased(K, K) * hsic_unbiased(L, L))).item()


def dense_biased_cka(A, B):
    A, B = A.double(), B.double()
    n = A.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = H @ A @ A.T @ H, H @ B @ B.T @ H

    def hsic(X, Y):
        return (X * Y).sum()

    return (hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L))).item()
