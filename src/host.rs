//! Host memory: exact-size, reference-counted buffers that a device reads, and strided views
//! into them.
//!
//! A [`HostBuffer`] is one allocation of exactly the requested size (never rounded up to a
//! power of two). Its memory is released when the last [`HostTensor`] view of it is dropped.
//! Process-wide counters ([`host_memory_stats`](crate::host_memory_stats)) tell how much is alive, so tests can prove
//! that nothing leaks.

use std::alloc::Layout;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use burn_backend::{DType, Shape, TensorData};

use crate::error::OffloadError;
use crate::stats::HostMemoryStats;

/// Alignment of pageable host allocations (one cache line, enough for every dtype and SIMD).
const HOST_ALIGN: usize = 64;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static LIVE_PINNED_BYTES: AtomicUsize = AtomicUsize::new(0);
static TOTAL_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Starts the peak again from the bytes alive now.
pub(crate) fn reset_peak() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Acquire), Ordering::Release);
}

/// Reads the process-wide host memory counters.
pub(crate) fn host_memory_counters() -> HostMemoryStats {
    HostMemoryStats {
        live_bytes: LIVE_BYTES.load(Ordering::Acquire),
        live_allocations: LIVE_ALLOCATIONS.load(Ordering::Acquire),
        live_pinned_bytes: LIVE_PINNED_BYTES.load(Ordering::Acquire),
        total_allocations: TOTAL_ALLOCATIONS.load(Ordering::Acquire),
        peak_bytes: PEAK_BYTES.load(Ordering::Acquire),
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
/// view of the buffer is dropped, with the pointer, the length and the devices recorded as
/// readers of the buffer ([`HostBuffer::note_reader`]), whose work must be finished before the
/// memory is freed.
pub type HostRelease = Box<dyn FnOnce(NonNull<u8>, usize, DeviceReaders) + Send + Sync>;

/// The compute devices, by ordinal, that may read a host buffer through its device address
/// (kernels, DMA copies): what a release must wait for before freeing the memory.
///
/// A 64-bit set: ordinals below [`SHARED_FROM`](Self::SHARED_FROM) have a bit each, and all
/// ordinals from it up share the last bit, so a set holding one of them answers "may read" for
/// all of them (conservative: at worst a release waits for a device that never read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceReaders(u64);

impl DeviceReaders {
    /// The first ordinal that shares the last bit with every larger one.
    pub const SHARED_FROM: usize = 63;

    /// No reader.
    pub const fn none() -> Self {
        Self(0)
    }

    fn bit(ordinal: usize) -> u64 {
        1u64 << ordinal.min(Self::SHARED_FROM)
    }

    /// The set with `ordinal` added.
    pub fn with(self, ordinal: usize) -> Self {
        Self(self.0 | Self::bit(ordinal))
    }

    /// Whether device `ordinal` may read (always true for every ordinal >=
    /// [`SHARED_FROM`](Self::SHARED_FROM) once one of them was recorded).
    pub fn may_read(self, ordinal: usize) -> bool {
        self.0 & Self::bit(ordinal) != 0
    }

    /// Whether no device was recorded.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The devices that may read a buffer of either set.
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The devices whose work must be drained before freeing a buffer that was allocated for
    /// device `allocating`, on a machine with `device_count` devices: `allocating` first, then
    /// every other recorded reader in increasing order. Where the shared bit is set, every
    /// ordinal from [`SHARED_FROM`](Self::SHARED_FROM) up to `device_count` (at least
    /// `SHARED_FROM` itself, in case the count is unknown, e.g. 0) is included, since the set
    /// cannot tell which of them read. Each ordinal appears once.
    pub fn drain_order(self, allocating: usize, device_count: usize) -> Vec<usize> {
        let mut order = vec![allocating];
        let separate = (0..Self::SHARED_FROM).filter(|&o| self.0 & (1u64 << o) != 0);
        let shared_end = device_count.max(Self::SHARED_FROM + 1);
        let shared = (Self::SHARED_FROM..shared_end).filter(|_| self.may_read(Self::SHARED_FROM));
        order.extend(separate.chain(shared).filter(|&o| o != allocating));
        order
    }
}

/// One exact-size host allocation.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    kind: HostMemoryKind,
    /// Bits of [`DeviceReaders`]: devices that may read the buffer.
    readers: AtomicU64,
    release: Option<HostRelease>,
    /// The parameter this buffer is the value of, if a policy marked one ([`crate::mark`]).
    mark: std::sync::Mutex<Option<crate::mark::BufferMark>>,
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
        let release: HostRelease = Box::new(|ptr, len, _readers| {
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
        let live = LIVE_BYTES.fetch_add(len, Ordering::AcqRel) + len;
        PEAK_BYTES.fetch_max(live, Ordering::AcqRel);
        LIVE_ALLOCATIONS.fetch_add(1, Ordering::AcqRel);
        TOTAL_ALLOCATIONS.fetch_add(1, Ordering::AcqRel);
        if matches!(kind, HostMemoryKind::Pinned { .. }) {
            LIVE_PINNED_BYTES.fetch_add(len, Ordering::AcqRel);
        }
        Self {
            ptr,
            len,
            kind,
            readers: AtomicU64::new(0),
            release: Some(release),
            mark: std::sync::Mutex::new(None),
        }
    }

    /// Records that this buffer is the value of a marked parameter ([`crate::mark`]).
    pub(crate) fn set_mark(&self, mark: crate::mark::BufferMark) {
        *self.mark.lock().unwrap_or_else(|e| e.into_inner()) = Some(mark);
    }

    /// Takes this buffer's mark, if it has one: the parameter's value is another buffer now
    /// (e.g. the quantized copy of this one), so freeing this one is no loss.
    pub(crate) fn take_mark(&self) -> Option<crate::mark::BufferMark> {
        self.mark.lock().unwrap_or_else(|e| e.into_inner()).take()
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

    /// Records that compute device `ordinal` may read this buffer (a kernel or copy queued on
    /// it, or an offloaded tensor moved to it), so that the release waits for that device too,
    /// not only for the one the memory was allocated for. Cheap (one atomic OR); call it before
    /// queueing the work.
    pub fn note_reader(&self, ordinal: usize) {
        self.readers
            .fetch_or(DeviceReaders::bit(ordinal), Ordering::AcqRel);
    }

    /// The devices recorded by [`note_reader`](Self::note_reader) so far.
    pub fn readers(&self) -> DeviceReaders {
        DeviceReaders(self.readers.load(Ordering::Acquire))
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Some(mark) = self
            .mark
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            crate::mark::buffer_freed(mark);
        }
        if let Some(release) = self.release.take() {
            release(self.ptr, self.len, self.readers());
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

/// What a kernel reads of a host buffer in place: `rows` rows of `cols` contiguous elements of
/// `elem_size` bytes each, row `r` starting `offset + r * row_stride` elements into the buffer
/// (a row-major or transposed matmul weight, an embedding table). The CUDA launchers check it
/// against the buffer's length ([`check`](Self::check)) before launching, whatever the view or
/// plan they were given says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct StridedRead {
    /// Elements from the buffer's start to row 0.
    pub(crate) offset: u64,
    /// Number of rows read.
    pub(crate) rows: u64,
    /// Contiguous elements read per row.
    pub(crate) cols: u64,
    /// Elements from one row's start to the next.
    pub(crate) row_stride: u64,
    /// Bytes per element.
    pub(crate) elem_size: u64,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl StridedRead {
    /// The bytes the read can touch, from the first byte of row 0 to one past the last byte of
    /// the last row (`offset + (rows - 1) * row_stride + cols` elements); `None` when it
    /// touches nothing (no rows, no columns or 0-byte elements). `Err` with the reason when the
    /// arithmetic overflows `u64` (every step is checked).
    pub(crate) fn byte_span(&self) -> Result<Option<Range<u64>>, String> {
        if self.rows == 0 || self.cols == 0 || self.elem_size == 0 {
            return Ok(None);
        }
        let overflow = || format!("the extent of {self:?} overflows 64 bits");
        let end_element = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|e| e.checked_add(self.offset))
            .and_then(|e| e.checked_add(self.cols))
            .ok_or_else(overflow)?;
        let start = self
            .offset
            .checked_mul(self.elem_size)
            .ok_or_else(overflow)?;
        let end = end_element
            .checked_mul(self.elem_size)
            .ok_or_else(overflow)?;
        Ok(Some(start..end))
    }

    /// `Ok` when every byte the read can touch lies in a buffer of `len` bytes; otherwise the
    /// reason, naming the bytes it would touch.
    pub(crate) fn check(&self, len: usize) -> Result<(), String> {
        match self.byte_span()? {
            Some(span) if span.end > len as u64 => Err(format!(
                "the read ({} rows of {} elements of {} bytes, row stride {}, offset {}) touches \
                 bytes {}..{} of a host buffer of {len} bytes",
                self.rows,
                self.cols,
                self.elem_size,
                self.row_stride,
                self.offset,
                span.start,
                span.end
            )),
            _ => Ok(()),
        }
    }
}

/// A strided view of a [`HostBuffer`]: what an offloaded float tensor is.
///
/// Cloning is O(1) (the buffer is shared). Metadata-only ops ([`reshape`](Self::reshape) of a
/// contiguous view, [`permute`](Self::permute), [`swap_dims`](Self::swap_dims),
/// [`slice`](Self::slice), [`expand`](Self::expand)) return new views of the same buffer.
///
/// # Invariant
/// Every element a view addresses lies inside its buffer: for a non-empty view, the smallest and
/// the largest element offset over all its indices (`offset + Σ (dim - 1) · stride` over the
/// negative, respectively positive, strides) lie in `0..buffer.len() / dtype.size()`, and its
/// element count in bytes fits in `isize`. Every constructor checks this in one place (a
/// private `checked_view`, always on) and returns [`OffloadError::InvalidView`] otherwise, so
/// no safe API can make a view that reads outside its buffer; kernels and uploads rely on it.
/// An empty view addresses nothing (its offset is 0).
#[derive(Clone, Debug)]
pub struct HostTensor {
    buffer: Arc<HostBuffer>,
    /// Offset of element `[0, 0, ..]`, in elements.
    offset: usize,
    shape: Vec<usize>,
    /// Strides in elements; 0 for broadcast dims, negative for reversed ones.
    strides: Vec<isize>,
    dtype: DType,
    /// For a quantized tensor read as float (`dequantize` of an offloaded quantized tensor):
    /// the float dtype its reads produce. `None`: reads produce `dtype`.
    read_as: Option<DType>,
}

/// Row-major strides of `shape` (size-0 dims count as 1). Wrapping arithmetic: a shape whose
/// element count overflows is rejected by `checked_view` before such strides are used.
fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.wrapping_mul(d.max(1) as isize);
    }
    strides
}

fn invalid(reason: String) -> OffloadError {
    OffloadError::InvalidView { reason }
}

/// The element count of `shape`, or an error naming `what` when it overflows `usize`.
fn element_count(shape: &[usize], what: &str) -> Result<usize, OffloadError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            invalid(format!(
                "{what} {shape:?} has more elements than fit in memory; use smaller dims"
            ))
        })
}

