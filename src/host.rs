//! Host memory: exact-size, reference-counted buffers that a device reads, and strided views
//! into them.
//!
//! A [`HostBuffer`] is one allocation of exactly the requested size (never rounded up to a
//! power of two). Its memory is released when the last [`HostTensor`] view of it is dropped.
//! Process-wide counters ([`host_memory_stats`]) tell how much is alive, so tests can prove
//! that nothing leaks.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use burn_backend::{DType, Shape, TensorData};

use crate::error::OffloadError;

/// Alignment of pageable host allocations (one cache line, enough for every dtype and SIMD).
const HOST_ALIGN: usize = 64;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LIVE_PINNED_BYTES: AtomicUsize = AtomicUsize::new(0);
static TOTAL_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// A snapshot of the process-wide host memory counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct HostMemoryStats {
    /// Bytes of host memory currently allocated by burn-offload.
    pub live_bytes: usize,
    /// Number of host allocations currently alive.
    pub live_allocations: usize,
    /// Of `live_bytes`, the bytes that are pinned (page-locked, device-mapped).
    pub live_pinned_bytes: usize,
    /// Host allocations made since the process started.
    pub total_allocations: u64,
}

/// Reads the process-wide host memory counters.
pub fn host_memory_stats() -> HostMemoryStats {
    HostMemoryStats {
        live_bytes: LIVE_BYTES.load(Ordering::Acquire),
        live_allocations: LIVE_ALLOCATIONS.load(Ordering::Acquire),
        live_pinned_bytes: LIVE_PINNED_BYTES.load(Ordering::Acquire),
        total_allocations: TOTAL_ALLOCATIONS.load(Ordering::Acquire),
    }
}

/// What kind of host memory a buffer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostMemoryKind {
    /// Ordinary pageable memory: the device cannot read it directly; uploads go through a copy.
    Pageable,
    /// Pinned (page-locked) memory mapped into the device's address space: kernels can read it
    /// over the bus, and DMA copies need no bounce buffer.
    Pinned {
        /// The address at which the device sees this memory.
        device_ptr: u64,
    },
}

/// Releases a target-specific allocation (e.g. `cuMemFreeHost`). Called once, when the last
/// view of the buffer is dropped.
pub type HostRelease = Box<dyn FnOnce(NonNull<u8>, usize) + Send + Sync>;

/// One exact-size host allocation.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    kind: HostMemoryKind,
    release: Option<HostRelease>,
}

// SAFETY: the buffer owns its memory exclusively; shared access goes through `&self` (reads)
// and writes only happen through `&mut self` before the buffer is shared in an `Arc`.
unsafe impl Send for HostBuffer {}
// SAFETY: see `Send`; `&HostBuffer` only allows reads.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Allocates `len` bytes of zeroed, pageable host memory, exactly that size.
    pub fn pageable(len: usize) -> Result<Self, OffloadError> {
        let ptr = if len == 0 {
            NonNull::<u8>::dangling()
        } else {
            let layout =
                Layout::from_size_align(len, HOST_ALIGN).map_err(|e| OffloadError::HostAlloc {
                    bytes: len,
                    reason: e.to_string(),
                })?;
            // SAFETY: `layout` has a non-zero size.
            let raw = unsafe { std::alloc::alloc_zeroed(layout) };
            NonNull::new(raw).ok_or_else(|| OffloadError::HostAlloc {
                bytes: len,
                reason: "the allocator returned null".into(),
            })?
        };
        let release: HostRelease = Box::new(|ptr, len| {
            if len != 0 {
                // SAFETY: allocated above with the same size and alignment.
                unsafe {
                    std::alloc::dealloc(
                        ptr.as_ptr(),
                        Layout::from_size_align_unchecked(len, HOST_ALIGN),
                    )
                }
            }
        });
        // SAFETY: `ptr` points to `len` bytes we own, released by `release`.
        Ok(unsafe { Self::from_raw(ptr, len, HostMemoryKind::Pageable, release) })
    }

    /// Wraps memory a target allocated (e.g. pinned memory from the CUDA driver).
    ///
    /// # Safety
    /// `ptr` must point to `len` readable and writable bytes that stay valid until `release`
    /// is called, and nothing else may free or write them meanwhile.
    pub unsafe fn from_raw(
        ptr: NonNull<u8>,
        len: usize,
        kind: HostMemoryKind,
        release: HostRelease,
    ) -> Self {
        LIVE_BYTES.fetch_add(len, Ordering::AcqRel);
        LIVE_ALLOCATIONS.fetch_add(1, Ordering::AcqRel);
        TOTAL_ALLOCATIONS.fetch_add(1, Ordering::AcqRel);
        if matches!(kind, HostMemoryKind::Pinned { .. }) {
            LIVE_PINNED_BYTES.fetch_add(len, Ordering::AcqRel);
        }
        Self {
            ptr,
            len,
            kind,
            release: Some(release),
        }
    }

    /// Size in bytes (exactly what was asked for).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pageable or pinned.
    pub fn kind(&self) -> HostMemoryKind {
        self.kind
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes for the buffer's lifetime (see `from_raw`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable: only while the buffer is not shared yet.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `&mut self` guarantees exclusive access; valid for `len` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The host address of the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release(self.ptr, self.len);
        }
        LIVE_BYTES.fetch_sub(self.len, Ordering::AcqRel);
        LIVE_ALLOCATIONS.fetch_sub(1, Ordering::AcqRel);
        if matches!(self.kind, HostMemoryKind::Pinned { .. }) {
            LIVE_PINNED_BYTES.fetch_sub(self.len, Ordering::AcqRel);
        }
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("len", &self.len)
            .field("kind", &self.kind)
            .finish()
    }
}

