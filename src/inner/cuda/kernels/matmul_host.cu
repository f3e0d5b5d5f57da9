// matmul_host.cu: y[M, N] = x[M, K] @ W[K, N] (+ bias[N]) for small M (decode), with W read in
// place from pinned, host-mapped memory over PCIe; x, y and bias live in device memory.
//
// Self-contained: no #include (NVRTC compiles it with no include path). f16/bf16 conversions
// use inline PTX `cvt` (cvt.rn.bf16.f32 needs sm_80+; the targets are sm_80 and sm_90a).
//
// ---------------------------------------------------------------------------------------------
// Why this shape (bandwidth reasoning)
// ---------------------------------------------------------------------------------------------
// Mapped host memory is not cached on the GPU and every read crosses PCIe: on an H100 (Gen5
// x16) SM reads of pinned host memory reach ~35 GB/s and a read round trip takes ~1-2 us, so
// ~35 GB/s x 2 us = 70 KB must be in flight at all times to reach the link rate. Each W byte
// must cross the bus exactly once per launch, so:
//   * every (k, n) element of W is loaded by exactly ONE thread of the grid, which applies all
//     M rows of x to it from registers (MT rows per pass, f32 accumulators);
//   * a warp's load instruction reads 512 (or 256) contiguous bytes of one W row (32 lanes x
//     16-byte (8-byte) vectors) on the vector path, or 32 consecutive elements on the scalar
//     path: whole 32-byte sectors, no byte fetched twice;
//   * each thread issues 64 bytes of independent W loads (4 x 16 B or 8 x 8 B) before using
//     them: 2 KB per warp per round trip, ~1.4 GB/s per warp at 1.5 us, so >= ~30 warps
//     streaming saturate the link. A 256-thread block has 8 warps (16 KB in flight); the grid
//     formula below gives >= 2 blocks per SM where the shape allows (MBs in flight).
// Row-major kernel: a block owns a tile of TN columns (32 lanes x VEC) and a range of K rows
// [k_begin, k_end). Its warps split that range (warp w takes rows k_begin + w + warps * i),
// then the block adds the warps' partial sums through shared memory in a FIXED order: no float
// atomics, deterministic results. x is read once per 32 rows per warp (one row per lane) and
// broadcast with shuffles. Narrow matrices (few column tiles) would leave SMs idle, so K can
// also be split across blocks (blockIdx.y, "split-K"): each split writes f32 partial sums to a
// device workspace and `matmul_host_reduce_*` adds the splits in a fixed order (deterministic).
// Transposed kernel (W stored [N, K], e.g. a tied LM head): one warp per output column n
// streams that contiguous W row once (512 B per load instruction, 4 loads in flight per lane)
// and reduces with a fixed shuffle tree; N is large for such weights, so the grid is wide
// without splitting K.
//
// ---------------------------------------------------------------------------------------------
// Entry points (T = f32 | f16 | bf16 stored as 32/16-bit words; x, W, out and bias share T)
// ---------------------------------------------------------------------------------------------
//   matmul_host_rm_{f32,f16,bf16}      row-major W, M <= 8 per pass   (MT = 8)
//   matmul_host_rm_{f32,f16,bf16}_m16  row-major W, M <= 16 per pass  (MT = 16)
//   matmul_host_reduce_{f32,f16,bf16}  split-K epilogue for the two above (only if grid.y > 1)
//   matmul_host_tr_{f32,f16,bf16}      transposed W ([N, K] storage), M <= 16 per pass
// A larger M is still correct (the kernels loop over chunks of MT rows) but re-reads W once per
// chunk: beyond 16 rows the launcher should copy W and use a GEMM instead.
//
// Compile one entry point only by starting the source with
//   #define BURN_OFFLOAD_SELECT_ENTRY
//   #define BURN_OFFLOAD_ONLY_<entry name>
// (NVRTC compiles the whole source for each CubeCL kernel: ~1 s for one entry, ~10 s for all).
//
// Parameter order (what cuLaunchKernel receives; with CubeCL: the buffers in
// `KernelArguments::with_buffer` order, then the by-value params; see cuda-notes.md):
//   rm:     (T* out, const T* x, const T* bias, float* partial, const __grid_constant__ MatmulHostParams p)
//   reduce: (T* out, const float* partial, const T* bias,       const __grid_constant__ MatmulHostParams p)
//   tr:     (T* out, const T* x, const T* bias,                 const __grid_constant__ MatmulHostParams p)
// W is NOT a buffer argument: host-mapped memory is not a CubeCL handle, so its device address
// travels in the params (`p.w`; under unified addressing it equals the host pointer).
// `bias` and `partial` must always be valid pointers (any buffer, e.g. `out`) but are only
// read / written when `p.has_bias != 0` / `gridDim.y > 1`.
// The params are 8 little-endian u64 words passed BY VALUE (64 bytes), in the field order of
// MatmulHostParams below. With CubeCL on sm_70+ (grid constants) pass them as
// `MetadataBindingInfo::new(words, words.len())`, so that no info-buffer pointer is inserted
// before them (`MetadataBindingInfo::custom` would insert one).
//
// Layouts (offsets and strides in elements; none negative: the launcher falls back to copy +
// GEMM for reversed views):
//   x:    [M, K] contiguous row-major, device memory (K < 2^28: 32-bit row offsets).
//   out:  [M, N] contiguous row-major, device memory.
//   bias: [N] contiguous, device memory.
//   rm W: element (k, n) at p.w + (p.w_offset + k * p.ldw + n) * sizeof(T)
//         (HostTensor strides [ldw, 1]).
//   tr W: element (k, n) at p.w + (p.w_offset + n * p.ldw + k) * sizeof(T)
//         (HostTensor strides [1, ldw]: the [N, K] row-major storage of W^T).
//   partial (split-K only): f32 [splits, M, N] contiguous, device memory, no initialisation
//         needed; splits = ceil(K / k_chunk) must equal gridDim.y.
//
// Launch geometry (CubeCL fixes the block size per compiled kernel: use 256 threads):
//   TN (columns per rm block) = 128, except matmul_host_rm_f16 and matmul_host_rm_bf16: 256.
//   rm:     block (256, 1, 1); grid (ceil(N / TN), splits, 1).
//           p.k_chunk = 0 (or >= K) and grid.y = 1: no split, the rm kernel writes `out`.
//           Otherwise splits = ceil(K / p.k_chunk) = grid.y, then launch reduce.
//           Suggested: tiles = ceil(N / TN); want = ceil(2 * num_SMs / tiles);
//           k_chunk = round_up(ceil(K / want), 64); splits = ceil(K / k_chunk); if splits == 1
//           do not split (multiples of 64 give each of the 8 warps whole 8-row batches).
//           blockDim.x may be any multiple of 32 up to 256 (anything else traps).
//   reduce: block (256, 1, 1); grid (min(ceil(M * N / 256), 65535), 1, 1) (grid-stride loop).
//   tr:     block (256, 1, 1) (any multiple of 32 up to 1024, else trap);
//           grid (ceil(N / (blockDim.x / 32)), 1, 1).
//   No dynamic shared memory (rm uses <= 8 KB of static shared memory).
//
// Alignment: the kernels choose the vector path themselves when it is valid, else a scalar
// (element-wise, still coalesced) path. With VB = 16 bytes (8 for the 16-bit _m16 entries):
//   rm: (p.w + p.w_offset * sizeof(T)), p.ldw * sizeof(T) and N * sizeof(T) multiples of VB.
//   tr: (p.w + p.w_offset * sizeof(T)), p.ldw * sizeof(T), K * sizeof(T) and x multiples of 16.
//
// Numerics: products and sums in f32 (fmaf), one rounding to T at the end (cvt.rn: round to
// nearest even). The summation order differs from the CPU reference (strided per-thread
// partial sums, then a fixed tree), so compare with a tolerance; for a fixed shape and launch
// geometry the result is bitwise reproducible.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

