//! Views of offloaded tensors, checked as a property and at the API's edges.
//!
//! - **Random chains** (seeded, deterministic): reshape / transpose / swap_dims / permute /
//!   slice (steps of either sign) / expand / flip / narrow, applied step by step to a tensor
//!   offloaded by `OffloadBackend<NdArray>` and to the same tensor on plain `NdArray`. After
//!   every step the values must be identical, and where the step is a pure view the result must
//!   still be offloaded, share the original host buffer and have made no device copy.
//! - **The public `HostTensor` API** refuses arguments that do not fit (out-of-range slices,
//!   zero steps, axes that are not a permutation, dims that do not exist, wrong element counts)
//!   with `OffloadError::InvalidView`, without panicking and without touching the tensor; valid
//!   arguments read what Burn reads.

use std::sync::Arc;

use burn::backend::{NdArray, ndarray::NdArrayDevice};
use burn::tensor::backend::Backend;
use burn::tensor::{Shape, Slice, Tensor, TensorData};
use burn_offload::{
    HostBuffer, HostTensor, OffloadBackend, OffloadDevice, OffloadError, op_stats, reset_op_stats,
};

type Inner = NdArray<f32>;
type B = OffloadBackend<Inner>;

const CPU: NdArrayDevice = NdArrayDevice::Cpu;
/// Chains per run, and steps per chain.
const CHAINS: u64 = 300;
const STEPS: usize = 8;
/// Expansions stay below this many elements (keeps the run fast in debug builds).
const MAX_ELEMENTS: usize = 2048;

/// xorshift64*: a tiny deterministic PRNG (no dependency).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: isize, hi: isize) -> isize {
        lo + self.below((hi - lo + 1) as usize) as isize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A float tensor of rank 1 to 4, the rank known at run time.
enum Dyn<Bk: Backend> {
    R1(Tensor<Bk, 1>),
    R2(Tensor<Bk, 2>),
    R3(Tensor<Bk, 3>),
    R4(Tensor<Bk, 4>),
}

/// Applies `$body` (with the tensor bound to `$x`) in every rank, keeping the rank.
macro_rules! same_rank {
    ($t:expr, |$x:ident| $body:expr) => {
        match $t {
            Dyn::R1($x) => Dyn::R1($body),
            Dyn::R2($x) => Dyn::R2($body),
            Dyn::R3($x) => Dyn::R3($body),
            Dyn::R4($x) => Dyn::R4($body),
        }
    };
}

/// `$x.$method::<R, _>(shape)` for the rank `R` of `dims` (a `Shape`: Burn reads a 0 in an
/// array argument of `expand` as an error and of `reshape` as "keep this dim").
macro_rules! to_rank {
    ($x:expr, $method:ident, $dims:expr) => {{
        let shape = Shape::from($dims.to_vec());
        match $dims.len() {
            1 => Dyn::R1($x.$method::<1, _>(shape)),
            2 => Dyn::R2($x.$method::<2, _>(shape)),
            3 => Dyn::R3($x.$method::<3, _>(shape)),
            4 => Dyn::R4($x.$method::<4, _>(shape)),
            r => unreachable!("rank {r}"),
        }
    }};
}

fn arr<const N: usize>(values: &[usize]) -> [usize; N] {
    values.try_into().expect("length matches the rank")
}

/// One step of a chain, with its arguments drawn for the current dims.
#[derive(Debug, Clone)]
enum Op {
    Reshape(Vec<usize>),
    Transpose,
    SwapDims(usize, usize),
    Permute(Vec<usize>),
    /// `(start, end, step)` per dim, as Burn's `Slice` takes them.
    Slice(Vec<(isize, isize, isize)>),
    Expand(Vec<usize>),
    Flip(Vec<isize>),
    Narrow(usize, usize, usize),
}

impl<Bk: Backend> Dyn<Bk> {
    fn from_data(data: TensorData, device: &Bk::Device) -> Self {
        match data.shape.len() {
            1 => Dyn::R1(Tensor::from_data(data, device)),
            2 => Dyn::R2(Tensor::from_data(data, device)),
            3 => Dyn::R3(Tensor::from_data(data, device)),
            4 => Dyn::R4(Tensor::from_data(data, device)),
            r => unreachable!("rank {r}"),
        }
    }