/// Checks a view layout against a buffer of `buffer_len` bytes of `esize`-byte elements and
/// returns the offset to store (0 for an empty view). `offset` is the element offset of index
/// `[0, 0, ..]`, possibly out of range (then the view is rejected, unless it is empty).
///
/// A non-empty view is accepted when the smallest and the largest element offset it
/// addresses, `offset + Σ (d - 1) · s` over its negative and positive strides `s`, lie in
/// `0..buffer_len / esize`; any view when the product of its dims (size-0 dims counted as 1)
/// times `esize` fits in `isize`. All arithmetic is checked (`i128` for the extents).
fn check_layout(
    offset: i128,
    shape: &[usize],
    strides: &[isize],
    esize: usize,
    buffer_len: usize,
) -> Result<usize, OffloadError> {
    if shape.len() != strides.len() {
        return Err(invalid(format!(
            "shape {shape:?} and strides {strides:?} have different ranks"
        )));
    }
    if esize == 0 {
        return Err(invalid("elements of 0 bytes".into()));
    }
    let padded = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d.max(1)))
        .and_then(|n| n.checked_mul(esize))
        .filter(|&bytes| bytes <= isize::MAX as usize);
    if padded.is_none() {
        return Err(invalid(format!(
            "shape {shape:?} of {esize}-byte elements has more elements than fit in memory; use \
             smaller dims"
        )));
    }
    if shape.contains(&0) {
        return Ok(0);
    }
    let overflow = || {
        invalid(format!(
            "the extent of strides {strides:?} over shape {shape:?} overflows; use smaller strides"
        ))
    };
    let (mut lo, mut hi) = (offset, offset);
    for (&d, &s) in shape.iter().zip(strides) {
        let span = (d as i128 - 1) * s as i128;
        if span < 0 {
            lo = lo.checked_add(span).ok_or_else(overflow)?;
        } else {
            hi = hi.checked_add(span).ok_or_else(overflow)?;
        }
    }
    let elements = (buffer_len / esize) as i128;
    if lo < 0 || hi >= elements {
        return Err(invalid(format!(
            "a view with offset {offset}, shape {shape:?} and strides {strides:?} addresses \
             elements {lo}..={hi}, outside the buffer's {elements} elements (0..{elements}); \
             keep ranges within the dims of the view it is made from"
        )));
    }
    Ok(offset as usize)
}