struct MatmulHostParams {
    u64 w;        // device address of W's buffer (host-mapped memory), before w_offset
    u64 w_offset; // elements from p.w to W[0, 0]
    u64 ldw;      // elements between consecutive rows of the stored matrix (rm: k, tr: n)
    u64 m;        // rows of x and out
    u64 k;        // inner dimension
    u64 n;        // columns of out
    u64 k_chunk;  // rm only: K rows per blockIdx.y (split-K); 0 = all of K
    u64 has_bias; // non-zero: add bias[n]
};

#define RM_MAX_THREADS 256
#define RM_MAX_WARPS (RM_MAX_THREADS / 32)
#define RM_LOAD_BYTES 64   // W bytes in flight per thread (vector path): 4 x 16 B or 8 x 8 B
#define RM_SCALAR_UNROLL 2 // W rows in flight per thread on the scalar path (x VEC elements)
#define TR_UNROLL 4        // 16-byte W loads in flight per lane (transposed kernel)

// ---- loads and conversions -------------------------------------------------------------------

// NW 32-bit words (16 or 8 bytes) from host-mapped memory, streaming (read once: evict-first).
__device__ __forceinline__ void ld_host_vec(const void* ptr, u32 (&w)[4]) {
    asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
        : "l"(ptr));
}
__device__ __forceinline__ void ld_host_vec(const void* ptr, u32 (&w)[2]) {
    asm("ld.global.cs.v2.u32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(ptr));
}
__device__ __forceinline__ u32 ld_host(const u32* ptr) {
    u32 v;
    asm("ld.global.cs.u32 %0, [%1];" : "=r"(v) : "l"(ptr));
    return v;
}
__device__ __forceinline__ u16 ld_host(const u16* ptr) {
    u16 v;
    asm("ld.global.cs.u16 %0, [%1];" : "=h"(v) : "l"(ptr));
    return v;
}
// 16 bytes of device memory that the kernel only reads (x).
__device__ __forceinline__ void ld_dev_vec(const void* ptr, u32 (&w)[4]) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
        : "l"(ptr));
}