/// A strided view of a [`HostBuffer`]: what an offloaded float tensor is.
///
/// Cloning is O(1) (the buffer is shared). Metadata-only ops ([`reshape`](Self::reshape) of a
/// contiguous view, [`permute`](Self::permute), [`slice`](Self::slice),
/// [`expand`](Self::expand)) return new views of the same buffer.
#[derive(Clone, Debug)]
pub struct HostTensor {
    buffer: Arc<HostBuffer>,
    /// Offset of element `[0, 0, ..]`, in elements.
    offset: usize,
    shape: Vec<usize>,
    /// Strides in elements; 0 for broadcast dims, negative for reversed ones.
    strides: Vec<isize>,
    dtype: DType,
}

fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d.max(1) as isize;
    }
    strides
}

impl HostTensor {
    /// A contiguous tensor over a whole buffer.
    pub fn new(buffer: HostBuffer, shape: Vec<usize>, dtype: DType) -> Result<Self, OffloadError> {
        let expected = shape.iter().product::<usize>() * dtype.size();
        if expected != buffer.len() {
            return Err(OffloadError::DataSize {
                shape,
                dtype,
                expected,
                got: buffer.len(),
            });
        }
        Ok(Self {
            strides: contiguous_strides(&shape),
            buffer: Arc::new(buffer),
            offset: 0,
            shape,
            dtype,
        })
    }

    /// Copies `data` into a new host buffer made by `alloc` (exactly `data`'s size).
    pub fn from_data(
        data: &TensorData,
        alloc: impl FnOnce(usize) -> Result<HostBuffer, OffloadError>,
    ) -> Result<Self, OffloadError> {
        let bytes = data.as_bytes();
        let mut buffer = alloc(bytes.len())?;
        buffer.as_mut_slice().copy_from_slice(bytes);
        Self::new(buffer, data.shape.to_vec(), data.dtype)
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        Shape::from(self.shape.clone())
    }

    /// The dims of the shape.
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements (0: broadcast, negative: reversed).
    pub fn strides(&self) -> &[isize] {
        &self.strides
    }

    /// Offset of the first element in the buffer, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The underlying buffer (shared by every view of it).
    pub fn buffer(&self) -> &Arc<HostBuffer> {
        &self.buffer
    }

    /// Number of elements in the view.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the view's elements in bytes (what an upload moves).
    pub fn size_bytes(&self) -> usize {
        self.num_elements() * self.dtype.size()
    }

    /// Whether the view is the row-major contiguous layout of its shape.
    pub fn is_contiguous(&self) -> bool {
        self.shape
            .iter()
            .zip(&self.strides)
            .zip(contiguous_strides(&self.shape))
            .all(|((&d, &s), c)| d <= 1 || s == c)
    }