    fn dims(&self) -> Vec<usize> {
        match self {
            Dyn::R1(x) => x.dims().to_vec(),
            Dyn::R2(x) => x.dims().to_vec(),
            Dyn::R3(x) => x.dims().to_vec(),
            Dyn::R4(x) => x.dims().to_vec(),
        }
    }

    fn to_data(&self) -> TensorData {
        match self {
            Dyn::R1(x) => x.to_data(),
            Dyn::R2(x) => x.to_data(),
            Dyn::R3(x) => x.to_data(),
            Dyn::R4(x) => x.to_data(),
        }
    }

    fn apply(self, op: &Op) -> Self {
        match op {
            Op::Reshape(dims) => match self {
                Dyn::R1(x) => to_rank!(x, reshape, dims),
                Dyn::R2(x) => to_rank!(x, reshape, dims),
                Dyn::R3(x) => to_rank!(x, reshape, dims),
                Dyn::R4(x) => to_rank!(x, reshape, dims),
            },
            Op::Expand(dims) => match self {
                Dyn::R1(x) => to_rank!(x, expand, dims),
                Dyn::R2(x) => to_rank!(x, expand, dims),
                Dyn::R3(x) => to_rank!(x, expand, dims),
                Dyn::R4(x) => to_rank!(x, expand, dims),
            },
            Op::Transpose => same_rank!(self, |x| x.transpose()),
            Op::SwapDims(a, b) => same_rank!(self, |x| x.swap_dims(*a, *b)),
            Op::Permute(axes) => same_rank!(self, |x| x.permute(arr(axes))),
            Op::Slice(slices) => {
                let slices: Vec<Slice> = slices
                    .iter()
                    .map(|&(start, end, step)| Slice::new(start, Some(end), step))
                    .collect();
                same_rank!(self, |x| x.slice(&slices))
            }
            Op::Flip(axes) => match axes.as_slice() {
                &[a] => same_rank!(self, |x| x.flip([a])),
                &[a, b] => same_rank!(self, |x| x.flip([a, b])),
                other => unreachable!("flip of {other:?}"),
            },
            Op::Narrow(dim, start, len) => same_rank!(self, |x| x.narrow(*dim, *start, *len)),
        }
    }
}

impl Dyn<B> {
    /// The host view of an offloaded tensor; `None` for a resident one.
    fn host(&self) -> Option<HostTensor> {
        fn of<const D: usize>(x: &Tensor<B, D>) -> Option<HostTensor> {
            x.clone().into_primitive().tensor().host().cloned()
        }
        match self {
            Dyn::R1(x) => of(x),
            Dyn::R2(x) => of(x),
            Dyn::R3(x) => of(x),
            Dyn::R4(x) => of(x),
        }
    }
}

/// `n`'s prime factors, smallest first.
fn factors(mut n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut p = 2;
    while p * p <= n {
        while n.is_multiple_of(p) {
            out.push(p);
            n /= p;
        }
        p += 1;
    }
    if n > 1 {
        out.push(n);
    }
    out
}

/// Dims of rank `rank` whose product is `n` (`n > 0`).
fn random_factorisation(rng: &mut Rng, n: usize, rank: usize) -> Vec<usize> {
    let mut dims = vec![1; rank];
    for f in factors(n) {
        dims[rng.below(rank)] *= f;
    }
    dims
}