// Element types: storage word `Raw`, conversions, and PER_WORD elements per 32-bit word
// (`word(w, h)`: element h of word w; element 0 is the low half, little endian).
struct DF32 {
    typedef u32 Raw;
    static constexpr int PER_WORD = 1;
    static __device__ __forceinline__ float to_f32(u32 r) { return __uint_as_float(r); }
    static __device__ __forceinline__ u32 from_f32(float f) { return __float_as_uint(f); }
    static __device__ __forceinline__ float word(u32 w, int) { return __uint_as_float(w); }
};

struct DF16 {
    typedef u16 Raw;
    static constexpr int PER_WORD = 2;
    static __device__ __forceinline__ float to_f32(u16 r) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(r));
        return f;
    }
    static __device__ __forceinline__ u16 from_f32(float f) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
        return r;
    }
    static __device__ __forceinline__ float word(u32 w, int h) {
        return to_f32((u16)(h == 0 ? w & 0xffffu : w >> 16));
    }
};

struct DBF16 {
    typedef u16 Raw;
    static constexpr int PER_WORD = 2;
    // bf16 is the top half of an f32: widening is exact.
    static __device__ __forceinline__ float to_f32(u16 r) { return __uint_as_float((u32)r << 16); }
    static __device__ __forceinline__ u16 from_f32(float f) {
        u16 r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
        return r;
    }
    static __device__ __forceinline__ float word(u32 w, int h) {
        return __uint_as_float(h == 0 ? w << 16 : w & 0xffff0000u);
    }
};

// NW words -> NW * PER_WORD floats, in memory order.
template <typename D, int NW>
__device__ __forceinline__ void unpack(const u32 (&w)[NW], float (&f)[NW * D::PER_WORD]) {
#pragma unroll
    for (int i = 0; i < NW; ++i)
#pragma unroll
        for (int h = 0; h < D::PER_WORD; ++h) f[i * D::PER_WORD + h] = D::word(w[i], h);
}

