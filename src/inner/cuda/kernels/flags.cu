// flags.cu: the op-stream side of the copy engine's protocol (src/copy/mod.rs). Two one-thread
// kernels that CubeCL launches on an op thread's stream, so they are ordered with that
// thread's other kernels without the crate knowing the CUstream:
//
//   burn_offload_wait_flag(const __grid_constant__ FlagParams p)
//       returns once the 32-bit flag at device address p.flag has reached p.value, compared
//       cyclically as cuStreamWaitValue32's CU_STREAM_WAIT_VALUE_GEQ does:
//       (int)(flag - value) >= 0. Kernels queued behind it on the stream start after it
//       returns, so they read a ring region only once the copy stream's DMA into it is done
//       (the copy stream sets the flag with cuStreamWriteValue32 behind the DMA, which orders
//       the DMA's writes before the flag's).
//   burn_offload_set_flag(const __grid_constant__ FlagParams p)
//       stores p.value into the flag at p.flag. It runs once every kernel queued before it on
//       the stream has finished, so the copy stream, which waits for the flag with
//       cuStreamWaitValue32 before overwriting a region, overwrites it only behind its reads.
//
// The params are 2 little-endian u64 words passed BY VALUE (field order below); with CubeCL on
// sm_70+ (grid constants), `MetadataBindingInfo::new(words, words.len())`. No buffers. Launch:
// one block of one thread.
//
// The wait polls with a volatile load (another stream writes the flag) and backs off with
// __nanosleep (sm_70+), so a waiting kernel holds one warp slot and little memory bandwidth.
// Self-contained: no #include; entry points are extern "C".

struct FlagParams {
    unsigned long long flag;
    unsigned long long value;
};

extern "C" __global__ void burn_offload_wait_flag(const __grid_constant__ FlagParams p) {
    const volatile unsigned int* flag = (const volatile unsigned int*)p.flag;
    const unsigned int value = (unsigned int)p.value;
    unsigned int backoff = 32;
    while ((int)(*flag - value) < 0) {
        __nanosleep(backoff);
        if (backoff < 1024) {
            backoff *= 2;
        }
    }
    // Later kernels' reads of the region come after this load.
    __threadfence();
}

extern "C" __global__ void burn_offload_set_flag(const __grid_constant__ FlagParams p) {
    // The kernels before this one on the stream have finished; make the store visible to the
    // copy engine's wait.
    __threadfence_system();
    *(volatile unsigned int*)p.flag = (unsigned int)p.value;
    __threadfence_system();
}