impl HostTensor {
    /// The one constructor of views: checks the layout against the buffer ([`check_layout`]).
    fn checked_view(
        buffer: Arc<HostBuffer>,
        offset: i128,
        shape: Vec<usize>,
        strides: Vec<isize>,
        dtype: DType,
    ) -> Result<Self, OffloadError> {
        if let DType::QFloat(scheme) = dtype {
            return Err(invalid(format!(
                "a quantized host tensor ({}) has no strided views: its values are packed in \
                 blocks; dequantize it (or copy it to the device) first",
                crate::quant::scheme_name(&scheme)
            )));
        }
        let offset = check_layout(offset, &shape, &strides, dtype.size(), buffer.len())?;
        Ok(Self {
            buffer,
            offset,
            shape,
            strides,
            dtype,
            read_as: None,
        })
    }

    /// Another view of this tensor's buffer.
    fn view(
        &self,
        offset: i128,
        shape: Vec<usize>,
        strides: Vec<isize>,
    ) -> Result<Self, OffloadError> {
        Self::checked_view(self.buffer.clone(), offset, shape, strides, self.dtype)
    }

    /// A contiguous tensor over a whole buffer. For a quantized dtype the buffer holds the
    /// bytes Burn's `q_into_data` gives (packed values, then scales: [`crate::quant`]); its
    /// length is checked against the scheme's layout.
    pub fn new(buffer: HostBuffer, shape: Vec<usize>, dtype: DType) -> Result<Self, OffloadError> {
        if let DType::QFloat(scheme) = dtype {
            element_count(&shape, "shape")?;
            crate::quant::QuantLayout::of_bytes(&shape, &scheme, buffer.len())?;
            let strides = contiguous_strides(&shape);
            return Ok(Self {
                buffer: Arc::new(buffer),
                offset: 0,
                shape,
                strides,
                dtype,
                read_as: None,
            });
        }
        let expected = element_count(&shape, "shape")?
            .checked_mul(dtype.size())
            .ok_or_else(|| {
                invalid(format!(
                    "shape {shape:?} of {dtype:?} has more bytes than fit in memory"
                ))
            })?;
        if expected != buffer.len() {
            return Err(OffloadError::DataSize {
                shape,
                dtype,
                expected,
                got: buffer.len(),
            });
        }
        let strides = contiguous_strides(&shape);
        Self::checked_view(Arc::new(buffer), 0, shape, strides, dtype)
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

    /// Element type of the memory (`QFloat(scheme)` for a quantized tensor).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype a read produces: [`dtype`](Self::dtype), or the float dtype a quantized
    /// tensor is dequantized to when it is read as float ([`read_as`](Self::read_as)).
    pub fn read_dtype(&self) -> DType {
        self.read_as.unwrap_or(self.dtype)
    }

    /// The quantization scheme, for a quantized tensor.
    pub fn quant_scheme(&self) -> Option<&burn_std::quantization::QuantScheme> {
        match &self.dtype {
            DType::QFloat(scheme) => Some(scheme),
            _ => None,
        }
    }

    /// Whether the memory holds quantized values.
    pub fn is_quantized(&self) -> bool {
        matches!(self.dtype, DType::QFloat(_))
    }

    /// This quantized tensor, read as `dtype` (dequantized by whatever reads it), or, with
    /// `None`, as the quantized tensor it is. `Err` for a tensor that is not quantized.
    pub fn read_as(&self, dtype: Option<DType>) -> Result<Self, OffloadError> {
        if !self.is_quantized() {
            return Err(invalid(format!(
                "only a quantized host tensor can be read as another dtype, not {:?}",
                self.dtype
            )));
        }
        Ok(Self {
            read_as: dtype,
            ..self.clone()
        })
    }

    /// The underlying buffer (shared by every view of it).
    pub fn buffer(&self) -> &Arc<HostBuffer> {
        &self.buffer
    }

    /// Number of elements in the view.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the view's elements in bytes (what an upload moves): for a quantized tensor,
    /// its packed values and scales.
    pub fn size_bytes(&self) -> usize {
        if self.is_quantized() {
            return self.buffer.len();
        }
        self.num_elements() * self.dtype.size()
    }

    /// Whether the view is the row-major contiguous layout of its shape (always, for a
    /// quantized tensor).
    pub fn is_contiguous(&self) -> bool {
        self.is_quantized()
            || self
                .shape
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
        if self.is_quantized() {
            return Some(self.buffer.as_slice());
        }
        let esize = self.dtype.size();
        let start = self.offset * esize;
        Some(&self.buffer.as_slice()[start..start + self.size_bytes()])
    }

    /// Reads the view into row-major [`TensorData`] (one copy from host memory). A quantized
    /// tensor gives its quantized data (what `q_from_data` takes), whatever it is read as.
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
        if self.is_quantized() {
            return None;
        }
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
        // The block covers exactly the elements of this (checked) view, so the check passes;
        // it still runs, like for every other view.
        let strides = contiguous_strides(&shape);
        let block = self.view(self.offset as i128, shape, strides).ok()?;
        Some((block, axes))
    }

