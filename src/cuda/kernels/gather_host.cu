// gather_host.cu: embedding gather out[i, :] = table[ids[i], :] with the table in pinned,
// host-mapped memory: only the requested rows cross PCIe, each byte once.
//
// Self-contained: no #include (NVRTC compiles it with no include path).
//
// Entry points:
//   gather_host_i32(unsigned char* out, const int* ids,       unsigned long long* status,
//                   const __grid_constant__ GatherHostParams p)
//   gather_host_i64(unsigned char* out, const long long* ids, unsigned long long* status,
//                   const __grid_constant__ GatherHostParams p)
// With CubeCL the three pointers are the buffers in `KernelArguments::with_buffer` order and the
// params are 7 little-endian u64 words passed by value (`MetadataBindingInfo::new(words,
// words.len())`, so that no info buffer pointer is inserted before them). The table is not a
// buffer argument: its device address (host-mapped memory) travels in `p.table`.
//
// Bytes-generic: the kernel copies rows of `p.cols * p.elem_size` bytes and never interprets
// them, so it serves every dtype.
//   table row r (0 <= r < p.rows) starts at p.table + (p.table_offset + r * p.row_stride) * p.elem_size
//   (offset and stride in elements; columns must be contiguous, i.e. HostTensor strides
//   [row_stride, 1] with row_stride >= 0);
//   out: [num_ids, cols] contiguous, device memory; ids: [num_ids] contiguous, device memory.
//
// Out-of-range ids (id < 0 or id >= rows) read nothing: their output row is zero-filled and
// `status` (2 u64 words of device memory, ZEROED BY THE HOST before the launch) records them:
//   status[0] = number of out-of-range ids (0: all ids were valid);
//   status[1] = one of the offending ids (as i64 bits; written once, by whichever block counted
//               first; meaningful only when status[0] != 0).
// The host reads `status` after the stream work completes and reports the error.
//
// Copy unit: the largest of 16, 8, 4, 2, 1 bytes that divides the table row-0 address, the
// row stride in bytes, the row length in bytes and the `out` address (16-byte vector loads for
// any row-major f32/f16/bf16 table whose row is a multiple of 16 bytes). Consecutive threads
// copy consecutive units: coalesced, read once (streaming `ld.global.cs`).
//
// Launch geometry (no shared memory; any blockDim.x, 256 recommended; blockDim.y = z = 1):
//   grid.x = min(num_ids, 2^31 - 1) (blocks loop over ids with stride gridDim.x),
//   grid.y = chunks of a row, e.g. clamp(ceil(row_bytes / (blockDim.x * 16 * 4)), 1, 65535);
//   each block copies units (blockIdx.y * blockDim.x + threadIdx.x) + j * gridDim.y * blockDim.x
//   of its row, GATHER_UNROLL (4) loads in flight per thread.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

struct GatherHostParams {
    u64 table;        // device address of the table's buffer (host-mapped), before table_offset
    u64 table_offset; // elements from p.table to row 0
    u64 rows;         // number of valid rows
    u64 cols;         // elements per row
    u64 row_stride;   // elements between consecutive rows
    u64 elem_size;    // bytes per element
    u64 num_ids;      // number of ids (= rows of out)
};

#define GATHER_UNROLL 4

// Copy units: B bytes, loaded from host-mapped memory with the streaming hint.
template <int B> struct Unit;
template <> struct Unit<16> {
    u32 w[4];
    __device__ __forceinline__ void load(const unsigned char* p) {
        asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
            : "l"(p));
    }
    __device__ __forceinline__ void zero() { w[0] = w[1] = w[2] = w[3] = 0u; }
    __device__ __forceinline__ void store(unsigned char* p) const {
        asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
                     "r"(w[2]), "r"(w[3])
                     : "memory");
    }
};
template <> struct Unit<8> {
    u64 v;
    __device__ __forceinline__ void load(const unsigned char* p) {
        asm("ld.global.cs.u64 %0, [%1];" : "=l"(v) : "l"(p));
    }
    __device__ __forceinline__ void zero() { v = 0ull; }
    __device__ __forceinline__ void store(unsigned char* p) const { *(u64*)p = v; }
};
template <> struct Unit<4> {
    u32 v;
    __device__ __forceinline__ void load(const unsigned char* p) {
        asm("ld.global.cs.u32 %0, [%1];" : "=r"(v) : "l"(p));
    }
    __device__ __forceinline__ void zero() { v = 0u; }
    __device__ __forceinline__ void store(unsigned char* p) const { *(u32*)p = v; }
};
template <> struct Unit<2> {
    u16 v;
    __device__ __forceinline__ void load(const unsigned char* p) {
        asm("ld.global.cs.u16 %0, [%1];" : "=h"(v) : "l"(p));
    }
    __device__ __forceinline__ void zero() { v = 0; }
    __device__ __forceinline__ void store(unsigned char* p) const { *(u16*)p = v; }
};
template <> struct Unit<1> {
    u16 v; // PTX has no 8-bit registers: ld.u8 zero-extends into 16 bits
    __device__ __forceinline__ void load(const unsigned char* p) {
        asm("ld.global.cs.u8 %0, [%1];" : "=h"(v) : "l"(p));
    }
    __device__ __forceinline__ void zero() { v = 0; }
    __device__ __forceinline__ void store(unsigned char* p) const { *p = (unsigned char)v; }
};

