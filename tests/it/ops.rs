//! Op equivalence: every float op family gives the same result whether its inputs are resident
//! or offloaded, in every mode.
//!
//! [`equiv!`] writes an op once and runs it on a plain `NdArray` reference and on
//! `OffloadBackend<NdArray>` with every resident/offloaded combination of its float inputs,
//! under `Copy`, `Uva`, `Auto` and `Prefetch`. A [`Rule`] says what each run must also do:
//! - **exact** results (identical bytes), except where the zero-copy kernel ran (`matmul`/`linear`
//!   with a resident lhs and an offloaded rhs): relative tolerance 1e-5;
//! - the zero-copy path is taken exactly where the rule expects it (never in `Copy` mode, and
//!   in `Prefetch` mode only for `embedding`);
//! - views of offloaded tensors stay offloaded and make no transient copy.

use crate::common;

use burn::backend::{Autodiff, NdArray, ndarray::NdArrayDevice};
use burn::tensor::activation::{gelu, log_softmax, relu, sigmoid, silu, softmax};
use burn::tensor::module::{conv1d, conv2d, embedding, linear};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{
    DType, FloatDType, IndexingUpdateOp, IntDType, Tensor, TensorData, Tolerance, s,
};
use burn_offload::{
    OffloadBackend, OffloadContext, OffloadDevice, OffloadMode, OpStats, op_stats, reset_op_stats,
};
use common::{Dev, data};

type Inner = NdArray<f32>;
type B = OffloadBackend<Inner>;
type Device = OffloadDevice<NdArrayDevice>;

const CPU: NdArrayDevice = NdArrayDevice::Cpu;
/// Rows up to which the CPU target's zero-copy matmul runs (`CPU_ZERO_COPY_MAX_ROWS`).
const MAX_ROWS: usize = burn_offload::inner::ndarray::CPU_ZERO_COPY_MAX_ROWS;

fn resident() -> Device {
    OffloadDevice::device(CPU)
}

fn host() -> Device {
    OffloadDevice::host(CPU)
}

/// Runs `f` once per mode, inside a context of that mode: the tensors it creates on `host()`
/// belong to it (each test has its own contexts, so tests run in parallel).
fn for_each_mode(f: impl Fn(OffloadMode)) {
    let prefetch = OffloadMode::prefetch(1 << 20);
    for mode in [
        OffloadMode::Copy,
        OffloadMode::Uva,
        OffloadMode::Auto,
        prefetch,
    ] {
        OffloadContext::with_mode(mode).run(|| f(mode));
    }
}

/// Whether `mode` multiplies by an offloaded weight through a device copy (never in place).
fn copies_matmul_weights(mode: OffloadMode) -> bool {
    matches!(mode, OffloadMode::Copy | OffloadMode::Prefetch { .. })
}

/// Values from {-1, -0.5, 0, 0.5, 1}: ties for comparisons, rounding and sorting.
fn coarse(shape: &[usize], seed: u64) -> TensorData {
    let values = data(shape, seed).to_vec::<f32>().unwrap();
    let values: Vec<f32> = values.iter().map(|v| (v * 1.25).round() / 2.0).collect();
    TensorData::new(values, shape.to_vec())
}

fn f64_data(shape: &[usize], seed: u64) -> TensorData {
    data(shape, seed).convert_dtype(DType::F64)
}

/// `data` as a float tensor of `B`, offloaded or resident, keeping its dtype.
fn place<const N: usize>(data: &TensorData, offloaded: bool) -> Tensor<B, N> {
    let device = if offloaded { host() } else { resident() };
    let tensor = Tensor::<B, N>::from_data(data.clone(), (&device, data.dtype));
    assert_eq!(common::on_host(&tensor), offloaded);
    tensor
}

/// What a run must do besides computing the reference result; `p[i]`: input `i` offloaded.
struct Rule {
    /// Whether the zero-copy kernel reads an input in place (in `Uva`/`Auto` mode).
    zero_copy: fn(&[bool]) -> bool,
    /// Whether it does in `Prefetch` mode too (an `embedding` gathers its rows in place
    /// rather than copying the whole table).
    in_place_when_prefetching: bool,
    /// Whether the result must be offloaded (a view).
    host_out: fn(&[bool]) -> bool,
    /// Whether the zero-copy kernel may round differently (it sums in its own order).
    approx: bool,
}

