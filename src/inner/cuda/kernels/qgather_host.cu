// qgather_host.cu: embedding gather out[i, :] = dequant(table[ids[i], :]) with a QUANTIZED
// table in pinned, host-mapped memory: only the packed values and the scales of the requested
// rows cross PCIe, each byte once per id.
//
// Self-contained: no #include (NVRTC compiles it with no include path).
//
// The table is [rows, cols], quantized as in qmatmul_host.cu's header (Burn's `q_into_data`
// bytes): BITS-bit two's-complement values (8, 4 or 2) packed into little-endian u32 words,
// VPW = 32 / BITS per word (the native q8 store is the same bytes), cols a multiple of VPW, row
// r at word r * row_words; scales (f32, f16 or bf16, host-mapped too) at
// scale[r * scales_per_row + c / scale_cols] (scales_per_row = 0: one scale for the tensor),
// scale_cols a multiple of VPW. out[i, c] = float(q[id, c]) * scale, rounded once to T.
//
// Entry points (T = f32 | f16 | bf16 is the dtype of out; BITS and the scale type are params):
//   qgather_host_{f32,f16,bf16}_i32(T* out, const int* ids,       const __grid_constant__ QGatherHostParams p)
//   qgather_host_{f32,f16,bf16}_i64(T* out, const long long* ids, const __grid_constant__ QGatherHostParams p)
// With CubeCL the two pointers are the buffers in `KernelArguments::with_buffer` order and the
// params are 10 little-endian u64 words passed by value (`MetadataBindingInfo::new(words,
// words.len())`). out: [num_ids, cols] contiguous, device memory; ids: [num_ids] contiguous.
//
// OUT-OF-RANGE IDS ARE A DEVICE-SIDE ASSERTION, as in gather_host.cu (and PyTorch's
// embedding): for an id < 0 or >= p.rows nothing is read, one thread prints the id and p.rows
// and fails `__assertfail`; the launch fails with CUDA_ERROR_ASSERT at the next
// synchronisation and the CUDA context is unusable afterwards.
//
// Reads: a warp's load instruction reads 32 consecutive words of a row (128 bytes), each thread
// keeps QG_UNROLL loads in flight; the scales of those words are loaded alongside (consecutive
// lanes share or follow each other's scales: one coalesced request per instruction).
// Writes: each thread writes its word's VPW values as 8- or 16-byte vectors.
//
// Launch geometry (no shared memory; any blockDim.x, 256 recommended; blockDim.y = z = 1):
//   grid.x = min(num_ids, 2^31 - 1) (blocks loop over ids with stride gridDim.x),
//   grid.y = chunks of a row: clamp(ceil(row_words / (blockDim.x * QG_UNROLL)), 1, 65535).
// The launcher checks that rows 0..p.rows of values and their scales lie in the host buffer,
// and that cols < 2^32. Stores are 8/16-byte vectors when out is 16-byte aligned (a fresh
// CubeCL buffer is), else 2-byte stores.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

struct QGatherHostParams {
    u64 values;         // device address of row 0's packed values (host-mapped)
    u64 scales;         // device address of scale 0 (host-mapped)
    u64 rows;           // rows of the table (valid ids: 0..rows)
    u64 cols;           // values per row (< 2^32, a multiple of 32 / bits)
    u64 row_words;      // u32 words per row (cols * bits / 32)
    u64 scales_per_row; // scales per row; 0 for one scale per tensor
    u64 scale_cols;     // values per scale (the block size; cols at tensor level), < 2^32
    u64 bits;           // 8, 4 or 2
    u64 scale_kind;     // 0: f32, 1: f16, 2: bf16 scales
    u64 num_ids;        // number of ids (= rows of out)
};

#define QG_UNROLL 4

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

// Scale `i` of the table, of kind 0 (f32), 1 (f16) or 2 (bf16).
__device__ __forceinline__ float load_scale(u64 scales, u64 i, u64 kind) {
    if (kind == 0) return __uint_as_float(ld_host_u32((const u32*)scales + i));
    const u16 r = ld_host_u16((const u16*)scales + i);
    return kind == 1 ? f16_to_f32(r) : __uint_as_float((u32)r << 16);
}

// Output types: PER_WORD values per 32-bit word, `pack(a, b)` two values into one word.
struct OF32 {
    typedef u32 Raw;
    static constexpr int PER_WORD = 1;
    static __device__ __forceinline__ u32 pack(float a, float) { return __float_as_uint(a); }
};
struct OF16 {
    typedef u16 Raw;
    static constexpr int PER_WORD = 2;
    static __device__ __forceinline__ u32 pack(float a, float b) {
        u16 lo, hi;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(a));
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(b));
        return (u32)lo | ((u32)hi << 16);
    }
};
struct OBF16 {
    typedef u16 Raw;
    static constexpr int PER_WORD = 2;
    static __device__ __forceinline__ u32 pack(float a, float b) {
        u16 lo, hi;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(lo) : "f"(a));
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(hi) : "f"(b));
        return (u32)lo | ((u32)hi << 16);
    }
};