// Copies (src != 0) or zero-fills (src == 0) `units` units of B bytes of one row.
template <int B>
__device__ __forceinline__ void copy_row(unsigned char* dst, const unsigned char* src, u64 units) {
    const u64 first = (u64)blockIdx.y * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.y * blockDim.x;
    for (u64 j = first; j < units; j += stride * GATHER_UNROLL) {
        Unit<B> v[GATHER_UNROLL];
#pragma unroll
        for (int g = 0; g < GATHER_UNROLL; ++g) {
            const u64 jj = j + g * stride;
            if (src != 0 && jj < units) {
                v[g].load(src + jj * B);
            } else {
                v[g].zero();
            }
        }
#pragma unroll
        for (int g = 0; g < GATHER_UNROLL; ++g) {
            const u64 jj = j + g * stride;
            if (jj < units) v[g].store(dst + jj * B);
        }
    }
}

template <typename Id>
__device__ __forceinline__ void gather_host(unsigned char* __restrict__ out,
                                            const Id* __restrict__ ids, u64* __restrict__ status,
                                            const GatherHostParams& p) {
    const unsigned char* base = (const unsigned char*)p.table + p.table_offset * p.elem_size;
    const u64 stride_bytes = p.row_stride * p.elem_size;
    const u64 row_bytes = p.cols * p.elem_size;
    const u64 a = (u64)base | stride_bytes | row_bytes | (u64)out;
    const int unit = (a & 15u) == 0u ? 16 : (a & 7u) == 0u ? 8 : (a & 3u) == 0u ? 4 : (a & 1u) == 0u ? 2 : 1;

    for (u64 i = blockIdx.x; i < p.num_ids; i += gridDim.x) {
        const long long id = (long long)ids[i];
        unsigned char* dst = out + i * row_bytes;
        const unsigned char* src = 0;
        if (id >= 0 && (u64)id < p.rows) {
            src = base + (u64)id * stride_bytes;
        } else if (blockIdx.y == 0u && threadIdx.x == 0u) {
            if (atomicAdd(&status[0], 1ull) == 0ull) status[1] = (u64)id;
        }
        switch (unit) {
            case 16: copy_row<16>(dst, src, row_bytes / 16u); break;
            case 8: copy_row<8>(dst, src, row_bytes / 8u); break;
            case 4: copy_row<4>(dst, src, row_bytes / 4u); break;
            case 2: copy_row<2>(dst, src, row_bytes / 2u); break;
            default: copy_row<1>(dst, src, row_bytes); break;
        }
    }
}

// Every entry point is compiled unless the source starts with `#define BURN_OFFLOAD_SELECT_ENTRY`
// and `#define BURN_OFFLOAD_ONLY_<entry name>` (as in matmul_host.cu).
#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_gather_host_i32)
extern "C" __global__ void gather_host_i32(unsigned char* __restrict__ out,
                                           const int* __restrict__ ids,
                                           u64* __restrict__ status,
                                           const __grid_constant__ GatherHostParams p) {
    gather_host<int>(out, ids, status, p);
}
#endif

#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_gather_host_i64)
extern "C" __global__ void gather_host_i64(unsigned char* __restrict__ out,
                                           const long long* __restrict__ ids,
                                           u64* __restrict__ status,
                                           const __grid_constant__ GatherHostParams p) {
    gather_host<long long>(out, ids, status, p);
}
#endif