fn never(_: &[bool]) -> bool {
    false
}

fn first(p: &[bool]) -> bool {
    p[0]
}

fn rhs_only(p: &[bool]) -> bool {
    !p[0] && p[1]
}

const fn rule(zero_copy: fn(&[bool]) -> bool, host_out: fn(&[bool]) -> bool, approx: bool) -> Rule {
    Rule {
        zero_copy,
        host_out,
        approx,
        in_place_when_prefetching: false,
    }
}

/// Computes on the device: transient copies of offloaded inputs, no zero-copy kernel.
const DEVICE: Rule = rule(never, never, false);
/// A metadata op: offloaded in, offloaded view out, nothing copied.
const VIEW: Rule = rule(never, first, false);
/// `matmul`/`linear` with a resident lhs and an offloaded rhs: read in place.
const MATMUL_RHS: Rule = rule(rhs_only, never, true);
/// `embedding` with an offloaded table: rows gathered in place (an exact copy of rows).
const EMBEDDING: Rule = Rule {
    in_place_when_prefetching: true,
    ..rule(first, never, false)
};

/// One run of an op body on `B`.
struct Case<'a> {
    op: &'a str,
    mode: OffloadMode,
    rule: &'a Rule,
    inputs: &'a [&'a str],
    placement: &'a [bool],
}

fn check(case: &Case, on_host: bool, stats: OpStats, got: &TensorData, expected: &TensorData) {
    let p = case.placement;
    let offloaded: Vec<_> = case.inputs.iter().zip(p).filter(|(_, o)| **o).collect();
    let ctx = format!(
        "`{}` in {} mode, offloaded inputs {:?}",
        case.op,
        case.mode,
        offloaded.iter().map(|(name, _)| name).collect::<Vec<_>>()
    );
    let zero_copy = match case.mode {
        OffloadMode::Copy => false,
        OffloadMode::Prefetch { .. } => {
            case.rule.in_place_when_prefetching && (case.rule.zero_copy)(p)
        }
        OffloadMode::Uva | OffloadMode::Auto => (case.rule.zero_copy)(p),
    };
    assert_eq!(
        stats.zero_copy_ops > 0,
        zero_copy,
        "{ctx}: zero-copy path taken? {stats:?}"
    );
    if !zero_copy {
        assert_eq!(
            stats.zero_copy_bytes, 0,
            "{ctx}: nothing read in place: {stats:?}"
        );
    }
    let host_out = (case.rule.host_out)(p);
    assert_eq!(on_host, host_out, "{ctx}: is the result offloaded?");
    // Every offloaded input is either viewed, read in place (one input), or copied.
    let uploads = !host_out && offloaded.len() > usize::from(zero_copy);
    assert_eq!(
        stats.transient_uploads > 0,
        uploads,
        "{ctx}: transient copies? {stats:?}"
    );
    assert_eq!(got.dtype, expected.dtype, "{ctx}: dtype");
    assert_eq!(got.shape, expected.shape, "{ctx}: shape");
    if zero_copy && case.rule.approx {
        if got.as_bytes() != expected.as_bytes() {
            eprintln!("{ctx}: in-place result, compared with a tolerance");
        }
        approx(got, expected);
    } else if got.as_bytes() != expected.as_bytes() {
        eprintln!("{ctx}: results differ");
        got.assert_eq(expected, true);
        panic!("{ctx}: results differ bitwise (signed zeros or NaN payloads)");
    }
}

fn approx(got: &TensorData, expected: &TensorData) {
    match expected.dtype {
        DType::F64 => got.assert_approx_eq::<f64>(expected, Tolerance::rel_abs(1e-5, 1e-5)),
        _ => got.assert_approx_eq::<f32>(expected, Tolerance::rel_abs(1e-5, 1e-5)),
    }
}

