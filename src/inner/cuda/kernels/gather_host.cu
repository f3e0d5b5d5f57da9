// gather_host.cu: embedding gather out[i, :] = table[ids[i], :] with the table in pinned,
// host-mapped memory: only the requested rows cross PCIe, each byte once.
//
// Self-contained: no #include (NVRTC compiles it with no include path).
//
// Entry points:
//   gather_host_i32(unsigned char* out, const int* ids,       const __grid_constant__ GatherHostParams p)
//   gather_host_i64(unsigned char* out, const long long* ids, const __grid_constant__ GatherHostParams p)
// With CubeCL the two pointers are the buffers in `KernelArguments::with_buffer` order and the
// params are 7 little-endian u64 words passed by value (`MetadataBindingInfo::new(words,
// words.len())`, so that no info buffer pointer is inserted before them). The table is not a
// buffer argument: its device address (host-mapped memory) travels in `p.table`.
//
// Bytes-generic: the kernel copies rows of `p.cols * p.elem_size` bytes and never interprets
// them, so it serves every dtype.
//   table row r (0 <= r < p.rows) starts at p.table + (p.table_offset + r * p.row_stride) * p.elem_size
//   (offset and stride in elements; columns must be contiguous, i.e. HostTensor strides
//   [row_stride, 1] with row_stride >= 0). The launcher checks that rows 0..p.rows all lie in
//   the host buffer before launching; the kernel reads no other row.
//   out: [num_ids, cols] contiguous, device memory; ids: [num_ids] contiguous, device memory.
//
// OUT-OF-RANGE IDS ARE A DEVICE-SIDE ASSERTION (as PyTorch's embedding): for an id < 0 or
// >= p.rows nothing is read; thread 0 of the block with blockIdx.y == 0 that handles it prints
// the id and p.rows (device printf) and fails a device-side assert (`__assertfail`, then
// `__trap()` in case it returned), and the other threads handling that id stop. The launch
// fails with CUDA_ERROR_ASSERT ("device-side assert triggered"), reported at the next
// synchronisation of the stream; as with any device-side assert, the CUDA context is unusable
// afterwards (every later call on it fails) and the process must be restarted to use the
// device again. Check ids on the host first where they can be out of range.
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

// Copies `units` units of B bytes of one row.
template <int B>
__device__ __forceinline__ void copy_row(unsigned char* dst, const unsigned char* src, u64 units) {
    const u64 first = (u64)blockIdx.y * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.y * blockDim.x;
    for (u64 j = first; j < units; j += stride * GATHER_UNROLL) {
        Unit<B> v[GATHER_UNROLL];
#pragma unroll
        for (int g = 0; g < GATHER_UNROLL; ++g) {
            const u64 jj = j + g * stride;
            if (jj < units) {
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

// Fails the launch on an out-of-range id (see the header): one thread per id asserts, the
// caller stops the others.
__device__ __noinline__ void gather_host_bad_id(long long id, u64 rows) {
    if (blockIdx.y == 0u && threadIdx.x == 0u) {
        printf("gather_host: embedding id %lld is out of range for a table of %llu rows "
               "(valid ids: 0..%llu)\n",
               id, rows, rows);
        __assertfail("embedding id out of range: 0 <= id < rows", __FILE__, __LINE__, __func__,
                     sizeof(char));
        __trap(); // not reached: the assertion stops the kernel
    }
}

template <typename Id>
__device__ __forceinline__ void gather_host(unsigned char* __restrict__ out,
                                            const Id* __restrict__ ids,
                                            const GatherHostParams& p) {
    const unsigned char* base = (const unsigned char*)p.table + p.table_offset * p.elem_size;
    const u64 stride_bytes = p.row_stride * p.elem_size;
    const u64 row_bytes = p.cols * p.elem_size;
    const u64 a = (u64)base | stride_bytes | row_bytes | (u64)out;
    const int unit = (a & 15u) == 0u ? 16 : (a & 7u) == 0u ? 8 : (a & 3u) == 0u ? 4 : (a & 1u) == 0u ? 2 : 1;

    for (u64 i = blockIdx.x; i < p.num_ids; i += gridDim.x) {
        const long long id = (long long)ids[i];
        if (id < 0 || (u64)id >= p.rows) {
            gather_host_bad_id(id, p.rows);
            return; // read nothing; the launch fails with the assertion above
        }
        unsigned char* dst = out + i * row_bytes;
        const unsigned char* src = base + (u64)id * stride_bytes;
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
                                           const __grid_constant__ GatherHostParams p) {
    gather_host<int>(out, ids, p);
}
#endif

#if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_gather_host_i64)
extern "C" __global__ void gather_host_i64(unsigned char* __restrict__ out,
                                           const long long* __restrict__ ids,
                                           const __grid_constant__ GatherHostParams p) {
    gather_host<long long>(out, ids, p);
}
#endif