    /// The view's bytes, if it is contiguous (no copy).
    pub fn contiguous_bytes(&self) -> Option<&[u8]> {
        if !self.is_contiguous() {
            return None;
        }
        let esize = self.dtype.size();
        let start = self.offset * esize;
        Some(&self.buffer.as_slice()[start..start + self.size_bytes()])
    }

    /// Reads the view into row-major [`TensorData`] (one copy from host memory).
    pub fn to_data(&self) -> TensorData {
        let bytes = match self.contiguous_bytes() {
            Some(b) => b.to_vec(),
            None => self.gather_bytes(),
        };
        TensorData::from_bytes_vec(bytes, self.shape.clone(), self.dtype)
    }

    fn gather_bytes(&self) -> Vec<u8> {
        let esize = self.dtype.size();
        let n = self.num_elements();
        let mut out = Vec::with_capacity(n * esize);
        let src = self.buffer.as_slice();
        let rank = self.shape.len();
        if n == 0 {
            return out;
        }
        let mut index = vec![0usize; rank];
        let mut pos = self.offset as isize;
        loop {
            let start = pos as usize * esize;
            out.extend_from_slice(&src[start..start + esize]);
            // Advance the multi-index (row-major), keeping `pos` in step.
            let mut d = rank;
            loop {
                if d == 0 {
                    return out;
                }
                d -= 1;
                index[d] += 1;
                pos += self.strides[d];
                if index[d] < self.shape[d] {
                    break;
                }
                pos -= self.strides[d] * self.shape[d] as isize;
                index[d] = 0;
            }
        }
    }

    /// Whether the view is contiguous, starts at the buffer's first byte and covers all of it.
    pub(crate) fn is_whole_buffer(&self) -> bool {
        self.offset == 0 && self.is_contiguous() && self.size_bytes() == self.buffer.len()
    }

    /// Whether nothing else refers to the buffer: no other view, and no weak reference (a
    /// prefetcher's learned order).
    pub(crate) fn is_unshared(&self) -> bool {
        Arc::strong_count(&self.buffer) == 1 && Arc::weak_count(&self.buffer) == 0
    }

    /// The buffer, writable, where nothing else refers to it (see
    /// [`is_unshared`](Self::is_unshared)).
    pub(crate) fn buffer_mut(&mut self) -> Option<&mut HostBuffer> {
        Arc::get_mut(&mut self.buffer)
    }

    /// When this strided view is a permutation of a contiguous block of its buffer (possibly
    /// with size-1 dims inserted), e.g. the transposed weight of a tied LM head: that block as
    /// a contiguous view, and the axes that, applied to the block with a permute, give this
    /// view's dims of size > 1 in order. A device can then upload the block in one DMA and
    /// permute it there, instead of gathering element by element on the host. `None` for
    /// broadcast (stride 0), reversed or gapped views.
    pub fn permuted_block(&self) -> Option<(HostTensor, Vec<usize>)> {
        let dims: Vec<(usize, isize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(d, _)| **d != 1)
            .map(|(d, s)| (*d, *s))
            .collect();
        if dims.iter().any(|&(_, s)| s <= 0) {
            return None;
        }
        // Block axes: the view's axes from the largest stride to the smallest.
        let mut order: Vec<usize> = (0..dims.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(dims[i].1));
        let mut expected = 1isize;
        for &i in order.iter().rev() {
            if dims[i].1 != expected {
                return None;
            }
            expected *= dims[i].0 as isize;
        }
        let shape: Vec<usize> = order.iter().map(|&i| dims[i].0).collect();
        let mut axes = vec![0; dims.len()];
        for (block_axis, &view_axis) in order.iter().enumerate() {
            axes[view_axis] = block_axis;
        }
        let block = Self {
            buffer: self.buffer.clone(),
            offset: self.offset,
            strides: contiguous_strides(&shape),
            shape,
            dtype: self.dtype,
        };
        Some((block, axes))
    }