/// `equiv!(mode, RULE, [x: RANK = data, ...], |dev| { body, ... })` runs each body on the
/// plain `NdArray` reference and on `B` with every resident/offloaded combination of the
/// float inputs, and [`check`]s each run. `dev.int(..)`/`dev.bool(..)` make other inputs.
macro_rules! equiv {
    (@one $mode:expr, $rule:expr, [$($x:ident : $n:literal = $data:expr),+ $(,)?], |$dev:ident| $body:expr) => {{
        $(let $x: TensorData = $data;)+
        let expected = {
            let $dev = &Dev::<Inner>(CPU);
            let _ = $dev;
            $(let $x = Tensor::<Inner, $n>::from_data($x.clone(), (&CPU, $x.dtype));)+
            $body.into_data()
        };
        let inputs = [$(stringify!($x)),+];
        for mask in 0..1usize << inputs.len() {
            let placement: Vec<bool> = (0..inputs.len()).map(|i| (mask >> i) & 1 == 1).collect();
            let mut next = placement.iter().copied();
            let $dev = &Dev::<B>(resident());
            let _ = $dev;
            $(let $x = place::<$n>(&$x, next.next().unwrap());)+
            reset_op_stats();
            let out = $body;
            let stats = op_stats();
            let case = Case {
                op: stringify!($body),
                mode: $mode,
                rule: &$rule,
                inputs: &inputs,
                placement: &placement,
            };
            check(&case, common::on_host(&out), stats, &out.into_data(), &expected);
        }
    }};
    ($mode:expr, $rule:expr, $inputs:tt, |$dev:ident| { $($body:expr),+ $(,)? }) => {
        $(equiv!(@one $mode, $rule, $inputs, |$dev| $body);)+
    };
}

#[test]
fn unary_elementwise() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [x: 2 = data(&[3, 5], 1)], |dev| {
            x.exp(),
            (x.abs() + 0.1).log(),
            x.abs().log1p(),
            x.abs().sqrt(),
            x.abs(),
            x.abs().powf_scalar(1.7),
            x.powi_scalar(3),
            x.clamp(-0.5, 0.75),
            x.clamp_min(0.25),
            x.neg(),
            -x,
            x.recip(),
            x.erf(),
            x.tanh(),
            x.sin(),
            x.cos(),
            x.add_scalar(1.5),
            x.sub_scalar(0.25),
            x.mul_scalar(-3.0),
            x.div_scalar(7.0),
            x.remainder_scalar(0.7),
            x * 2.0 + 1.0,
        });
        equiv!(mode, DEVICE, [x: 2 = coarse(&[4, 5], 2)], |dev| {
            x.sign(),
            x.round(),
            x.floor(),
            x.ceil(),
            x.trunc(),
        });
    });
}

#[test]
fn binary_elementwise() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [a: 2 = data(&[3, 5], 3), b: 2 = data(&[3, 5], 4)], |dev| {
            a + b,
            a - b,
            a * b,
            a / (b.abs() + 0.5),
            a.abs().powf(b),
            a.max_pair(b),
            a.min_pair(b),
            (a.clone() * b).sub(a),
        });
        // Broadcast operands, offloaded or not, in either position.
        equiv!(mode, DEVICE, [a: 2 = data(&[3, 5], 5), b: 2 = data(&[1, 5], 6)], |dev| {
            a + b,
            b.clone() - a.clone() * b,
            b / (a.abs() + 1.0),
        });
    });
}

#[test]
fn reductions() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [x: 2 = data(&[4, 6], 7)], |dev| {
            x.sum(),
            x.mean(),
            x.max(),
            x.min(),
            x.prod(),
            x.sum_dim(0),
            x.mean_dim(1),
            x.prod_dim(1),
            x.max_dim(1),
            x.min_dim(0),
            x.argmax(1),
            x.argmin(0),
            x.max_dim_with_indices(1).1,
            x.cumsum(1),
            x.cumprod(0),
            x.var(1),
            x.sort(1),
            x.argsort(0),
            x.topk(2, 1),
            x.transpose().sum_dim(1),
        });
    });
}