    /// Reshape without copying: any reshape of a contiguous view, and inserting or removing
    /// size-1 dims of a strided one (e.g. `unsqueeze` of a transposed weight).
    ///
    /// - `Ok(Some(view))`: the reshaped view of the same buffer;
    /// - `Ok(None)`: the reshape is valid but this layout cannot express it as a view (e.g.
    ///   flattening a transposed view): copy the data instead (e.g. [`to_data`](Self::to_data));
    /// - `Err(`[`OffloadError::InvalidView`]`)`: `shape` does not have the view's number of
    ///   elements.
    pub fn reshape(&self, shape: Vec<usize>) -> Result<Option<Self>, OffloadError> {
        let count = element_count(&shape, "reshape target")?;
        if count != self.num_elements() {
            return Err(invalid(format!(
                "cannot reshape shape {:?} ({} elements) to {shape:?} ({count} elements); give a \
                 shape with the same number of elements",
                self.shape,
                self.num_elements()
            )));
        }
        if self.is_contiguous() {
            let strides = contiguous_strides(&shape);
            return self.view(self.offset as i128, shape, strides).map(Some);
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
                    _ => return Ok(None),
                }
            }
        }
        if kept_iter.next().is_some() {
            return Ok(None);
        }
        self.view(self.offset as i128, shape, strides).map(Some)
    }

    /// Reorders the dims: dim `i` of the result is dim `axes[i]` of this view
    /// (`swap_dims`/`transpose` are permutations too).
    ///
    /// `Err(`[`OffloadError::InvalidView`]`)` unless `axes` is a permutation of `0..rank`:
    /// one entry per dim, each below the rank, none repeated.
    pub fn permute(&self, axes: &[usize]) -> Result<Self, OffloadError> {
        let rank = self.shape.len();
        if axes.len() != rank {
            return Err(invalid(format!(
                "permute axes {axes:?} have {} entries for a view of rank {rank}; give one axis \
                 per dim, a permutation of 0..{rank}",
                axes.len()
            )));
        }
        let mut seen = vec![false; rank];
        for &a in axes {
            if a >= rank {
                return Err(invalid(format!(
                    "permute axis {a} in {axes:?} does not exist in a view of rank {rank}; give \
                     a permutation of 0..{rank}"
                )));
            }
            if std::mem::replace(&mut seen[a], true) {
                return Err(invalid(format!(
                    "permute axis {a} appears twice in {axes:?}; give a permutation of \
                     0..{rank}, each axis once"
                )));
            }
        }
        self.view(
            self.offset as i128,
            axes.iter().map(|&a| self.shape[a]).collect(),
            axes.iter().map(|&a| self.strides[a]).collect(),
        )
    }

    /// Swaps dims `a` and `b`; `Err(`[`OffloadError::InvalidView`]`)` when either does not
    /// exist.
    pub fn swap_dims(&self, a: usize, b: usize) -> Result<Self, OffloadError> {
        let rank = self.shape.len();
        if let Some(bad) = [a, b].into_iter().find(|&d| d >= rank) {
            return Err(invalid(format!(
                "swap_dims({a}, {b}): dim {bad} does not exist in a view of rank {rank}; give \
                 dims in 0..{rank}"
            )));
        }
        let mut axes: Vec<usize> = (0..rank).collect();
        axes.swap(a, b);
        self.permute(&axes)
    }

    /// A sub-range along each dim: `(range, step)` for the leading `ranges.len()` dims (the
    /// others are kept whole), ranges within the dims (`range.end <= dim`; `start >= end` is
    /// an empty range, as in Burn). A positive step takes `start, start + step, ..`; a negative
    /// one walks the range backwards from `end - 1` by `|step|`.
    ///
    /// `Err(`[`OffloadError::InvalidView`]`)` for more ranges than dims, a range past its
    /// dim, or a step of 0.
    pub fn slice(&self, ranges: &[(Range<usize>, isize)]) -> Result<Self, OffloadError> {
        let rank = self.shape.len();
        if ranges.len() > rank {
            return Err(invalid(format!(
                "{} slice ranges for a view of rank {rank}; give at most one (range, step) per dim",
                ranges.len()
            )));
        }
        let mut offset = self.offset as i128;
        let mut shape = self.shape.clone();
        let mut strides = self.strides.clone();
        for (d, (range, step)) in ranges.iter().enumerate() {
            let n = self.shape[d];
            if *step == 0 {
                return Err(invalid(format!(
                    "slice step 0 at dim {d}; give a non-zero step (negative walks backwards)"
                )));
            }
            if range.start > n || range.end > n {
                return Err(invalid(format!(
                    "slice range {range:?} at dim {d} exceeds the dim's size {n}; keep ranges \
                     within 0..{n}"
                )));
            }
            let len = range.end.saturating_sub(range.start);
            let count = len.div_ceil(step.unsigned_abs());
            if count > 0 {
                let first = if *step > 0 {
                    range.start
                } else {
                    range.end - 1
                };
                offset += first as i128 * self.strides[d] as i128;
            }
            shape[d] = count;
            strides[d] = self.strides[d].checked_mul(*step).ok_or_else(|| {
                invalid(format!(
                    "slice step {step} at dim {d} overflows the stride {}; use a smaller step",
                    self.strides[d]
                ))
            })?;
        }
        self.view(offset, shape, strides)
    }

    /// Broadcasts to `shape`: new leading dims and size-1 dims get stride 0. Every valid
    /// broadcast is a view (there is no "copy instead" case).
    ///
    /// `Err(`[`OffloadError::InvalidView`]`)` when `shape` has fewer dims than the view, or a
    /// dim of size other than 1 would change size.
    pub fn expand(&self, shape: Vec<usize>) -> Result<Self, OffloadError> {
        let rank = self.shape.len();
        if shape.len() < rank {
            return Err(invalid(format!(
                "cannot expand shape {:?} to {shape:?}, which has fewer dims; give at least \
                 {rank} dims",
                self.shape
            )));
        }
        let lead = shape.len() - rank;
        let mut strides = vec![0isize; shape.len()];
        for (i, &d) in shape.iter().enumerate().skip(lead) {
            let (sd, ss) = (self.shape[i - lead], self.strides[i - lead]);
            strides[i] = if sd == d {
                ss
            } else if sd == 1 {
                0
            } else {
                return Err(invalid(format!(
                    "cannot expand shape {:?} to {shape:?}: dim {} has size {sd}, not 1, and \
                     cannot become {d}; only size-1 dims broadcast",
                    self.shape,
                    i - lead
                )));
            };
        }
        self.view(self.offset as i128, shape, strides)
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
    read_as: Option<DType>,
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
            read_as: self.read_as,
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
            read_as: self.read_as,
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

    /// The reason of an `InvalidView` error (panics on anything else).
    fn reason<T: std::fmt::Debug>(result: Result<T, OffloadError>) -> String {
        match result {
            Err(OffloadError::InvalidView { reason }) => reason,
            other => panic!("expected InvalidView, got {other:?}"),
        }
    }

    #[test]
    fn allocations_are_exact_and_counted() {
        let before = host_memory_counters();
        let buf = HostBuffer::pageable(1000).unwrap();
        assert_eq!(buf.len(), 1000);
        let during = host_memory_counters();
        assert!(during.live_bytes >= before.live_bytes + 1000);
        drop(buf);
    }

    #[test]
    fn views_read_like_ndarray() {
        let t = iota(&[2, 3, 4]);
        assert_eq!(
            values(&t.swap_dims(0, 2).unwrap())[..4],
            [0.0, 12.0, 4.0, 16.0]
        );
        let s = t.slice(&[(0..2, 1), (1..3, 1), (0..4, 2)]).unwrap();
        assert_eq!(values(&s), [4.0, 6.0, 8.0, 10.0, 16.0, 18.0, 20.0, 22.0]);
        let r = t.slice(&[(0..1, 1), (0..1, 1), (0..4, -1)]).unwrap();
        assert_eq!(values(&r), [3.0, 2.0, 1.0, 0.0]);
        // Fewer ranges than dims keep the trailing dims whole.
        assert_eq!(
            values(&t.slice(&[(1..2, 1)]).unwrap()),
            values(&iota(&[2, 12]))[12..]
        );
        let e = iota(&[1, 3]).expand(vec![2, 2, 3]).unwrap();
        assert_eq!(values(&e), [0.0, 1.0, 2.0].repeat(4));
        // A valid reshape that no view expresses: `Ok(None)`, copy instead.
        assert!(
            t.swap_dims(0, 1)
                .unwrap()
                .reshape(vec![24])
                .unwrap()
                .is_none()
        );
        // Size-1 dims can be added to or removed from a strided view without copying.
        let tr = iota(&[3, 4]).swap_dims(0, 1).unwrap();
        let unsqueezed = tr.reshape(vec![1, 4, 1, 3]).unwrap().unwrap();
        assert_eq!(values(&unsqueezed), values(&tr));
        assert_eq!(
            values(&unsqueezed.reshape(vec![4, 3]).unwrap().unwrap()),
            values(&tr)
        );
        assert!(tr.reshape(vec![2, 6]).unwrap().is_none());
        assert_eq!(values(&t.reshape(vec![4, 6]).unwrap().unwrap()), values(&t));
    }

    /// Permuting the block by the returned axes gives the view's values, checked against
    /// ndarray-style reads of the view itself.
    #[test]
    fn permuted_blocks_rebuild_the_view() {
        let t = iota(&[2, 3, 4]);
        // Rows 1..4: a block at offset 4.
        let offset = iota(&[5, 4]).slice(&[(1..4, 1), (0..4, 1)]).unwrap();
        let cases = [
            t.permute(&[2, 0, 1]).unwrap(),
            t.swap_dims(0, 1).unwrap(),
            iota(&[3, 4])
                .swap_dims(0, 1)
                .unwrap()
                .reshape(vec![1, 4, 1, 3])
                .unwrap()
                .unwrap(),
            offset.swap_dims(0, 1).unwrap(),
        ];
        for view in &cases {
            let (block, axes) = view.permuted_block().expect("a permuted block");
            assert!(block.is_contiguous());
            assert_eq!(block.num_elements(), view.num_elements());
            let squeezed: Vec<usize> = view.dims().iter().copied().filter(|&d| d != 1).collect();
            let rebuilt = block.permute(&axes).unwrap();
            assert_eq!(rebuilt.dims(), squeezed.as_slice());
            assert_eq!(values(&rebuilt), values(view), "{view:?}");
        }
        // Gapped (a strided slice), reversed and broadcast views are not blocks.
        let gapped = t.slice(&[(0..2, 1), (0..3, 1), (0..4, 2)]).unwrap();
        assert!(gapped.permuted_block().is_none());
        let reversed = t.slice(&[(0..2, 1), (0..3, 1), (0..4, -1)]).unwrap();
        assert!(reversed.permuted_block().is_none());
        let broadcast = iota(&[1, 3]).expand(vec![2, 3]).unwrap();
        assert!(broadcast.permuted_block().is_none());
    }

    #[test]
    fn invalid_arguments_are_errors_that_say_what_to_change() {
        let t = iota(&[2, 3, 4]);
        // Slices: a range past its dim (start or end), a zero step, too many ranges.
        let r = reason(t.slice(&[(0..3, 1)]));
        assert!(
            r.contains("0..3") && r.contains("dim 0") && r.contains("0..2"),
            "{r}"
        );
        assert!(reason(t.slice(&[(0..2, 1), (4..4, 1)])).contains("dim 1"));
        assert!(reason(t.slice(&[(0..2, 1), (0..3, 0)])).contains("step 0"));
        assert!(reason(t.slice(&[(0..1, 1), (0..1, 1), (0..1, 1), (0..1, 1)])).contains("rank 3"));
        // Empty ranges (start >= end, as Burn allows) are fine and read nothing.
        let empty = t.slice(&[(1..1, 1)]).unwrap();
        assert_eq!(empty.dims(), [0, 3, 4]);
        assert!(values(&empty).is_empty());
        #[allow(clippy::reversed_empty_ranges)] // the point: start > end is an empty range
        let reversed = t.slice(&[(2..1, -1)]).unwrap();
        assert_eq!(reversed.dims(), [0, 3, 4]);
        // Permutations: a repeat, an axis out of range, the wrong length.
        assert!(reason(t.permute(&[0, 0, 1])).contains("twice"));
        assert!(reason(t.permute(&[0, 1, 3])).contains("axis 3"));
        assert!(reason(t.permute(&[1, 0])).contains("rank 3"));
        assert!(reason(t.permute(&[2, 1, 0, 3])).contains("rank 3"));
        // Dims that do not exist.
        assert!(reason(t.swap_dims(0, 3)).contains("dim 3"));
        assert!(reason(t.swap_dims(7, 1)).contains("dim 7"));
        // Reshapes to another element count (or one that overflows) are errors, not `None`.
        assert!(reason(t.reshape(vec![5, 5])).contains("same number of elements"));
        assert!(reason(t.reshape(vec![usize::MAX, 2])).contains("fit in memory"));
        let strided = t.swap_dims(0, 1).unwrap();
        assert!(reason(strided.reshape(vec![25])).contains("same number of elements"));
        // Expansions: fewer dims, a non-1 dim changing size.
        assert!(reason(t.expand(vec![3, 4])).contains("fewer dims"));
        assert!(reason(t.expand(vec![2, 2, 4])).contains("dim 1 has size 3"));
        // Nothing of the above changed the tensor.
        assert_eq!(values(&t), (0..24).map(|v| v as f32).collect::<Vec<_>>());
    }

    /// A view whose extent exceeds the buffer is rejected, whatever made it; negative, zero and
    /// huge strides and empty views included.
    #[test]
    fn the_extent_check_bounds_every_view() {
        let elements = 24; // f32
        let bytes = elements * 4;
        let ok = |offset: i128, shape: &[usize], strides: &[isize]| {
            check_layout(offset, shape, strides, 4, bytes)
        };
        // The whole buffer, forwards and backwards, and broadcast.
        assert_eq!(ok(0, &[2, 3, 4], &[12, 4, 1]), Ok(0));
        assert_eq!(ok(23, &[2, 3, 4], &[-12, -4, -1]), Ok(23));
        assert_eq!(ok(23, &[1000, 1000], &[0, 0]), Ok(23));
        assert_eq!(ok(11, &[2, 12], &[12, -1]), Ok(11));
        // One element past either end.
        assert!(ok(1, &[2, 3, 4], &[12, 4, 1]).is_err());
        assert!(ok(22, &[2, 3, 4], &[-12, -4, -1]).is_err());
        assert!(ok(24, &[1], &[1]).is_err());
        assert!(ok(-1, &[1], &[1]).is_err());
        assert!(ok(10, &[2, 12], &[12, -1]).is_err());
        // Empty views address nothing: any offset, stored as 0.
        assert_eq!(ok(1000, &[0, 3], &[-5, 99]), Ok(0));
        // Overflowing extents and element counts are errors, not wrapped arithmetic.
        assert!(ok(0, &[2, 2], &[isize::MAX, isize::MAX]).is_err());
        assert!(ok(0, &[usize::MAX, 2], &[0, 0]).is_err());
        assert!(ok(0, &[0, usize::MAX, 2], &[0, 0, 0]).is_err());
        // A partial element at the end of a buffer is not an element.
        assert!(check_layout(0, &[7], &[1], 4, 27).is_err());
        assert_eq!(check_layout(0, &[6], &[1], 4, 27), Ok(0));
        // Mismatched ranks.
        assert!(ok(0, &[2], &[1, 1]).is_err());
    }

    /// Chains of valid views stay inside the buffer, reversed and broadcast ones included; the
    /// extent of a view of a view is never larger than the buffer.
    #[test]
    fn chained_views_read_the_right_elements() {
        let t = iota(&[3, 4]);
        let v = t
            .slice(&[(0..3, -1), (1..4, 2)])
            .unwrap() // rows 2, 1, 0; cols 1, 3
            .swap_dims(0, 1)
            .unwrap()
            .expand(vec![2, 2, 3])
            .unwrap()
            .slice(&[(0..2, 1), (1..2, 1), (0..3, -2)])
            .unwrap();
        // Column 3, rows 0 and 2 (reversed again), broadcast twice.
        assert_eq!(values(&v), [3.0, 11.0, 3.0, 11.0]);
        assert_eq!(v.buffer().len(), 12 * 4);
    }

    #[test]
    fn new_rejects_shapes_whose_size_overflows() {
        let buffer = HostBuffer::pageable(0).unwrap();
        let r = reason(HostTensor::new(buffer, vec![1 << 62, 8], DType::F32));
        assert!(r.contains("fit in memory"), "{r}");
        let buffer = HostBuffer::pageable(0).unwrap();
        assert!(HostTensor::new(buffer, vec![0, usize::MAX, 2], DType::F32).is_err());
        let buffer = HostBuffer::pageable(8).unwrap();
        assert!(matches!(
            HostTensor::new(buffer, vec![3], DType::F32),
            Err(OffloadError::DataSize { .. })
        ));
    }

    #[test]
    fn strided_reads_are_bounded_by_their_furthest_byte() {
        let read = |offset, rows, cols, row_stride, elem_size| StridedRead {
            offset,
            rows,
            cols,
            row_stride,
            elem_size,
        };
        // A [4, 6] f32 weight read whole: 96 bytes, exactly.
        let whole = read(0, 4, 6, 6, 4);
        assert_eq!(whole.byte_span(), Ok(Some(0..96)));
        assert_eq!(whole.check(96), Ok(()));
        assert!(whole.check(95).unwrap_err().contains("bytes 0..96"));
        // Row stride > cols (a column slice) and an offset: the last row ends early.
        let cols = read(2, 4, 3, 6, 4); // elements 2 + 3*6 + 3 = 23
        assert_eq!(cols.byte_span(), Ok(Some(8..92)));
        assert!(cols.check(92).is_ok() && cols.check(91).is_err());
        // Transposed weight [K=5, N=2] stored [N, K] with ldw 7: rows = N, cols = K.
        assert_eq!(read(0, 2, 5, 7, 2).byte_span(), Ok(Some(0..24)));
        // Overlapping rows (stride 0) read one row.
        assert_eq!(read(1, 100, 3, 0, 8).byte_span(), Ok(Some(8..32)));
        // Nothing touched: no rows, no cols; then any offset is fine.
        assert_eq!(read(u64::MAX, 0, 3, 1, 4).byte_span(), Ok(None));
        assert_eq!(read(u64::MAX, 3, 0, 1, 4).check(0), Ok(()));
        // Overflow anywhere is an error, never a wrapped small number.
        assert!(read(0, u64::MAX, 1, 2, 1).byte_span().is_err());
        assert!(read(u64::MAX, 1, 1, 0, 1).byte_span().is_err());
        assert!(read(1 << 62, 1, 1, 0, 8).byte_span().is_err());
        assert!(read(0, 2, 1, 1 << 63, 1).check(1 << 40).is_err());
    }

    #[test]
    fn device_readers_are_recorded_and_drained_conservatively() {
        let buffer = HostBuffer::pageable(16).unwrap();
        assert!(buffer.readers().is_empty());
        buffer.note_reader(3);
        buffer.note_reader(0);
        buffer.note_reader(3);
        let readers = buffer.readers();
        assert!(readers.may_read(0) && readers.may_read(3) && !readers.may_read(1));
        // The allocating device first, then every other reader once, in order.
        assert_eq!(readers.drain_order(3, 8), [3, 0]);
        assert_eq!(readers.drain_order(1, 8), [1, 0, 3]);
        assert_eq!(DeviceReaders::none().drain_order(2, 8), [2]);
        // Ordinals from 63 up share a bit: one of them read, so all of them may have.
        let high = DeviceReaders::none().with(70);
        assert!(high.may_read(63) && high.may_read(64) && high.may_read(1000));
        assert!(!high.may_read(62));
        assert_eq!(
            high.drain_order(0, 72),
            [0, 63, 64, 65, 66, 67, 68, 69, 70, 71]
        );
        // An unknown device count (0) still drains the first shared ordinal.
        assert_eq!(high.drain_order(0, 0), [0, 63]);
        // The allocating device is not repeated, even among the shared ones.
        assert_eq!(high.with(62).drain_order(64, 66), [64, 62, 63, 65]);
        assert_eq!(DeviceReaders::none().with(5).drain_order(70, 72), [70, 5]);
    }

    #[test]
    fn the_release_is_told_the_readers() {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let seen_in_release = seen.clone();
        let mut memory = vec![0u8; 8];
        let ptr = NonNull::new(memory.as_mut_ptr()).unwrap();
        let release: HostRelease = Box::new(move |_, len, readers| {
            *seen_in_release.lock().unwrap() = Some((len, readers));
        });
        // SAFETY: `memory` outlives the buffer (dropped below, before `memory`), is not freed
        // by the release, and nothing else touches it meanwhile.
        let buffer = unsafe { HostBuffer::from_raw(ptr, 8, HostMemoryKind::Pageable, release) };
        buffer.note_reader(2);
        buffer.note_reader(65);
        drop(buffer);
        let expected = DeviceReaders::none().with(2).with(63);
        assert_eq!(*seen.lock().unwrap(), Some((8, expected)));
        drop(memory);
    }
}