/// A step that fits `dims`.
fn random_op(rng: &mut Rng, dims: &[usize]) -> Op {
    let rank = dims.len();
    let n: usize = dims.iter().product();
    loop {
        match rng.below(9) {
            0 if n > 0 => {
                let rank = rng.below(4) + 1;
                return Op::Reshape(random_factorisation(rng, n, rank));
            }
            // Adding or removing size-1 dims only: a view even of a strided tensor. (Not of an
            // empty one: Burn's reshape reads a 0 in the target as "keep the dim at this index".)
            1 if n > 0 => {
                let mut new: Vec<usize> = dims.iter().copied().filter(|&d| d != 1).collect();
                while new.len() < 4 && rng.chance(50) {
                    new.insert(rng.below(new.len() + 1), 1);
                }
                if !new.is_empty() {
                    return Op::Reshape(new);
                }
            }
            2 if rank >= 2 => return Op::Transpose,
            3 => return Op::SwapDims(rng.below(rank), rng.below(rank)),
            4 => {
                let mut axes: Vec<usize> = (0..rank).collect();
                rng.shuffle(&mut axes);
                return Op::Permute(axes);
            }
            5 | 6 => {
                let slices = dims
                    .iter()
                    .map(|&d| {
                        let d = d as isize;
                        let size = if rng.chance(60) { 1 } else { rng.range(2, 3) };
                        let step = size * if rng.chance(40) { -1 } else { 1 };
                        if d == 0 || rng.chance(40) {
                            return (0, d, step);
                        }
                        // Mostly non-empty ranges, some empty ones; now and then written with
                        // negative (from the end) indices, as Burn allows.
                        let start = rng.range(0, d - 1);
                        let end = if rng.chance(5) {
                            start
                        } else {
                            rng.range(start + 1, d)
                        };
                        if rng.chance(20) {
                            (start - d, if end == d { d } else { end - d }, step)
                        } else {
                            (start, end, step)
                        }
                    })
                    .collect();
                return Op::Slice(slices);
            }
            7 => {
                let mut new: Vec<usize> = dims
                    .iter()
                    .map(|&d| {
                        if d == 1 && rng.chance(60) {
                            rng.below(3) + 2
                        } else {
                            d
                        }
                    })
                    .collect();
                while new.len() < 4 && rng.chance(40) {
                    new.insert(0, rng.below(3) + 1);
                }
                if new.iter().product::<usize>() <= MAX_ELEMENTS {
                    return Op::Expand(new);
                }
            }
            8 => {
                let a = rng.below(rank);
                let axis = |a: usize, rng: &mut Rng| {
                    // Burn takes negative axes from the end.
                    if rng.chance(30) {
                        a as isize - rank as isize
                    } else {
                        a as isize
                    }
                };
                let first = axis(a, rng);
                if rank >= 2 && rng.chance(50) {
                    let b = (a + 1 + rng.below(rank - 1)) % rank;
                    return Op::Flip(vec![first, axis(b, rng)]);
                }
                return Op::Flip(vec![first]);
            }
            _ => {
                let dim = rng.below(rank);
                if dims[dim] > 0 {
                    let start = rng.below(dims[dim]);
                    let len = 1 + rng.below(dims[dim] - start);
                    return Op::Narrow(dim, start, len);
                }
            }
        }
    }
}

/// Whether `host` is the row-major contiguous layout of its dims (size-1 dims ignored).
fn row_major(host: &HostTensor) -> bool {
    let mut expected = 1isize;
    for (&d, &s) in host.dims().iter().zip(host.strides()).rev() {
        if d > 1 && s != expected {
            return false;
        }
        expected *= d.max(1) as isize;
    }
    true
}

/// Whether `op` on an offloaded tensor with view `host` should give a view (no copy): every
/// op but a reshape that changes more than size-1 dims of a non-contiguous view.
fn is_view(op: &Op, host: &HostTensor) -> bool {
    match op {
        Op::Reshape(new) => {
            let squeezed = |dims: &[usize]| -> Vec<usize> {
                dims.iter().copied().filter(|&d| d != 1).collect()
            };
            row_major(host) || squeezed(host.dims()) == squeezed(new)
        }
        _ => true,
    }
}

