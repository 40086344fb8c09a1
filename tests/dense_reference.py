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


# ------------------------------------------------------------ the shared-tie definition
# Written from the README's definition, independently of harness/cknna/knn.py: full float64
# kernels, one row at a time, no lists, no re-scoring, no safety margins.


TIE_RTOL = 4 * 2.0 ** -23  # the README's tie tolerance: a few float32 input roundings


def shared_tie_weights(K, k, rtol=TIE_RTOL, exclude=None):
    """W[i, j] = 1 if K_ij is above row i's k-th largest value s by more than tol, the
    remaining slots shared equally among those within tol of s, else 0 (self and
    `exclude`d pairs never count). tol = rtol * |x_i| * max_j |x_j| = rtol * sqrt(K_ii max K_jj)."""
    n = K.shape[0]
    diag = K.diagonal().clone()
    W = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i and not (exclude is not None and exclude[i, j])]
        vals = torch.tensor([K[i, j].item() for j in others], dtype=torch.float64)
        s = sorted(vals.tolist(), reverse=True)[k - 1]
        tol = rtol * (diag[i] * diag.max()).sqrt().item()
        above = [j for j, v in zip(others, vals.tolist()) if v > s + tol]
        tied = [j for j, v in zip(others, vals.tolist()) if abs(v - s) <= tol]
        for j in above:
            W[i, j] = 1.0
        for j in tied:
            W[i, j] = (k - len(above)) / len(tied)
    return W


def dense_shared_scores(A, B, k, groups=None):
    """(CKNNA, mutual kNN) with M = min(W_A, W_B) and the reference's HSIC and 1e-6."""
    A, B = A.double(), B.double()
    K, L = A @ A.T, B @ B.T
    exclude = None
    if groups is not None:
        g = torch.as_tensor(groups)
        exclude = g.unsqueeze(0) == g.unsqueeze(1)
    WA, WB = shared_tie_weights(K, k, exclude=exclude), shared_tie_weights(L, k, exclude=exclude)
    M = torch.minimum(WA, WB)
    kl = hsic_unbiased(M * K, M * L)
    kk = hsic_unbiased(WA * K, WA * K)
    ll = hsic_unbiased(WB * L, WB * L)
    cknna = (kl / (torch.sqrt(kk * ll) + 1e-6)).item()
    return cknna, (M.sum() / (k * K.shape[0])).item()


# ------------------------------------------------------------ the study's values, densely
# Null draws, subset values and paired differences from the same dense definition: the
# permutations and subsets are the harness's own draws (`significance.permutations` /
# `subsets`, which only say which samples), everything else is computed here.


def dense_terms(K, L, WA, WB):
    """(sim_KL, sim_KK, sim_LL, M) of the shared-tie definition for given weights."""
    M = torch.minimum(WA, WB)
    return (hsic_unbiased(M * K, M * L).item(), hsic_unbiased(WA * K, WA * K).item(),
            hsic_unbiased(WB * L, WB * L).item(), M)


DEGENERATE_RTOL = 1e-9  # the README: a self term below this fraction of its scale is 0


def dense_ratio(kl, kk, ll, WK, WL):
    """CKNNA from the sim terms, NaN (as the README defines) when a self term is not
    positive or below DEGENERATE_RTOL of its scale sum((W*K)^2) / (n (n - 3))."""
    n = WK.shape[0]
    kk_scale = ((WK ** 2).sum() / (n * (n - 3))).item()
    ll_scale = ((WL ** 2).sum() / (n * (n - 3))).item()
    if kk <= DEGENERATE_RTOL * kk_scale or ll <= DEGENERATE_RTOL * ll_scale or not (kk > 0 and ll > 0):
        return float("nan")
    return kl / ((kk * ll) ** 0.5 + 1e-6)


def dense_study(A, B, ks, perms=(), subsets=(), exclude=None, index_rule=False):
    """Per k: CKNNA, mutual kNN, sim terms, the null draws CKNNA(A[p], B) for each
    permutation p, and CKNNA on each subset (same-group pairs excluded where `exclude`
    (N x N bool) is True). `index_rule`: plain top-k masks (tie-free inputs only)."""
    A, B = A.double(), B.double()
    K, L = A @ A.T, B @ B.T
    out = {}
    for k in ks:
        def weights(S, ex):
            if index_rule:
                return knn_mask(S, k)
            return shared_tie_weights(S, k, exclude=ex)
        WA, WB = weights(K, exclude), weights(L, exclude)
        kl, kk, ll, M = dense_terms(K, L, WA, WB)
        denom = (kk * ll) ** 0.5 + 1e-6
        null = []
        for p in perms:
            p = torch.as_tensor(p)
            Mp = torch.minimum(WA[p][:, p], WB)
            null.append(hsic_unbiased(Mp * K[p][:, p], Mp * L).item() / denom)
        sub = []
        for s in subsets:
            s = torch.as_tensor(s)
            ex = exclude[s][:, s] if exclude is not None else None
            Ks, Ls = K[s][:, s], L[s][:, s]
            WKs, WLs = weights(Ks, ex), weights(Ls, ex)
            skl, skk, sll, _ = dense_terms(Ks, Ls, WKs, WLs)
            sub.append(dense_ratio(skl, skk, sll, WKs * Ks, WLs * Ls))
        out[k] = {"cknna": kl / denom, "mutual_knn": (M.sum() / (k * K.shape[0])).item(),
                  "sim_kl": kl, "sim_kk": kk, "sim_ll": ll,
                  "null": torch.tensor(null, dtype=torch.float64),
                  "subsets": torch.tensor(sub, dtype=torch.float64)}
    return out