#[test]
fn matmul_offloaded_rhs_by_rows() {
    for_each_mode(|mode| {
        for m in [1, 7, MAX_ROWS, 33] {
            // Above the row threshold the copy + GEMM path runs even in Uva mode.
            let rule = if m <= MAX_ROWS { MATMUL_RHS } else { DEVICE };
            equiv!(mode, rule, [x: 2 = data(&[m, 24], 8), w: 2 = data(&[24, 10], 9)], |dev| {
                x.matmul(w),
            });
        }
    });
}

#[test]
fn matmul_transposed_strided_and_batched_rhs() {
    for_each_mode(|mode| {
        // A tied LM head: the embedding table [vocab, d], transposed as a view.
        equiv!(mode, MATMUL_RHS, [x: 2 = data(&[3, 16], 10), w: 2 = data(&[12, 16], 11)], |dev| {
            x.matmul(w.transpose()),
        });
        // A strided (every other column) view: neither rows nor columns contiguous.
        equiv!(mode, MATMUL_RHS, [x: 2 = data(&[5, 8], 12), w: 2 = data(&[8, 12], 13)], |dev| {
            x.matmul(w.slice(s![.., ..;2])),
            x.slice([0..5, 1..7]).matmul(w.slice(s![1..7, ..;-3])),
            x.matmul(w.flip([0])),
        });
        // A broadcast rhs batch reads in place; a real rhs batch goes through the copy.
        equiv!(mode, MATMUL_RHS, [x: 3 = data(&[2, 3, 8], 14), w: 3 = data(&[1, 8, 6], 15)], |dev| {
            x.matmul(w),
        });
        equiv!(mode, DEVICE, [x: 3 = data(&[2, 3, 8], 16), w: 3 = data(&[2, 8, 6], 17)], |dev| {
            x.matmul(w),
        });
        equiv!(mode, MATMUL_RHS, [x: 2 = f64_data(&[4, 8], 18), w: 2 = f64_data(&[8, 6], 19)], |dev| {
            x.matmul(w),
        });
    });
}

#[test]
fn linear_with_offloaded_weight_and_bias() {
    for_each_mode(|mode| {
        let [w, b] = [data(&[8, 5], 20), data(&[5], 21)];
        equiv!(mode, MATMUL_RHS, [x: 3 = data(&[2, 3, 8], 22), w: 2 = w.clone(), b: 1 = b.clone()], |dev| {
            linear(x, w, Some(b)),
        });
        equiv!(mode, MATMUL_RHS, [x: 2 = data(&[4, 8], 23), w: 2 = w.clone()], |dev| {
            linear(x, w, None),
            linear(x.slice(1..2).squeeze_dim::<1>(0), w, None).unsqueeze::<2>(),
        });
        equiv!(mode, DEVICE, [x: 3 = data(&[3, 7, 8], 24), w: 2 = w.clone(), b: 1 = b.clone()], |dev| {
            linear(x, w, Some(b)),
        });
    });
}

#[test]
fn embedding_with_offloaded_table() {
    for_each_mode(|mode| {
        equiv!(mode, EMBEDDING, [w: 2 = data(&[10, 4], 25)], |dev| {
            embedding(w, dev.int([[1, 3, 9], [0, 0, 5]])),
            // Transposed storage: a strided row gather.
            embedding(w.transpose(), dev.int([[2, 1], [3, 0]])),
            // Reversed rows and columns: negative strides.
            embedding(w.flip([0, 1]), dev.int([[9, 0, 4]])),
        });
    });
}

#[test]
fn convolutions_with_offloaded_weights() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [x: 3 = data(&[2, 3, 9], 26), w: 3 = data(&[4, 3, 3], 27), b: 1 = data(&[4], 28)], |dev| {
            conv1d(x, w, Some(b), ConvOptions::new([2], [1], [1], 1)),
        });
        equiv!(mode, DEVICE, [x: 4 = data(&[1, 2, 5, 6], 29), w: 4 = data(&[3, 2, 3, 3], 30), b: 1 = data(&[3], 31)], |dev| {
            conv2d(x, w, Some(b), ConvOptions::new([1, 2], [1, 1], [1, 1], 1)),
        });
    });
}