// Rows m0 .. m0 + MT - 1 of x: row mi starts at base + off[mi]. Rows past M are clamped to the
// last row: they accumulate duplicates that are never written, which keeps the unrolled loops
// free of per-row branches. 32-bit offsets (needs MT * K < 2^32) halve their registers.
template <typename D, int MT> struct XRows {
    const typename D::Raw* base;
    u32 off[MT];
    __device__ __forceinline__ XRows(const typename D::Raw* x, u64 m0, const MatmulHostParams& p) {
        base = x + m0 * p.k;
        const u64 last = p.m - 1 - m0;
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) off[mi] = (u32)(((u64)mi < last ? (u64)mi : last) * p.k);
    }
    // Element k of row mi.
    __device__ __forceinline__ const typename D::Raw* at(int mi, u64 k) const {
        return base + k + off[mi];
    }
};

// ---- row-major W ---------------------------------------------------------------------------
// Template parameters: MT = rows of x per pass, NW = 32-bit words per thread vector (4: 16 B,
// 2: 8 B); a thread owns VEC = NW * PER_WORD columns and MT * VEC f32 accumulators.
//
// The x values of the rows a warp handles are loaded once per group of 32 rows, one row per
// lane (`xv[mi]` of lane l = x[m0 + mi, row l of the group], as f32), and broadcast with a
// shuffle when row j is used: no per-row x loads, MT registers.

// Vector path, rows j .. j + NU - 1 of the group (row j at byte offset j * row_step from `col`,
// the first of this thread's VEC columns; inactive lanes load nothing but still shuffle).
template <typename D, int MT, int NW, int NU>
__device__ __forceinline__ void rm_rows_vec(float (&acc)[MT][NW * D::PER_WORD],
                                            const float (&xv)[MT], const unsigned char* col,
                                            bool active, u64 row_step, u32 j) {
    constexpr int VEC = NW * D::PER_WORD;
    u32 w[NU][NW];
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        if (active) {
            ld_host_vec(col + (u64)(j + u) * row_step, w[u]);
        } else {
#pragma unroll
            for (int i = 0; i < NW; ++i) w[u][i] = 0u;
        }
    }
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        float wf[VEC];
        unpack<D, NW>(w[u], wf);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            const float xm = __shfl_sync(0xffffffffu, xv[mi], j + u);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[mi][v] = fmaf(xm, wf[v], acc[mi][v]);
        }
    }
}

// Scalar path, same rows: this thread owns the columns n0 + lane + 32 * c (c < VEC; bit c of
// `valid` set when < N), so each load instruction of a warp reads 32 consecutive elements.
template <typename D, int MT, int NW, int NU>
__device__ __forceinline__ void rm_rows_scalar(float (&acc)[MT][NW * D::PER_WORD],
                                               const float (&xv)[MT], const unsigned char* col,
                                               u32 valid, u64 row_step, u32 j) {
    typedef typename D::Raw Raw;
    constexpr int VEC = NW * D::PER_WORD;
    Raw w[NU][VEC];
#pragma unroll
    for (int u = 0; u < NU; ++u)
#pragma unroll
        for (int c = 0; c < VEC; ++c)
            w[u][c] = (valid >> c) & 1u
                          ? ld_host((const Raw*)(col + (u64)(j + u) * row_step) + 32u * c)
                          : (Raw)0;
#pragma unroll
    for (int u = 0; u < NU; ++u)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            const float xm = __shfl_sync(0xffffffffu, xv[mi], j + u);
#pragma unroll
            for (int c = 0; c < VEC; ++c) acc[mi][c] = fmaf(xm, D::to_f32(w[u][c]), acc[mi][c]);
        }
}

