// qmatmul_host.cu: y[M, N] = x[M, K] @ dequant(W[K, N]) (+ bias[N]) for small M (decode), with
// W QUANTIZED and read in place from pinned, host-mapped memory over PCIe: only W's packed
// values cross the bus (its scales cross once, converted to f32 into device memory first by
// `qscales_f32_from_*`). x, y, bias and the f32 scales live in device memory.
//
// Self-contained: no #include (NVRTC compiles it with no include path). f16/bf16 conversions
// use inline PTX `cvt` (cvt.rn.bf16.f32 needs sm_80+; the targets are sm_80 and sm_90a).
//
// ---------------------------------------------------------------------------------------------
// The quantized layout (Burn's `q_into_data` bytes, see src/quant.rs)
// ---------------------------------------------------------------------------------------------
// W is [K, N] row-major. Its values are BITS-bit two's-complement integers (q8: 8, q4: 4,
// q2: 2), packed into little-endian u32 words, VPW = 32 / BITS per word, value i of a word in
// bits [i * BITS, (i + 1) * BITS) (Burn's PackedU32(0); the native q8 store, one i8 per value,
// is the same bytes). N must be a multiple of VPW, so every row is `row_words = N / VPW` whole
// words and row k starts at word k * row_words. The dequantized value is
//   W[k, n] = float(q[k, n]) * scale[k * scales_per_row + n / scale_cols]
// (Burn's arithmetic, in f32): per-block scales along the last dim (blocks of `scale_cols`
// values tiling N: scales_per_row = N / scale_cols), or one scale for the tensor
// (scales_per_row = 0, scale_cols = N). scale_cols must be a multiple of VPW (a word's values
// share one scale); the launcher checks all of this.
//
// ---------------------------------------------------------------------------------------------
// Why this shape (bandwidth reasoning, as matmul_host.cu)
// ---------------------------------------------------------------------------------------------
// Mapped host memory is not cached on the GPU: every W byte must cross PCIe exactly once per
// launch and many bytes must be in flight. Each thread owns ONE u32 word column of W (VPW
// output columns) and streams it down its rows: a warp's load instruction reads 32 consecutive
// words (128 contiguous bytes = one cache line, whole sectors where the row is 32-byte aligned),
// and each thread issues NU independent row loads (16-64 bytes) before using them. The x values
// of a group of 32 rows are loaded once (one row per lane) and broadcast with shuffles; every
// W value is applied to all MT rows of x from registers (MT * VPW f32 accumulators).
// The scales are read from an f32 copy in device memory (`qscales_f32_from_*`, one streaming
// pass over the scale bytes): a block's scales of one row are only (32 * VPW / scale_cols) *
// bytes-per-scale contiguous bytes (16 B for q4 blocks of 32 with f16 scales), so reading them
// in place would fetch partial 32-byte sectors twice and cost up to ~10 % of the bandwidth.
// A block owns TN = 32 * VPW columns and a range of K rows; its warps interleave the rows
// (warp w takes rows k_begin + w + warps * i) and add their sums through shared memory in a
// FIXED order (no float atomics: deterministic). Narrow matrices split K across blocks
// (blockIdx.y, split-K) into f32 partial sums, added by `qmatmul_host_reduce_*` in a fixed order.
//
// ---------------------------------------------------------------------------------------------
// Entry points (T = f32 | f16 | bf16 for x, out and bias)
// ---------------------------------------------------------------------------------------------
//   qscales_f32_from_{f32,f16,bf16}   (float* out, QScalesParams p): out[i] = scale i, as f32
//   qmatmul_host_{q8,q4,q2}_{f32,f16,bf16}   M <= 8 per pass (MT = 8)
//   qmatmul_host_{q8,q4}_{f32,f16,bf16}_m16  M <= 16 per pass (MT = 16; no q2: 256 accumulators)
//   qmatmul_host_reduce_{f32,f16,bf16}       split-K epilogue (only if grid.y > 1)
// More rows than MT are correct (the kernels loop over chunks of MT rows) but re-read W once
// per chunk: the launcher copies W and uses a GEMM beyond MT rows.
//
// Compile one entry point only by starting the source with
//   #define BURN_OFFLOAD_SELECT_ENTRY
//   #define BURN_OFFLOAD_ONLY_<entry name>
//
// Parameters (with CubeCL: the buffers in `KernelArguments::with_buffer` order, then the
// by-value params, `MetadataBindingInfo::new(words, words.len())`):
//   scales: (float* out,                                                   QScalesParams p)
//   matmul: (T* out, const T* x, const T* bias, float* partial, const float* scales, QMatmulHostParams p)
//   reduce: (T* out, const float* partial, const T* bias,                  QMatmulHostParams p)
// `bias` and `partial` must always be valid pointers (pass `out`) but are only read / written
// when p.has_bias != 0 / gridDim.y > 1. W and the host scales are not buffer arguments: their
// device addresses (host-mapped memory) travel in the params.
//
// Layouts: x [M, K] and out [M, N] contiguous, device memory (M * K < 2^32: 32-bit x offsets);
// bias [N]; scales (matmul) f32 [>= (K - 1) * scales_per_row + (N - 1) / scale_cols + 1];
// partial (split-K only) f32 [splits, M, N], uninitialised is fine, splits = ceil(K / k_chunk)
// = gridDim.y.
//
// Launch geometry (CubeCL fixes the block size per compiled kernel: 256 threads, 1-D):
//   scales: grid (min(ceil(count / 2048), 4 * SMs), 1, 1) (grid-stride loop).
//   matmul: grid (ceil(row_words / 32), splits, 1). p.k_chunk = 0 (or >= K) and grid.y = 1: no
//           split, the kernel writes `out`. Suggested split (as matmul_host.cu): tiles =
//           ceil(row_words / 32); want = ceil(2 * SMs / tiles); k_chunk = round_up(ceil(K /
//           want), 64); splits = ceil(K / k_chunk).
//   reduce: grid (min(ceil(M * N / 256), 65535), 1, 1) (grid-stride loop).
//   blockDim.x may be any multiple of 32 up to 256 (anything else traps). No dynamic shared
//   memory (matmul: <= 16 KB static).
//
// Numerics: w = float(q) * scale exactly as Burn dequantizes (f32), products and sums in f32
// (fmaf), one rounding to T at the end (round to nearest even). Burn's own path dequantizes to
// the float dtype first (for f16/bf16 a rounded weight) and sums in another order: compare with
// a tolerance. For a fixed shape and launch geometry the result is bitwise reproducible.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