    /// Reshape without copying: any reshape of a contiguous view, and inserting or removing
    /// size-1 dims of a strided one (e.g. `unsqueeze` of a transposed weight); `None` otherwise.
    pub fn reshape(&self, shape: Vec<usize>) -> Option<Self> {
        if shape.iter().product::<usize>() != self.num_elements() {
            return None;
        }
        if self.is_contiguous() {
            return Some(Self {
                strides: contiguous_strides(&shape),
                shape,
                ..self.clone()
            });
        }
        let kept: Vec<(usize, isize)> = (self.shape.iter().copied())
            .zip(self.strides.iter().copied())
            .filter(|&(d, _)| d != 1)
            .collect();
        let mut kept_iter = kept.iter();
        let mut strides = Vec::with_capacity(shape.len());
        for &d in &shape {
            if d == 1 {
                strides.push(0);
            } else {
                match kept_iter.next() {
                    Some(&(old, stride)) if old == d => strides.push(stride),
                    _ => return None,
                }
            }
        }
        if kept_iter.next().is_some() {
            return None;
        }
        Some(Self {
            shape,
            strides,
            ..self.clone()
        })
    }

    /// Reorders the dims (`swap_dims`/`transpose` are permutations too).
    pub fn permute(&self, axes: &[usize]) -> Self {
        Self {
            shape: axes.iter().map(|&a| self.shape[a]).collect(),
            strides: axes.iter().map(|&a| self.strides[a]).collect(),
            ..self.clone()
        }
    }

    /// Swaps two dims.
    pub fn swap_dims(&self, a: usize, b: usize) -> Self {
        let mut axes: Vec<usize> = (0..self.shape.len()).collect();
        axes.swap(a, b);
        self.permute(&axes)
    }

    /// A sub-range along each dim: `(range, step)` per dim, ranges already bounded to the dims.
    /// A negative step walks the range backwards.
    pub fn slice(&self, ranges: &[(std::ops::Range<usize>, isize)]) -> Self {
        let mut offset = self.offset as isize;
        let mut shape = self.shape.clone();
        let mut strides = self.strides.clone();
        for (d, (range, step)) in ranges.iter().enumerate() {
            let len = range.end.saturating_sub(range.start);
            let step_abs = step.unsigned_abs();
            let count = len.div_ceil(step_abs);
            if count > 0 {
                let first = if *step > 0 {
                    range.start
                } else {
                    range.end - 1
                };
                offset += first as isize * self.strides[d];
            }
            shape[d] = count;
            strides[d] = self.strides[d] * step;
        }
        Self {
            offset: offset as usize,
            shape,
            strides,
            ..self.clone()
        }
    }

    /// Broadcasts to `shape` (new leading dims and size-1 dims get stride 0); `None` when the
    /// shapes are not broadcast-compatible.
    pub fn expand(&self, shape: Vec<usize>) -> Option<Self> {
        if shape.len() < self.shape.len() {
            return None;
        }
        let lead = shape.len() - self.shape.len();
        let mut strides = vec![0isize; shape.len()];
        for (i, &d) in shape.iter().enumerate().skip(lead) {
            let (sd, ss) = (self.shape[i - lead], self.strides[i - lead]);
            strides[i] = if sd == d {
                ss
            } else if sd == 1 {
                0
            } else {
                return None;
            };
        }
        Some(Self {
            shape,
            strides,
            ..self.clone()
        })
    }
}

/// A [`HostTensor`] view that does not keep its buffer alive (what the prefetcher remembers of
/// a learned read order, so that dropping a model frees its host memory).
#[derive(Clone, Debug)]
pub(crate) struct WeakHostTensor {
    buffer: Weak<HostBuffer>,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<isize>,
    dtype: DType,
}

impl WeakHostTensor {
    /// The view again, if its buffer is still alive.
    pub(crate) fn upgrade(&self) -> Option<HostTensor> {
        Some(HostTensor {
            buffer: self.buffer.upgrade()?,
            offset: self.offset,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            dtype: self.dtype,
        })
    }

    /// Whether the buffer is still alive.
    pub(crate) fn is_alive(&self) -> bool {
        self.buffer.strong_count() > 0
    }

    /// The buffer's identity (its `Arc` pointer): unique while this `Weak` exists, since the
    /// allocation is not reused before its last `Weak` goes.
    pub(crate) fn buffer_id(&self) -> usize {
        self.buffer.as_ptr() as usize
    }
}