template <typename D, int MT, int NW>
__device__ __forceinline__ void matmul_host_rm(
    typename D::Raw* __restrict__ out, const typename D::Raw* __restrict__ x,
    const typename D::Raw* __restrict__ bias, float* __restrict__ partial,
    const MatmulHostParams& p) {
    typedef typename D::Raw Raw;
    constexpr int VEC = NW * D::PER_WORD;
    constexpr u32 TN = 32u * VEC;
    constexpr int NU = RM_LOAD_BYTES / (4 * NW);
    // red[w][v][lane]: warp w's partial sum of the tile column owned by (lane, v).
    __shared__ float red[RM_MAX_WARPS][VEC][32];

    const u32 nthreads = blockDim.x;
    if (nthreads > RM_MAX_THREADS || nthreads % 32u != 0u || blockDim.y != 1u || blockDim.z != 1u)
        __trap();
    const u32 warps = nthreads / 32u;
    const u32 warp = threadIdx.x / 32u;
    const u32 lane = threadIdx.x % 32u;

    const u64 n0 = (u64)blockIdx.x * TN;
    const u64 k_chunk = (p.k_chunk == 0 || p.k_chunk > p.k) ? p.k : p.k_chunk;
    const u64 k_begin = (u64)blockIdx.y * k_chunk;
    if (blockIdx.y > 0u && k_begin >= p.k) return; // a split past K (grid.y too large): no work
    const u64 k_end = k_begin + k_chunk < p.k ? k_begin + k_chunk : p.k;
    const bool split = gridDim.y > 1u;

    const unsigned char* wbase = (const unsigned char*)p.w + p.w_offset * sizeof(Raw);
    const u64 row_bytes = p.ldw * sizeof(Raw);
    const bool vec = (((u64)wbase | row_bytes | (p.n * sizeof(Raw))) & (4u * NW - 1u)) == 0u;

    for (u64 m0 = 0; m0 < p.m; m0 += MT) {
        float acc[MT][VEC];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[mi][v] = 0.0f;

        const XRows<D, MT> xr(x, m0, p);
        // Vector path: lane owns the VEC columns [n0 + lane * VEC, + VEC), all in or all out
        // (N % VEC == 0). Scalar path: the columns n0 + lane + 32 * c.
        const u64 n_first = n0 + (u64)lane * VEC;
        const unsigned char* col = wbase + (vec ? n_first : n0 + lane) * sizeof(Raw);
        const bool active = n_first < p.n;
        u32 valid = 0;
#pragma unroll
        for (int c = 0; c < VEC; ++c) valid |= (n0 + lane + 32u * c < p.n ? 1u : 0u) << c;

        // Warp w takes the rows k_begin + w + warps * i, in groups of 32 (one per lane).
        const u64 row_step = (u64)warps * row_bytes;
        for (u64 g = k_begin + warp; g < k_end; g += 32u * (u64)warps) {
            const u64 left = (k_end - g + warps - 1) / warps;
            const u32 nj = left < 32u ? (u32)left : 32u; // rows of this group (warp-uniform)
            float xv[MT];
            const u64 my_row = g + (u64)lane * warps;
#pragma unroll
            for (int mi = 0; mi < MT; ++mi)
                xv[mi] = lane < nj ? D::to_f32(*xr.at(mi, my_row)) : 0.0f;
            const unsigned char* gcol = col + g * row_bytes;
            u32 j = 0;
            if (vec) {
                for (; j + NU <= nj; j += NU)
                    rm_rows_vec<D, MT, NW, NU>(acc, xv, gcol, active, row_step, j);
                for (; j < nj; ++j) rm_rows_vec<D, MT, NW, 1>(acc, xv, gcol, active, row_step, j);
            } else {
                for (; j + RM_SCALAR_UNROLL <= nj; j += RM_SCALAR_UNROLL)
                    rm_rows_scalar<D, MT, NW, RM_SCALAR_UNROLL>(acc, xv, gcol, valid, row_step, j);
                for (; j < nj; ++j) rm_rows_scalar<D, MT, NW, 1>(acc, xv, gcol, valid, row_step, j);
            }
        }

        // Block reduction over the warps, one row at a time (8 KB of shared memory), in a fixed
        // order; thread t then finalises tile column t (+ nthreads, ...): coalesced writes.
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            const u64 m = m0 + mi;
            if (m >= p.m) break; // uniform across the block
            __syncthreads();     // the previous row's readers are done with `red`
#pragma unroll
            for (int v = 0; v < VEC; ++v) red[warp][v][lane] = acc[mi][v];
            __syncthreads();
            for (u32 tc = threadIdx.x; tc < TN; tc += nthreads) {
                const u64 n = n0 + tc;
                if (n >= p.n) break;
                const u32 l = vec ? tc / VEC : tc % 32u;
                const u32 v = vec ? tc % VEC : tc / 32u;
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
__device__ __forceinline__ void matmul_host_reduce(typename D::Raw* __restrict__ out,
                                                   const float* __restrict__ partial,
                                                   const typename D::Raw* __restrict__ bias,
                                                   const MatmulHostParams& p) {
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

// ---- transposed W ([N, K] storage) -----------------------------------------------------------

// NU 16-byte vectors i, i + 32, ... of one W row (all within the row), all loads issued first.
template <typename D, int MT, int NU>
__device__ __forceinline__ void tr_vectors(float (&acc)[MT], const XRows<D, MT>& xr,
                                           const unsigned char* row, u64 i) {
    constexpr int VEC = 4 * D::PER_WORD;
    u32 w[NU][4];
#pragma unroll
    for (int u = 0; u < NU; ++u) ld_host_vec(row + (i + 32u * u) * 16u, w[u]);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        float wf[VEC];
        unpack<D, 4>(w[u], wf);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
            u32 xw[4];
            ld_dev_vec(xr.at(mi, (i + 32u * u) * VEC), xw);
            float xf[VEC];
            unpack<D, 4>(xw, xf);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[mi] = fmaf(xf[v], wf[v], acc[mi]);
        }
    }
}

// NU elements k, k + 32, ... of one W row (all < K).
template <typename D, int MT, int NU>
__device__ __forceinline__ void tr_scalars(float (&acc)[MT], const XRows<D, MT>& xr,
                                           const unsigned char* row, u64 k) {
    typedef typename D::Raw Raw;
    Raw w[NU];
#pragma unroll
    for (int u = 0; u < NU; ++u) w[u] = ld_host((const Raw*)row + k + 32u * u);
#pragma unroll
    for (int u = 0; u < NU; ++u) {
        const float wf = D::to_f32(w[u]);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) acc[mi] = fmaf(D::to_f32(*xr.at(mi, k + 32u * u)), wf, acc[mi]);
    }
}

template <typename D, int MT>
__device__ __forceinline__ void matmul_host_tr(typename D::Raw* __restrict__ out,
                                               const typename D::Raw* __restrict__ x,
                                               const typename D::Raw* __restrict__ bias,
                                               const MatmulHostParams& p) {
    typedef typename D::Raw Raw;
    constexpr int VEC = 4 * D::PER_WORD;
    if (blockDim.x % 32u != 0u || blockDim.y != 1u || blockDim.z != 1u) __trap();
    const u32 warps = blockDim.x / 32u;
    const u32 warp = threadIdx.x / 32u;
    const u32 lane = threadIdx.x % 32u;
    const u64 n = (u64)blockIdx.x * warps + warp;
    if (n >= p.n) return; // no block-wide barrier below: whole warps may leave

    const unsigned char* wbase = (const unsigned char*)p.w + p.w_offset * sizeof(Raw);
    const u64 row_bytes = p.ldw * sizeof(Raw);
    const unsigned char* row = wbase + n * row_bytes;
    const bool vec =
        (((u64)wbase | row_bytes | (p.k * sizeof(Raw)) | (u64)x) & 15u) == 0u;

    for (u64 m0 = 0; m0 < p.m; m0 += MT) {
        float acc[MT];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) acc[mi] = 0.0f;

        const XRows<D, MT> xr(x, m0, p);
        if (vec) {
            // Lane owns the 16-byte vectors lane, lane + 32, ... of the row.
            const u64 nvec = p.k / VEC;
            u64 i = lane;
            for (; i + 32u * (TR_UNROLL - 1) < nvec; i += 32u * TR_UNROLL)
                tr_vectors<D, MT, TR_UNROLL>(acc, xr, row, i);
            for (; i < nvec; i += 32u) tr_vectors<D, MT, 1>(acc, xr, row, i);
        } else {
            // Lane owns elements lane, lane + 32, ...: a warp load reads 32 consecutive ones.
            u64 k = lane;
            for (; k + 32u * (TR_UNROLL - 1) < p.k; k += 32u * TR_UNROLL)
                tr_scalars<D, MT, TR_UNROLL>(acc, xr, row, k);
            for (; k < p.k; k += 32u) tr_scalars<D, MT, 1>(acc, xr, row, k);
        }

        // Butterfly reduction: fixed order; IEEE addition is commutative, so every lane ends
        // with the same bits. Lane 0 writes.
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int off = 16; off > 0; off >>= 1)
                acc[mi] += __shfl_xor_sync(0xffffffffu, acc[mi], off);
        if (lane == 0u) {
            const float b = p.has_bias ? D::to_f32(bias[n]) : 0.0f;
#pragma unroll
            for (int mi = 0; mi < MT; ++mi)
                if (m0 + mi < p.m) out[(m0 + mi) * p.n + n] = (Raw)D::from_f32(acc[mi] + b);
        }
    }
}