struct QScalesParams {
    u64 src;   // device address of scale 0 (host-mapped memory)
    u64 count; // number of scales
};

struct QMatmulHostParams {
    u64 w;              // device address of W's packed values (host-mapped): row k at w + 4 * k * row_words
    u64 row_words;      // u32 words per row of W (N / VPW)
    u64 m;              // rows of x and out
    u64 k;              // inner dimension (rows of W)
    u64 n;              // columns of W and out
    u64 k_chunk;        // K rows per blockIdx.y (split-K); 0 = all of K
    u64 has_bias;       // non-zero: add bias[n]
    u64 scales_per_row; // scales per row of W (N / scale_cols); 0 for one scale per tensor
    u64 scale_cols;     // columns per scale (the block size; N at tensor level), multiple of VPW
};

#define QM_MAX_THREADS 256
#define QM_MAX_WARPS (QM_MAX_THREADS / 32)

// ---- loads and conversions -------------------------------------------------------------------

// A 32-bit word of host-mapped memory, streaming (read once: evict-first).
__device__ __forceinline__ u32 ld_host_u32(const u32* ptr) {
    u32 v;
    asm("ld.global.cs.u32 %0, [%1];" : "=r"(v) : "l"(ptr));
    return v;
}
__device__ __forceinline__ u16 ld_host_u16(const u16* ptr) {
    u16 v;
    asm("ld.global.cs.u16 %0, [%1];" : "=h"(v) : "l"(ptr));
    return v;
}

__device__ __forceinline__ float f16_to_f32(u16 r) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(r));
    return f;
}
__device__ __forceinline__ float bf16_to_f32(u16 r) { return __uint_as_float((u32)r << 16); }

// Element types of x, out and bias: storage `Raw` and conversions.
struct DF32 {
    typedef u32 Raw;
    static __device__ __forceinline__ float to_f32(u32 r) { return __uint_as_float(r); }
    static __device__ __forceinline__ u32 from_f32(float f) { return __float_as_uint(f); }
};
struct DF16 {
    typedef u16 Raw;
    static __device__ __forceinline__ float to_f32(u16 r) { return f16_to_f32(r); }
    static __device__ __forceinline__ u16 from_f32(float f) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
        return r;
    }
};
struct DBF16 {
    typedef u16 Raw;
    static __device__ __forceinline__ float to_f32(u16 r) { return bf16_to_f32(r); }
    static __device__ __forceinline__ u16 from_f32(float f) {
        u16 r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
        return r;
    }
};