/// Runs one chain; returns how many steps were checked as offloaded views.
fn run_chain(seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let rank = rng.below(4) + 1;
    let dims: Vec<usize> = (0..rank)
        .map(|_| if rng.chance(15) { 1 } else { rng.below(4) + 2 })
        .collect();
    let n: usize = dims.iter().product();
    // Distinct values: any misplaced element shows.
    let data = TensorData::new((0..n).map(|v| v as f32 - 7.0).collect::<Vec<_>>(), dims);
    let host_device = OffloadDevice::host(CPU);
    let mut reference = Dyn::<Inner>::from_data(data.clone(), &CPU);
    let mut offloaded = Dyn::<B>::from_data(data, &host_device);
    let mut root = offloaded
        .host()
        .expect("created on Host(cpu)")
        .buffer()
        .clone();
    let mut history: Vec<String> = Vec::new();
    let mut views = 0;
    for _ in 0..STEPS {
        // A copy ended the views: offload the result again and go on from there.
        if offloaded.host().is_none() {
            // (Burn's `to_device` keeps placement: the values are created on `Host(cpu)`.)
            offloaded = Dyn::from_data(offloaded.to_data(), &host_device);
            root = offloaded
                .host()
                .expect("moved to Host(cpu)")
                .buffer()
                .clone();
            history.push("(offloaded again)".into());
        }
        let op = random_op(&mut rng, &reference.dims());
        let before = offloaded.host().expect("offloaded above");
        let expect_view = is_view(&op, &before);
        history.push(format!("{op:?}"));
        let ctx = || format!("seed {seed}, steps {history:?}");
        reset_op_stats();
        offloaded = offloaded.apply(&op);
        let stats = op_stats();
        reference = reference.apply(&op);
        assert_eq!(offloaded.dims(), reference.dims(), "{}", ctx());
        let (got, expected) = (offloaded.to_data(), reference.to_data());
        assert_eq!(got, expected, "{}", ctx());
        let after = offloaded.host();
        if reference.dims().contains(&0) {
            // An empty result holds nothing, wherever it is: a view of an empty offloaded
            // tensor stays one, and Burn makes an empty slice with `empty` on the tensor's
            // device, the compute device (a resident tensor, offloaded again next step).
            if let Some(after) = after {
                root = after.buffer().clone();
            }
        } else if expect_view {
            let after = after.unwrap_or_else(|| panic!("a view became resident: {}", ctx()));
            assert!(
                Arc::ptr_eq(after.buffer(), &root),
                "a view copied host memory: {}",
                ctx()
            );
            assert_eq!(stats.transient_uploads, 0, "a view made a copy: {}", ctx());
            views += 1;
        } else {
            assert!(after.is_none(), "expected a device copy: {}", ctx());
        }
    }
    views
}

#[test]
fn random_view_chains_read_like_ndarray_and_stay_offloaded() {
    let mut views = 0;
    for chain in 0..CHAINS {
        views += run_chain(0xB0FF_0000 + chain);
    }
    // The property is checked on views, not vacuously on copies.
    assert!(
        views > CHAINS as usize * STEPS / 2,
        "only {views} view steps in {CHAINS} chains"
    );
}

// ---------------------------------------------------------------------------------------------
// The public HostTensor API at its edges
// ---------------------------------------------------------------------------------------------

fn iota(dims: &[usize]) -> (HostTensor, Tensor<Inner, 3>) {
    let n: usize = dims.iter().product();
    let data = TensorData::new((0..n).map(|v| v as f32).collect::<Vec<_>>(), dims.to_vec());
    let host = HostTensor::from_data(&data, HostBuffer::pageable).expect("host memory");
    (host, Tensor::from_data(data, &CPU))
}

fn invalid_view<T: std::fmt::Debug>(result: Result<T, OffloadError>) -> String {
    match result {
        Err(e @ OffloadError::InvalidView { .. }) => {
            let message = e.to_string();
            assert!(
                message.starts_with("invalid host tensor view: "),
                "{message}"
            );
            message
        }
        other => panic!("expected InvalidView, got {other:?}"),
    }
}

#[test]
fn out_of_range_slices_and_zero_steps_are_errors() {
    let (t, _) = iota(&[2, 3, 4]);
    // A view of the last rows, so that a range past it would run past the buffer.
    let tail = t.slice(&[(1..2, 1), (1..3, 1)]).unwrap();
    assert_eq!(tail.dims(), [1, 2, 4]);
    for (ranges, what) in [
        (vec![(0..2, 1), (0..3, 1)], "dim 0"),
        (vec![(0..1, 1), (1..3, 1)], "dim 1"),
        (vec![(0..1, 1), (0..2, 1), (0..5, 1)], "dim 2"),
        (vec![(0..1, 1), (0..2, 1), (5..5, -1)], "dim 2"),
        (vec![(0..1, 1), (0..2, 0)], "step 0"),
        (vec![(0..1, 1), (0..2, 1), (0..4, 1), (0..1, 1)], "rank 3"),
    ] {
        let message = invalid_view(tail.slice(&ranges));
        assert!(message.contains(what), "{ranges:?}: {message}");
    }
    // The same ranges on a fresh tensor: a zero step is refused whatever the range.
    assert!(invalid_view(t.slice(&[(0..0, 0)])).contains("non-zero step"));
    // `tail` is untouched and still reads rows 1 of [2, 3, 4], cols 1..3.
    let values = tail.to_data().to_vec::<f32>().unwrap();
    assert_eq!(values, (16..24).map(|v| v as f32).collect::<Vec<_>>());
}