#[test]
fn cat_stack_and_indexing() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [a: 2 = data(&[2, 3], 32), b: 2 = data(&[4, 3], 33)], |dev| {
            Tensor::cat(vec![a, b], 0),
            Tensor::cat(vec![b.clone(), a.transpose().reshape([2, 3]), b], 0),
        });
        equiv!(mode, DEVICE, [a: 2 = data(&[2, 3], 34), b: 2 = data(&[2, 3], 35)], |dev| {
            Tensor::stack::<3>(vec![a, b], 1),
        });
        equiv!(mode, DEVICE, [x: 2 = data(&[3, 4], 36)], |dev| {
            x.gather(1, dev.int([[0, 3, 3, 1], [2, 2, 0, 0], [1, 0, 3, 2]])),
            x.select(0, dev.int([2, 0, 2])),
            x.mask_fill(dev.bool([[false, true, true, false]; 3]), 3.5),
            x.repeat_dim(0, 2),
        });
        equiv!(mode, DEVICE, [x: 2 = data(&[3, 4], 36), v: 2 = data(&[3, 4], 37)], |dev| {
            x.select_assign(1, dev.int([3, 0]), v.slice(s![.., 0..2]), IndexingUpdateOp::Add),
            x.scatter(1, dev.int([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 1, 1]]), v, IndexingUpdateOp::Add),
            x.slice_assign([0..2, 1..3], v.slice([1..3, 2..4])),
            x.slice_assign(s![.., ..;-2], v.slice(s![.., 0..2])),
            x.clone().mask_where(x.greater_elem(0.0), v),
            x.mask_where(dev.bool([[true, false, true, false]; 3]), v),
        });
    });
}

#[test]
fn comparisons() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [a: 2 = coarse(&[4, 5], 38), b: 2 = coarse(&[4, 5], 39)], |dev| {
            a.equal(b),
            a.not_equal(b),
            a.greater(b),
            a.greater_equal(b),
            a.lower(b),
            a.lower_equal(b),
        });
        equiv!(mode, DEVICE, [a: 2 = coarse(&[4, 5], 40)], |dev| {
            a.equal_elem(0.5),
            a.not_equal_elem(0.0),
            a.greater_elem(0.0),
            a.greater_equal_elem(0.5),
            a.lower_elem(-0.5),
            a.lower_equal_elem(0.0),
            a.is_nan(),
            a.greater_elem(0.0).any(),
            a.greater_elem(-2.0).all(),
        });
    });
}

#[test]
fn casts() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [x: 2 = data(&[3, 4], 41)], |dev| {
            x.cast(FloatDType::F64),
            x.int(),
            x.cast(IntDType::I64),
            (x * 100.0).int().float(),
        });
        equiv!(mode, DEVICE, [x: 2 = f64_data(&[3, 4], 42)], |dev| {
            x.cast(FloatDType::F32),
        });
        // Casting to the dtype a tensor has is a no-op: it stays where it is.
        equiv!(mode, VIEW, [x: 2 = data(&[3, 4], 43)], |dev| {
            x.cast(FloatDType::F32),
        });
    });
}

#[test]
fn activations() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [x: 2 = data(&[3, 6], 44)], |dev| {
            relu(x),
            gelu(x),
            sigmoid(x),
            silu(x),
            softmax(x, 1),
            log_softmax(x, 0),
            burn::tensor::activation::tanh(x),
        });
    });
}