// Scale types (in host memory): one scale from its device address.
struct SF32 {
    static __device__ __forceinline__ float load(const unsigned char* p) {
        return __uint_as_float(ld_host_u32((const u32*)p));
    }
    static constexpr int BYTES = 4;
};
struct SF16 {
    static __device__ __forceinline__ float load(const unsigned char* p) {
        return f16_to_f32(ld_host_u16((const u16*)p));
    }
    static constexpr int BYTES = 2;
};
struct SBF16 {
    static __device__ __forceinline__ float load(const unsigned char* p) {
        return bf16_to_f32(ld_host_u16((const u16*)p));
    }
    static constexpr int BYTES = 2;
};

// Value v (0 <= v < 32 / BITS) of a packed word, sign-extended: bits [v * BITS, (v + 1) * BITS).
template <int BITS>
__device__ __forceinline__ float qvalue(u32 w, int v) {
    return (float)(((int)(w << (32 - BITS - BITS * v))) >> (32 - BITS));
}

// ---- scales to f32 ---------------------------------------------------------------------------

#define QS_UNROLL 8

template <typename S>
__device__ __forceinline__ void qscales_f32(float* __restrict__ out, const QScalesParams& p) {
    const unsigned char* src = (const unsigned char*)p.src;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.count; i += stride * QS_UNROLL) {
        float s[QS_UNROLL];
#pragma unroll
        for (int u = 0; u < QS_UNROLL; ++u) {
            const u64 j = i + u * stride;
            s[u] = j < p.count ? S::load(src + j * S::BYTES) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < QS_UNROLL; ++u) {
            const u64 j = i + u * stride;
            if (j < p.count) out[j] = s[u];
        }
    }
}

// ---- the matmul ------------------------------------------------------------------------------

// Rows m0 .. m0 + MT - 1 of x; rows past M are clamped to the last row (duplicates that are
// never written: no per-row branches in the unrolled loops). The row offsets are computed when
// used (x is read once per 32 W rows), which leaves the registers to the accumulators.
template <typename D, int MT> struct XRows {
    const typename D::Raw* base;
    u32 last; // rows left after m0, minus 1
    u32 k;
    __device__ __forceinline__ XRows(const typename D::Raw* x, u64 m0, const QMatmulHostParams& p) {
        base = x + m0 * p.k;
        last = (u32)(p.m - 1 - m0 < (u64)MT ? p.m - 1 - m0 : (u64)MT);
        k = (u32)p.k;
    }
    // Element `col` of row mi (32-bit offsets: M * K < 2^32, checked by the launcher).
    __device__ __forceinline__ const typename D::Raw* at(int mi, u64 col) const {
        return base + col + ((u32)mi < last ? (u32)mi : last) * k;
    }
};

// NU rows j .. j + NU - 1 of the current group of 32: row j is `word` + j * row_step words and
// its scale `scale` + j * scale_step (inactive lanes load nothing but still shuffle).
template <int BITS, int MT, int NU>
__device__ __forceinline__ void qm_rows(float (&acc)[MT][32 / BITS], const float (&xv)[MT],
                                        const u32* word, const float* scale, bool active,
                                        u64 row_step, u64 scale_step, u32 j) {
    constexpr int VPW = 32 / BITS;
    u32 w[NU];
    float s[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        if (active) {
            w[u] = ld_host_u32(word + (u64)(j + u) * row_step);
            s[u] = __ldg(scale + (u64)(j + u) * scale_step);
        } else {
            w[u] = 0u;
            s[u] = 0.0f;
        }
    }
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        float wf[VPW];
#pragma unroll
        for (int v = 0; v < VPW; ++v) wf[v] = qvalue<BITS>(w[u], v) * s[u];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            const float xm = __shfl_sync(0xffffffffu, xv[mi], j + u);
#pragma unroll
            for (int v = 0; v < VPW; ++v) acc[mi][v] = fmaf(xm, wf[v], acc[mi][v]);
        }
    }
}