impl HostTensor {
    /// A view of the same memory that does not keep the buffer alive.
    pub(crate) fn downgrade(&self) -> WeakHostTensor {
        WeakHostTensor {
            buffer: Arc::downgrade(&self.buffer),
            offset: self.offset,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            dtype: self.dtype,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(shape: &[usize]) -> HostTensor {
        let n: usize = shape.iter().product();
        let data = TensorData::new((0..n).map(|v| v as f32).collect::<Vec<_>>(), shape.to_vec());
        HostTensor::from_data(&data, HostBuffer::pageable).unwrap()
    }

    fn values(t: &HostTensor) -> Vec<f32> {
        t.to_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn allocations_are_exact_and_counted() {
        let before = host_memory_stats();
        let buf = HostBuffer::pageable(1000).unwrap();
        assert_eq!(buf.len(), 1000);
        let during = host_memory_stats();
        assert!(during.live_bytes >= before.live_bytes + 1000);
        drop(buf);
    }

    #[test]
    fn views_read_like_ndarray() {
        let t = iota(&[2, 3, 4]);
        assert_eq!(values(&t.swap_dims(0, 2))[..4], [0.0, 12.0, 4.0, 16.0]);
        let s = t.slice(&[(0..2, 1), (1..3, 1), (0..4, 2)]);
        assert_eq!(values(&s), [4.0, 6.0, 8.0, 10.0, 16.0, 18.0, 20.0, 22.0]);
        let r = t.slice(&[(0..1, 1), (0..1, 1), (0..4, -1)]);
        assert_eq!(values(&r), [3.0, 2.0, 1.0, 0.0]);
        let e = iota(&[1, 3]).expand(vec![2, 2, 3]).unwrap();
        assert_eq!(values(&e), [0.0, 1.0, 2.0].repeat(4));
        assert!(t.swap_dims(0, 1).reshape(vec![24]).is_none());
        // Size-1 dims can be added to or removed from a strided view without copying.
        let tr = iota(&[3, 4]).swap_dims(0, 1);
        let unsqueezed = tr.reshape(vec![1, 4, 1, 3]).unwrap();
        assert_eq!(values(&unsqueezed), values(&tr));
        assert_eq!(
            values(&unsqueezed.reshape(vec![4, 3]).unwrap()),
            values(&tr)
        );
        assert!(tr.reshape(vec![2, 6]).is_none());
        assert_eq!(values(&t.reshape(vec![4, 6]).unwrap()), values(&t));
    }

    /// Permuting the block by the returned axes gives the view's values, checked against
    /// ndarray-style reads of the view itself.
    #[test]
    fn permuted_blocks_rebuild_the_view() {
        let t = iota(&[2, 3, 4]);
        let offset = iota(&[5, 4]).slice(&[(1..4, 1), (0..4, 1)]); // rows 1..4: a block at 4
        let cases = [
            t.permute(&[2, 0, 1]),
            t.swap_dims(0, 1),
            iota(&[3, 4])
                .swap_dims(0, 1)
                .reshape(vec![1, 4, 1, 3])
                .unwrap(),
            offset.swap_dims(0, 1),
        ];
        for view in &cases {
            let (block, axes) = view.permuted_block().expect("a permuted block");
            assert!(block.is_contiguous());
            assert_eq!(block.num_elements(), view.num_elements());
            let squeezed: Vec<usize> = view.dims().iter().copied().filter(|&d| d != 1).collect();
            let rebuilt = block.permute(&axes);
            assert_eq!(rebuilt.dims(), squeezed.as_slice());
            assert_eq!(values(&rebuilt), values(view), "{view:?}");
        }
        // Gapped (a strided slice), reversed and broadcast views are not blocks.
        assert!(
            t.slice(&[(0..2, 1), (0..3, 1), (0..4, 2)])
                .permuted_block()
                .is_none()
        );
        assert!(
            t.slice(&[(0..2, 1), (0..3, 1), (0..4, -1)])
                .permuted_block()
                .is_none()
        );
        assert!(
            iota(&[1, 3])
                .expand(vec![2, 3])
                .unwrap()
                .permuted_block()
                .is_none()
        );
    }
}