#[test]
fn views_stay_offloaded() {
    for_each_mode(|mode| {
        equiv!(mode, VIEW, [x: 3 = data(&[2, 3, 4], 45)], |dev| {
            x.clone(),
            x.reshape([6, 4]),
            x.reshape([4, -1]),
            x.swap_dims(0, 2),
            x.transpose(),
            x.permute([2, 0, 1]),
            x.slice([0..1, 1..3]),
            x.slice(s![.., ..;2, 1..]),
            x.slice(s![..;-1, .., ..;-2]),
            x.slice(s![.., -2.., 1..=2;-1]),
            x.narrow(2, 1, 2),
            x.flip([0, 2]),
            x.flip([-1]),
            x.unsqueeze::<4>(),
            x.unsqueeze_dim::<4>(2),
            x.slice(1..2).squeeze_dim::<2>(0),
            x.slice(0..1).squeeze::<2>(),
            // Chains of views compose.
            x.transpose().slice(s![.., 1.., ..;-1]).permute([1, 0, 2]),
        });
        equiv!(mode, VIEW, [x: 3 = data(&[2, 1, 4], 46)], |dev| {
            x.expand([3, 2, 5, 4]),
            x.expand([2, 3, 4]).transpose(),
        });
        // Reshaping a non-contiguous view has no view (unless it only adds or removes size-1
        // dims, as `unsqueeze` of a transposed weight does): it falls back to a device copy.
        equiv!(mode, DEVICE, [x: 3 = data(&[2, 3, 4], 47)], |dev| {
            x.transpose().slice(s![.., .., 1..]).reshape([4, 4]),
            x.flip([1]).reshape([24]),
            x.expand([2, 2, 3, 4]).reshape([4, 12]),
            x.swap_dims(0, 1).exp(),
        });
        equiv!(mode, VIEW, [x: 3 = data(&[2, 3, 4], 47)], |dev| {
            x.swap_dims(0, 1).slice(1..2).reshape([2, 4]),
            x.transpose().unsqueeze::<4>(),
            x.swap_dims(0, 2).unsqueeze_dim::<4>(1).reshape([4, 3, 2]),
        });
    });
}

#[test]
fn empty_tensors() {
    for_each_mode(|mode| {
        equiv!(mode, VIEW, [x: 2 = data(&[0, 4], 48)], |dev| {
            x.clone(),
            x.reshape([0, 2, 2]),
            x.transpose(),
        });
        equiv!(mode, DEVICE, [x: 2 = data(&[0, 4], 49)], |dev| {
            x.exp(),
            x.sum_dim(0),
        });
        // (burn-ndarray's own matmul cannot multiply empty matrices: no reference for those.)
        equiv!(mode, EMBEDDING, [w: 2 = data(&[5, 3], 50)], |dev| {
            embedding(w, dev.int(TensorData::new(Vec::<i64>::new(), [1, 0]))),
        });
    });
}

#[test]
fn f64_tensors() {
    for_each_mode(|mode| {
        equiv!(mode, DEVICE, [a: 2 = f64_data(&[3, 4], 54), b: 2 = f64_data(&[1, 4], 55)], |dev| {
            a + b,
            a.exp() * b,
        });
        equiv!(mode, DEVICE, [a: 2 = f64_data(&[3, 4], 56)], |dev| {
            a.exp().sum_dim(1),
            softmax(a, 1),
        });
        equiv!(mode, VIEW, [a: 2 = f64_data(&[3, 4], 56)], |dev| {
            a.transpose().slice(s![..;-1]),
        });
        equiv!(mode, EMBEDDING, [w: 2 = f64_data(&[6, 3], 57)], |dev| {
            embedding(w, dev.int([[5, 0]])),
        });
    });
}

#[test]
fn clone_shares_host_memory() {
    for_each_mode(|_| {
        let x = place::<2>(&data(&[3, 4], 58), true);
        let y = x.clone();
        assert!(common::on_host(&y));
        let buffer = |t: Tensor<B, 2>| t.into_primitive().tensor().host().unwrap().buffer().clone();
        let (bx, by) = (buffer(x), buffer(y));
        assert!(
            std::sync::Arc::ptr_eq(&bx, &by),
            "a clone copied host memory"
        );
    });
}

#[test]
fn to_device_round_trips() {
    for_each_mode(|mode| {
        let context = OffloadContext::with_mode(mode);
        let values = data(&[3, 4], 59);
        let offloaded = place::<2>(&values, true);
        // Burn's own moves keep placement.
        assert!(common::on_host(&offloaded.clone().to_device(&resident())));
        assert!(!common::on_host(
            &place::<2>(&values, false).to_device(&host())
        ));
        reset_op_stats();
        let on_device = context.place(offloaded.clone(), &resident());
        assert!(!common::on_host(&on_device));
        assert!(on_device.device().same_placement(&resident()));
        // A tensor's device is its compute device, whatever its placement.
        assert!(offloaded.device().same_placement(&resident()));
        let back = context.place(on_device.clone(), &host());
        assert!(common::on_host(&back));
        assert_eq!(back.device(), host());
        assert_eq!(
            op_stats().transient_uploads,
            0,
            "moves are not transient copies"
        );
        for t in [offloaded, on_device, back] {
            t.into_data().assert_eq(&values, true);
        }
        // A view moved to the device reads like the view.
        let view = place::<2>(&values, true).transpose().slice(s![..;-1]);
        let expected = Tensor::<Inner, 2>::from_data(values.clone(), &CPU)
            .transpose()
            .slice(s![..;-1])
            .into_data();
        context
            .place(view, &resident())
            .into_data()
            .assert_eq(&expected, true);
    });
}