#[test]
fn bad_permutations_and_dims_are_errors() {
    let (t, _) = iota(&[2, 3, 4]);
    let reversed = t.slice(&[(0..2, -1)]).unwrap(); // a negative stride in the mix
    for view in [&t, &reversed] {
        assert!(invalid_view(view.permute(&[0, 1, 1])).contains("twice"));
        assert!(invalid_view(view.permute(&[0, 1, 3])).contains("axis 3"));
        assert!(invalid_view(view.permute(&[usize::MAX, 0, 1])).contains("does not exist"));
        assert!(invalid_view(view.permute(&[0, 1])).contains("rank 3"));
        assert!(invalid_view(view.permute(&[])).contains("rank 3"));
        assert!(invalid_view(view.permute(&[0, 1, 2, 3])).contains("rank 3"));
        assert!(invalid_view(view.swap_dims(0, 3)).contains("dim 3"));
        assert!(invalid_view(view.swap_dims(usize::MAX, 0)).contains("does not exist"));
        assert!(invalid_view(view.reshape(vec![7])).contains("same number of elements"));
        assert!(invalid_view(view.reshape(vec![1 << 40, 1 << 40])).contains("fit in memory"));
        assert!(invalid_view(view.expand(vec![3, 4])).contains("fewer dims"));
        assert!(invalid_view(view.expand(vec![4, 3, 4])).contains("dim 0 has size 2"));
    }
    // A valid reshape that is no view of a strided tensor is `Ok(None)`, not an error.
    assert!(
        t.swap_dims(0, 2)
            .unwrap()
            .reshape(vec![24])
            .unwrap()
            .is_none()
    );
}

/// Random (range, step) arguments, valid or not, on random views: valid ones read what Burn's
/// `slice` reads, invalid ones are errors; nothing panics.
#[test]
fn random_slice_arguments_are_views_or_errors() {
    let mut rng = Rng::new(0x5EED);
    let (t, reference) = iota(&[3, 4, 5]);
    let bases = [
        (t.clone(), reference.clone()),
        (
            t.swap_dims(0, 2).unwrap(),
            reference.clone().swap_dims(0, 2),
        ),
        (
            t.slice(&[(0..3, -1), (1..4, 2)]).unwrap(),
            reference.clone().slice([
                Slice::new(0, Some(3), -1),
                Slice::new(1, Some(4), 2),
                Slice::full(),
            ]),
        ),
    ];
    for _ in 0..2000 {
        let (base, reference) = &bases[rng.below(bases.len())];
        let dims = base.dims().to_vec();
        let mut valid = true;
        let ranges: Vec<(std::ops::Range<usize>, isize)> = dims
            .iter()
            .map(|&d| {
                let start = rng.below(d + 3);
                let end = rng.below(d + 3);
                let step = rng.range(-3, 3);
                valid &= start <= d && end <= d && step != 0;
                (start..end, step)
            })
            .collect();
        match base.slice(&ranges) {
            Ok(view) => {
                assert!(valid, "{ranges:?} on {dims:?} was accepted");
                let slices: Vec<Slice> = ranges
                    .iter()
                    .map(|(r, step)| Slice::new(r.start as isize, Some(r.end as isize), *step))
                    .collect();
                let expected = reference.clone().slice(&slices);
                assert_eq!(view.dims(), expected.dims(), "{ranges:?}");
                view.to_data().assert_eq(&expected.to_data(), true);
            }
            Err(e) => {
                assert!(!valid, "{ranges:?} on {dims:?} was refused: {e}");
                invalid_view::<HostTensor>(Err(e));
            }
        }
    }
}