template <typename D, int BITS, int MT>
__device__ __forceinline__ void qmatmul_host_rm(typename D::Raw* __restrict__ out,
                                                const typename D::Raw* __restrict__ x,
                                                const typename D::Raw* __restrict__ bias,
                                                float* __restrict__ partial,
                                                const float* __restrict__ scales,
                                                const QMatmulHostParams& p) {
    typedef typename D::Raw Raw;
    constexpr int VPW = 32 / BITS;
    constexpr u32 TN = 32u * VPW;
    // Rows in flight per thread: 64 bytes, fewer where the accumulators take the registers
    // (16 bytes at 128 accumulators: no spills; with one 256-thread block per SM that is still
    // ~0.5 MB in flight over 132 SMs, several times what the link needs).
    constexpr int NU = MT * VPW >= 128 ? 4 : (MT * VPW >= 64 ? 8 : 16);
    // red[w][v][lane]: warp w's partial sum of column (lane, v) of the tile.
    __shared__ float red[QM_MAX_WARPS][VPW][32];

    const u32 nthreads = blockDim.x;
    if (nthreads > QM_MAX_THREADS || nthreads % 32u != 0u || blockDim.y != 1u || blockDim.z != 1u)
        __trap();
    const u32 warps = nthreads / 32u;
    const u32 warp = threadIdx.x / 32u;
    const u32 lane = threadIdx.x % 32u;

    const u64 n0 = (u64)blockIdx.x * TN;
    const u64 k_chunk = (p.k_chunk == 0 || p.k_chunk > p.k) ? p.k : p.k_chunk;
    const u64 k_begin = (u64)blockIdx.y * k_chunk;
    if (blockIdx.y > 0u && k_begin >= p.k) return; // a split past K: no work
    const u64 k_end = k_begin + k_chunk < p.k ? k_begin + k_chunk : p.k;
    const bool split = gridDim.y > 1u;

    // This lane's word column and the column index of its scale (one division per thread).
    const u64 wcol = (u64)blockIdx.x * 32u + lane;
    const bool active = wcol < p.row_words;
    const u64 scol = active ? (wcol * VPW) / p.scale_cols : 0;
    const u32* wbase = (const u32*)p.w + wcol;
    const float* sbase = scales + scol;

    for (u64 m0 = 0; m0 < p.m; m0 += MT) {
        float acc[MT][VPW];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int v = 0; v < VPW; ++v) acc[mi][v] = 0.0f;

        const XRows<D, MT> xr(x, m0, p);
        // Warp w takes the rows k_begin + w + warps * i, in groups of 32 (one per lane).
        const u64 row_step = (u64)warps * p.row_words;
        const u64 scale_step = (u64)warps * p.scales_per_row;
        for (u64 g = k_begin + warp; g < k_end; g += 32u * (u64)warps) {
            const u64 left = (k_end - g + warps - 1) / warps;
            const u32 nj = left < 32u ? (u32)left : 32u; // rows of this group (warp-uniform)
            float xv[MT];
            const u64 my_row = g + (u64)lane * warps;
#pragma unroll
            for (int mi = 0; mi < MT; ++mi)
                xv[mi] = lane < nj ? D::to_f32(*xr.at(mi, my_row)) : 0.0f;
            const u32* gword = wbase + g * p.row_words;
            const float* gscale = sbase + g * p.scales_per_row;
            u32 j = 0;
            for (; j + NU <= nj; j += NU)
                qm_rows<BITS, MT, NU>(acc, xv, gword, gscale, active, row_step, scale_step, j);
            for (; j < nj; ++j)
                qm_rows<BITS, MT, 1>(acc, xv, gword, gscale, active, row_step, scale_step, j);
        }

        // Block reduction over the warps, one row at a time, in a fixed order; thread t then
        // finalises tile column t (+ nthreads, ...): coalesced writes.
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            const u64 m = m0 + mi;
            if (m >= p.m) break; // uniform across the block
            __syncthreads();     // the previous row's readers are done with `red`
#pragma unroll
            for (int v = 0; v < VPW; ++v) red[warp][v][lane] = acc[mi][v];
            __syncthreads();
            for (u32 tc = threadIdx.x; tc < TN; tc += nthreads) {
                const u64 n = n0 + tc;
                if (n >= p.n) break;
                const u32 l = tc / VPW;
                const u32 v = tc % VPW;
                float s = 0.0f;
                for (u32 w = 0; w < warps; ++w) s += red[w][v][l];
                if (split) {
                    partial[((u64)blockIdx.y * p.m + m) * p.n + n] = s;
                } else {
                    if (p.has_bias) s += D::to_f32(bias[n]);
                    out[m * p.n + n] = (Raw)D::from_f32(s);
                }
            }
        }
    }
}