#[test]
fn autodiff_through_offloaded_weight() {
    type AdOffload = Autodiff<B>;
    type AdRef = Autodiff<Inner>;
    let (xd, wd) = (data(&[3, 8], 60), data(&[8, 5], 61));
    let reference = {
        let x = Tensor::<AdRef, 2>::from_data(xd.clone(), &CPU).require_grad();
        let w = Tensor::<AdRef, 2>::from_data(wd.clone(), &CPU).require_grad();
        let grads = x.clone().matmul(w.clone()).sum().backward();
        let gx = x.grad(&grads).unwrap().into_data();
        let gw = w.grad(&grads).unwrap().into_data();
        (gx, gw)
    };
    for_each_mode(|mode| {
        let x = Tensor::<AdOffload, 2>::from_data(xd.clone(), &resident()).require_grad();
        let w = Tensor::<AdOffload, 2>::from_data(wd.clone(), &host()).require_grad();
        assert!(common::on_host(&w));
        reset_op_stats();
        let grads = x.clone().matmul(w.clone()).sum().backward();
        let gx = x.grad(&grads).unwrap().into_data();
        let gw = w.grad(&grads).unwrap().into_data();
        let zero_copy = op_stats().zero_copy_ops;
        if copies_matmul_weights(mode) {
            assert_eq!(zero_copy, 0, "mode {mode}");
            gx.assert_eq(&reference.0, true);
        } else {
            // Forward `x @ w` and backward `dy @ w^T` both read `w` in place.
            assert_eq!(zero_copy, 2, "mode {mode}");
            approx(&gx, &reference.0);
        }
        // `x^T @ dy` only involves resident tensors.
        gw.assert_eq(&reference.1, true);
    });
}

#[test]
fn concurrent_forwards_share_offloaded_weights() {
    const THREADS: u64 = 4;
    const LAYERS: [(usize, usize); 3] = [(16, 32), (32, 32), (32, 8)];
    let input = |seed: u64| place::<3>(&data(&[2, 4, 16], seed), false);
    for_each_mode(|mode| {
        // Made in this mode's context: the weights are read as it says on every thread.
        let layers: Vec<(Tensor<B, 2>, Tensor<B, 1>)> = LAYERS
            .iter()
            .zip(70..)
            .map(|(&(i, o), seed)| {
                let w = place::<2>(&data(&[i, o], seed), true);
                let b = place::<1>(&data(&[o], seed + 100), true);
                (w, b)
            })
            .collect();
        let forward = |x: Tensor<B, 3>| {
            let mut x = x;
            for (i, (w, b)) in layers.iter().enumerate() {
                x = linear(x, w.clone(), Some(b.clone()));
                if i + 1 < layers.len() {
                    x = gelu(x);
                }
            }
            x.into_data()
        };
        let expected: Vec<_> = (0..THREADS).map(|t| forward(input(t))).collect();
        std::thread::scope(|scope| {
            for (t, expected) in (0..THREADS).zip(&expected) {
                let forward = &forward;
                scope.spawn(move || {
                    reset_op_stats();
                    for _ in 0..8 {
                        forward(input(t)).assert_eq(expected, true);
                    }
                    let stats = op_stats();
                    let in_place = if copies_matmul_weights(mode) {
                        0
                    } else {
                        8 * 3
                    };
                    assert_eq!(stats.zero_copy_ops, in_place, "thread {t}, {mode} mode");
                });
            }
        });
    });
}