// ---- entry points --------------------------------------------------------------------------
// Every entry point is compiled unless the source starts with
//   #define BURN_OFFLOAD_SELECT_ENTRY
//   #define BURN_OFFLOAD_ONLY_<entry name>
// which compiles that one alone (NVRTC compiles a whole source per CubeCL kernel; all of them
// take ~10x longer than one).

#define RM_ENTRY(NAME, D, MT, NW)                                                                  \
    extern "C" __global__ void __launch_bounds__(RM_MAX_THREADS)                                 \
        NAME(D::Raw* __restrict__ out, const D::Raw* __restrict__ x,                             \
             const D::Raw* __restrict__ bias, float* __restrict__ partial,                       \
             const __grid_constant__ MatmulHostParams p) {                                       \
        matmul_host_rm<D, MT, NW>(out, x, bias, partial, p);                                         \
    }
#define REDUCE_ENTRY(NAME, D)                                                                    \
    extern "C" __global__ void NAME(D::Raw* __restrict__ out, const float* __restrict__ partial,  \
                                    const D::Raw* __restrict__ bias,                             \
                                    const __grid_constant__ MatmulHostParams p) {                \
        matmul_host_reduce<D>(out, partial, bias, p);                                            \
    }
#define TR_ENTRY(NAME, D)                                                                        \
    extern "C" __global__ void NAME(D::Raw* __restrict__ out, const D::Raw* __restrict__ x,      \
                                    const D::Raw* __restrict__ bias,                             \
                                    const __grid_constant__ MatmulHostParams p) {                \
        matmul_host_tr<D, 16>(out, x, bias, p);                                                  \
    }

#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_rm_f32)
RM_ENTRY(matmul_host_rm_f32, DF32, 8, 4)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_rm_f16)
RM_ENTRY(matmul_host_rm_f16, DF16, 8, 4)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_rm_bf16)
RM_ENTRY(matmul_host_rm_bf16, DBF16, 8, 4)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_rm_f32_m16)
RM_ENTRY(matmul_host_rm_f32_m16, DF32, 16, 4)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_rm_f16_m16)
RM_ENTRY(matmul_host_rm_f16_m16, DF16, 16, 2)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_rm_bf16_m16)
RM_ENTRY(matmul_host_rm_bf16_m16, DBF16, 16, 2)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_reduce_f32)
REDUCE_ENTRY(matmul_host_reduce_f32, DF32)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_reduce_f16)
REDUCE_ENTRY(matmul_host_reduce_f16, DF16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_reduce_bf16)
REDUCE_ENTRY(matmul_host_reduce_bf16, DBF16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_tr_f32)
TR_ENTRY(matmul_host_tr_f32, DF32)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_tr_f16)
TR_ENTRY(matmul_host_tr_f16, DF16)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_matmul_host_tr_bf16)
TR_ENTRY(matmul_host_tr_bf16, DBF16)
#endif