// Writes NW words at `dst`: with the widest vector stores that fit where `vec` (out is 16-byte
// aligned; then every dst is aligned to 16 bytes when NW % 4 == 0, else to 8: cols is a
// multiple of VPW), else one 16-bit half at a time (any 2-byte alignment).
template <int NW>
__device__ __forceinline__ void store_words(unsigned char* dst, const u32 (&w)[NW], bool vec) {
    if (!vec) {
#pragma unroll
        for (int i = 0; i < NW; ++i) {
            ((u16*)dst)[2 * i] = (u16)(w[i] & 0xffffu);
            ((u16*)dst)[2 * i + 1] = (u16)(w[i] >> 16);
        }
    } else if (NW % 4 == 0) {
#pragma unroll
        for (int i = 0; i < NW; i += 4)
            asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(dst + 4 * i), "r"(w[i]),
                         "r"(w[i + 1]), "r"(w[i + 2]), "r"(w[i + 3])
                         : "memory");
    } else {
#pragma unroll
        for (int i = 0; i < NW; i += 2)
            asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(dst + 4 * i), "r"(w[i]),
                         "r"(w[i + 1])
                         : "memory");
    }
}

// Fails the launch on an out-of-range id (see the header).
__device__ __noinline__ void qgather_host_bad_id(long long id, u64 rows) {
    if (blockIdx.y == 0u && threadIdx.x == 0u) {
        printf("qgather_host: embedding id %lld is out of range for a table of %llu rows "
               "(valid ids: 0..%llu)\n",
               id, rows, rows);
        __assertfail("embedding id out of range: 0 <= id < rows", __FILE__, __LINE__, __func__,
                     sizeof(char));
        __trap(); // not reached: the assertion stops the kernel
    }
}

// One row: words (blockIdx.y * blockDim.x + threadIdx.x) + j * gridDim.y * blockDim.x.
template <typename O, int BITS>
__device__ __forceinline__ void qgather_row(unsigned char* __restrict__ dst, const u32* src,
                                            u64 scale0, bool vec, const QGatherHostParams& p) {
    constexpr int VPW = 32 / BITS;
    constexpr int NWO = VPW / O::PER_WORD; // output words per input word
    const u32 first = blockIdx.y * blockDim.x + threadIdx.x;
    const u32 stride = gridDim.y * blockDim.x;
    const u32 row_words = (u32)p.row_words;
    const u32 scale_cols = (u32)p.scale_cols;
    for (u32 j = first; j < row_words; j += stride * QG_UNROLL) {
        u32 w[QG_UNROLL];
        float s[QG_UNROLL];
#pragma unroll
        for (int g = 0; g < QG_UNROLL; ++g) {
            const u32 jj = j + g * stride;
            if (jj < row_words) {
                w[g] = ld_host_u32(src + jj);
                s[g] = load_scale(p.scales, scale0 + (jj * (u32)VPW) / scale_cols, p.scale_kind);
            } else {
                w[g] = 0u;
                s[g] = 0.0f;
            }
        }
#pragma unroll
        for (int g = 0; g < QG_UNROLL; ++g) {
            const u32 jj = j + g * stride;
            if (jj >= row_words) break;
            float f[VPW];
#pragma unroll
            for (int v = 0; v < VPW; ++v)
                f[v] = (float)(((int)(w[g] << (32 - BITS - BITS * v))) >> (32 - BITS)) * s[g];
            u32 o[NWO];
#pragma unroll
            for (int i = 0; i < NWO; ++i)
                o[i] = O::pack(f[i * O::PER_WORD], f[i * O::PER_WORD + O::PER_WORD - 1]);
            store_words<NWO>(dst + (u64)jj * VPW * sizeof(typename O::Raw), o, vec);
        }
    }
}

template <typename O, typename Id>
__device__ __forceinline__ void qgather_host(unsigned char* __restrict__ out,
                                             const Id* __restrict__ ids,
                                             const QGatherHostParams& p) {
    const u64 row_bytes_out = p.cols * sizeof(typename O::Raw);
    const bool vec = ((u64)out & 15u) == 0u;
    for (u64 i = blockIdx.x; i < p.num_ids; i += gridDim.x) {
        const long long id = (long long)ids[i];
        if (id < 0 || (u64)id >= p.rows) {
            qgather_host_bad_id(id, p.rows);
            return; // read nothing; the launch fails with the assertion above
        }
        unsigned char* dst = out + i * row_bytes_out;
        const u32* src = (const u32*)p.values + (u64)id * p.row_words;
        const u64 scale0 = (u64)id * p.scales_per_row;
        switch (p.bits) {
            case 8: qgather_row<O, 8>(dst, src, scale0, vec, p); break;
            case 4: qgather_row<O, 4>(dst, src, scale0, vec, p); break;
            default: qgather_row<O, 2>(dst, src, scale0, vec, p); break;
        }
    }
}

#define QG_ENTRY(NAME, O, ID)                                                                    \
    extern "C" __global__ void NAME(unsigned char* __restrict__ out, const ID* __restrict__ ids, \
                                    const __grid_constant__ QGatherHostParams p) {               \
        qgather_host<O, ID>(out, ids, p);                                                        \
    }

#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qgather_host_f32_i32)
QG_ENTRY(qgather_host_f32_i32, OF32, int)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qgather_host_f32_i64)
QG_ENTRY(qgather_host_f32_i64, OF32, long long)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qgather_host_f16_i32)
QG_ENTRY(qgather_host_f16_i32, OF16, int)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qgather_host_f16_i64)
QG_ENTRY(qgather_host_f16_i64, OF16, long long)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qgather_host_bf16_i32)
QG_ENTRY(qgather_host_bf16_i32, OBF16, int)
#endif
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_qgather_host_bf16_i64)
QG_ENTRY(qgather_host_bf16_i64, OBF16, long long)
#endif