// Split-K epilogue: out[m, n] = sum over splits s (in order) of partial[s, m, n] (+ bias[n]).
template <typename D>
__device__ __forceinline__ void qmatmul_host_reduce(typename D::Raw* __restrict__ out,
                                                    const float* __restrict__ partial,
                                                    const typename D::Raw* __restrict__ bias,
                                                    const QMatmulHostParams& p) {
    typedef typename D::Raw Raw;
    const u64 k_chunk = (p.k_chunk == 0 || p.k_chunk > p.k) ? p.k : p.k_chunk;
    const u64 splits = k_chunk == 0 ? 0 : (p.k + k_chunk - 1) / k_chunk;
    const u64 total = p.m * p.n;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (u64 sp = 0; sp < splits; ++sp) s += partial[sp * total + i];
        if (p.has_bias) s += D::to_f32(bias[i % p.n]);
        out[i] = (Raw)D::from_f32(s);
    }
}

// ---- entry points --------------------------------------------------------------------------

#define QS_ENTRY(NAME, S)                                                                        \
    extern "C" __global__ void NAME(float* __restrict__ out,                                     \
                                    const __grid_constant__ QScalesParams p) {                   \
        qscales_f32<S>(out, p);                                                                  \
    }
#define QM_ENTRY(NAME, D, BITS, MT)                                                              \
    extern "C" __global__ void __launch_bounds__(QM_MAX_THREADS)                                 \
        NAME(D::Raw* __restrict__ out, const D::Raw* __restrict__ x,                             \
             const D::Raw* __restrict__ bias, float* __restrict__ partial,                       \
             const float* __restrict__ scales, const __grid_constant__ QMatmulHostParams p) {    \
        qmatmul_host_rm<D, BITS, MT>(out, x, bias, partial, scales, p);                          \
    }
#define QR_ENTRY(NAME, D)                                                                        \
    extern "C" __global__ void NAME(D::Raw* __restrict__ out, const float* __restrict__ partial,  \
                                    const D::Raw* __restrict__ bias,                             \
                                    const __grid_constant__ QMatmulHostParams p) {               \
        qmatmul_host_reduce<D>(out, partial, bias, p);                                           \
    }

#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qscales_f32_from_f32)
QS_ENTRY(qscales_f32_from_f32, SF32)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qscales_f32_from_f16)
QS_ENTRY(qscales_f32_from_f16, SF16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qscales_f32_from_bf16)
QS_ENTRY(qscales_f32_from_bf16, SBF16)
#endif

#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q8_f32)
QM_ENTRY(qmatmul_host_q8_f32, DF32, 8, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q8_f16)
QM_ENTRY(qmatmul_host_q8_f16, DF16, 8, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q8_bf16)
QM_ENTRY(qmatmul_host_q8_bf16, DBF16, 8, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q4_f32)
QM_ENTRY(qmatmul_host_q4_f32, DF32, 4, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q4_f16)
QM_ENTRY(qmatmul_host_q4_f16, DF16, 4, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q4_bf16)
QM_ENTRY(qmatmul_host_q4_bf16, DBF16, 4, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q2_f32)
QM_ENTRY(qmatmul_host_q2_f32, DF32, 2, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q2_f16)
QM_ENTRY(qmatmul_host_q2_f16, DF16, 2, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q2_bf16)
QM_ENTRY(qmatmul_host_q2_bf16, DBF16, 2, 8)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q8_f32_m16)
QM_ENTRY(qmatmul_host_q8_f32_m16, DF32, 8, 16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q8_f16_m16)
QM_ENTRY(qmatmul_host_q8_f16_m16, DF16, 8, 16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q8_bf16_m16)
QM_ENTRY(qmatmul_host_q8_bf16_m16, DBF16, 8, 16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q4_f32_m16)
QM_ENTRY(qmatmul_host_q4_f32_m16, DF32, 4, 16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q4_f16_m16)
QM_ENTRY(qmatmul_host_q4_f16_m16, DF16, 4, 16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_q4_bf16_m16)
QM_ENTRY(qmatmul_host_q4_bf16_m16, DBF16, 4, 16)
#endif

#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_reduce_f32)
QR_ENTRY(qmatmul_host_reduce_f32, DF32)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_reduce_f16)
QR_ENTRY(qmatmul_host_reduce_f16, DF16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qmatmul_host_reduce_bf16)
QR_ENTRY(qmatmul_host_reduce_bf16, DBF16)
#endif
