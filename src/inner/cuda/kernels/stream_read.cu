// stream_read.cu: streaming byte copy into a device buffer, from any address the device can
// read: pinned host-mapped memory (read by the SMs over PCIe: the "SM copy" upload path and the
// host-read bandwidth bench) or device memory (the device-to-device bench).
//
// Self-contained: no #include (NVRTC compiles it with no include path), entry points are
// extern "C" so their names are not mangled.
//
// Why this shape: a read of host-mapped memory is not cached and takes ~1-2 us to come back
// across PCIe, so ~35-55 GB/s * 2 us ~= 100 KB must be in flight at all times to reach the link
// rate. Each thread issues SR_UNROLL (8) independent loads of 16 bytes before storing any of
// them (256 threads * 8 * 16 B = 32 KB in flight per block), and the launcher sizes the grid to
// a few blocks per SM, so far more than that is in flight. Consecutive threads read consecutive
// 16-byte vectors, so each warp load instruction covers 512 contiguous bytes (whole 32-byte
// sectors, no byte fetched twice). The loop is grid-stride: any grid size covers any length.
//
// Alignment: vector loads need src and dst at the same offset modulo the vector width. The
// widest width w in {16, 8, 4} with (src ^ dst) % w == 0 is used: a byte-wise head brings src
// (and so dst) to a multiple of w, then n_vec vectors, then a byte-wise tail. When src and dst
// disagree even modulo 4, every byte is copied singly (correct, slow; the launcher's
// destinations are fresh, 256-byte aligned buffers, so this only happens for odd source
// offsets).
//
// Entry points (what cuLaunchKernel receives; with CubeCL: the buffers in
// `KernelArguments::with_buffer` order, then the by-value params, see cuda-notes.md):
//   burn_offload_stream_read(u8* dst,                 const __grid_constant__ StreamReadParams p)
//       copies p.n_bytes from the device address p.src (host-mapped or device memory) to dst.
//   burn_offload_device_copy(u8* dst, const u8* src, const __grid_constant__ StreamReadParams p)
//       copies p.n_bytes from the buffer src to dst (p.src is ignored).
// The params are 2 little-endian u64 words passed BY VALUE (16 bytes), word order = field
// order below. With CubeCL on sm_70+ (grid constants) use
// `MetadataBindingInfo::new(words, words.len())` so that no info-buffer pointer is inserted
// before them.
// Block size: 1-D, any size (the launcher uses 256). Grid: 1-D, any size >= 1.
//
// No pointer is `__restrict__`: with it NVRTC emits `ld.global.nc` (the read-only data path)
// for the source, and plain `ld.global` is the load that is certain to work on host-mapped
// memory. The loads are still issued back to back (checked in the PTX for sm_80 and sm_90a):
// all SR_UNROLL of them precede the stores in the source.

struct StreamReadParams {
    unsigned long long src;     // device address of the source (stream_read only)
    unsigned long long n_bytes; // number of bytes to copy
};

struct alignas(16) SrVec16 {
    unsigned int x, y, z, w;
};

#define SR_UNROLL 8

// Copies n elements of V with a grid-stride loop, SR_UNROLL loads in flight per thread.
template <typename V>
__device__ inline void sr_copy_vec(V* dst, const V* src,
                                   unsigned long long n, unsigned long long tid,
                                   unsigned long long stride) {
    unsigned long long i = tid;
    for (; i + (SR_UNROLL - 1) * stride < n; i += SR_UNROLL * stride) {
        V v[SR_UNROLL];
#pragma unroll
        for (int u = 0; u < SR_UNROLL; ++u) {
            v[u] = src[i + u * stride];
        }
#pragma unroll
        for (int u = 0; u < SR_UNROLL; ++u) {
            dst[i + u * stride] = v[u];
        }
    }
    for (; i < n; i += stride) {
        dst[i] = src[i];
    }
}

__device__ inline void sr_copy(unsigned char* dst, const unsigned char* src,
                               unsigned long long n) {
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long s = (unsigned long long)src;
    const unsigned long long d = (unsigned long long)dst;

    unsigned long long width = 1;
    if (((s ^ d) & 15ull) == 0) {
        width = 16;
    } else if (((s ^ d) & 7ull) == 0) {
        width = 8;
    } else if (((s ^ d) & 3ull) == 0) {
        width = 4;
    }

    unsigned long long head = 0;
    unsigned long long n_vec = 0;
    if (width > 1) {
        head = (width - (s & (width - 1))) & (width - 1);
        if (head > n) {
            head = n;
        }
        n_vec = (n - head) / width;
    }

    for (unsigned long long b = tid; b < head; b += stride) {
        dst[b] = src[b];
    }

    if (width == 16) {
        sr_copy_vec<SrVec16>((SrVec16*)(dst + head), (const SrVec16*)(src + head), n_vec, tid,
                             stride);
    } else if (width == 8) {
        sr_copy_vec<unsigned long long>((unsigned long long*)(dst + head),
                                        (const unsigned long long*)(src + head), n_vec, tid,
                                        stride);
    } else if (width == 4) {
        sr_copy_vec<unsigned int>((unsigned int*)(dst + head), (const unsigned int*)(src + head),
                                  n_vec, tid, stride);
    }

    for (unsigned long long b = head + n_vec * width + tid; b < n; b += stride) {
        dst[b] = src[b];
    }
}

extern "C" __global__ void burn_offload_stream_read(unsigned char* dst,
                                                    const __grid_constant__ StreamReadParams p) {
    sr_copy(dst, (const unsigned char*)p.src, p.n_bytes);
}

extern "C" __global__ void burn_offload_device_copy(unsigned char* dst,
                                                    const unsigned char* src,
                                                    const __grid_constant__ StreamReadParams p) {
    sr_copy(dst, src, p.n_bytes);
}
