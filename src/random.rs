//! Random initialisation of tensors created in host memory: counter-based, parallel, written
//! straight into the (pinned) host buffer.
//!
//! A model bigger than the GPU initialises tens of gigabytes of offloaded weights on the host.
//! Burn's own `TensorData::random` draws every value from one sequential generator into an
//! `f32` vector that is then converted and copied, single-threaded: minutes for 100 GB. Here
//! each value is a pure function of `(tensor key, element index)` (a SplitMix64 hash), so the
//! buffer is filled in place by as many threads as the machine has, in the tensor's own dtype,
//! and the values do not depend on the thread count.
//!
//! Keys: [`seed`] sets the seed (`Backend::seed` on [`OffloadBackend`](crate::OffloadBackend)
//! calls it); every random tensor created on the host then takes the next key of that seed's
//! sequence. Unseeded, the seed is drawn once per process.
//! The values differ from those the inner backend would draw for the same seed (they come from
//! another generator), as two Burn backends' values already do.

use std::sync::Mutex;

use burn_backend::Distribution;
use burn_std::FloatDType;
use burn_std::{bf16, f16};

/// Tensors smaller than this many elements are filled on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 20;

/// `(seed, tensors drawn since it was set)`; `None` until seeded or first used.
static STATE: Mutex<Option<(u64, u64)>> = Mutex::new(None);

/// Sets the seed of host-created random tensors and restarts their sequence.
pub(crate) fn seed(seed: u64) {
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = Some((seed, 0));
}

/// A seed that differs between processes (std's randomly keyed hasher), for an unseeded run.
fn unseeded() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// The key of the next random tensor.
fn next_key() -> u64 {
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let (seed, count) = state.get_or_insert_with(|| (unseeded(), 0));
    *count += 1;
    mix(seed.wrapping_add(mix(*count)))
}

/// SplitMix64's finaliser: a bijective 64-bit hash with full avalanche.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th 64 random bits of the tensor `key`.
#[inline(always)]
fn bits(key: u64, i: u64) -> u64 {
    mix(key ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The float arithmetic a value is drawn in: `f64` for `f64` tensors, `f32` (about 3x faster)
/// for the narrower dtypes.
trait Real:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
{
    const ONE: Self;
    const ZERO: Self;
    const TAU: Self;
    /// Uniform in `[0, 1)`, with as many random bits as the mantissa holds exactly.
    fn unit(key: u64, i: u64) -> Self;
    fn of(v: f64) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn cos(self) -> Self;
    fn sin(self) -> Self;
    /// The largest value below `self`.
    fn next_down(self) -> Self;
}

macro_rules! real {
    ($t:ident, $bits:expr) => {
        impl Real for $t {
            const ONE: Self = 1.0;
            const ZERO: Self = 0.0;
            const TAU: Self = std::$t::consts::TAU;
            #[inline(always)]
            fn unit(key: u64, i: u64) -> Self {
                (bits(key, i) >> (64 - $bits)) as $t * (1.0 / (1u64 << $bits) as $t)
            }
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn ln(self) -> Self {
                $t::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
            #[inline(always)]
            fn cos(self) -> Self {
                $t::cos(self)
            }
            #[inline(always)]
            fn sin(self) -> Self {
                $t::sin(self)
            }
            #[inline(always)]
            fn next_down(self) -> Self {
                $t::next_down(self)
            }
        }
    };
}

real!(f64, 53);
real!(f32, 24);

/// The value of element `i` of the tensor `key` under `distribution`, in `R` arithmetic.
#[inline(always)]
fn sample<R: Real>(distribution: Distribution, key: u64, i: u64) -> R {
    match distribution {
        Distribution::Default => R::unit(key, i),
        Distribution::Uniform(low, high) => {
            let (low, high) = (R::of(low), R::of(high));
            let v = low + R::unit(key, i) * (high - low);
            // The product can round up to `high`: keep the interval half-open.
            let top = high.next_down();
            if v > top && top >= low { top } else { v }
        }
        Distribution::Bernoulli(p) => {
            if <f64 as Real>::unit(key, i) < p {
                R::ONE
            } else {
                R::ZERO
            }
        }
        Distribution::Normal(mean, std) => {
            // Box-Muller on the pair (2j, 2j + 1): element 2j takes the cosine and 2j + 1 the
            // sine of the same draw, so each element is still a function of its index alone.
            let pair = i & !1;
            let u1 = R::ONE - R::unit(key, pair); // (0, 1]: ln is finite
            let angle = R::TAU * R::unit(key, pair + 1);
            let radius = (R::ZERO - R::of(2.0) * u1.ln()).sqrt();
            let z = if i & 1 == 0 {
                radius * angle.cos()
            } else {
                radius * angle.sin()
            };
            R::of(mean) + R::of(std) * z
        }
    }
}

/// A float element type that random values are written as.
trait Element: bytemuck::Pod + Send {
    /// The value of element `i` of the tensor `key`.
    fn draw(distribution: Distribution, key: u64, i: u64) -> Self;
}

impl Element for f64 {
    fn draw(distribution: Distribution, key: u64, i: u64) -> Self {
        sample(distribution, key, i)
    }
}

impl Element for f32 {
    fn draw(distribution: Distribution, key: u64, i: u64) -> Self {
        sample(distribution, key, i)
    }
}

impl Element for f16 {
    fn draw(distribution: Distribution, key: u64, i: u64) -> Self {
        f16::from_f32(sample(distribution, key, i))
    }
}

impl Element for bf16 {
    fn draw(distribution: Distribution, key: u64, i: u64) -> Self {
        bf16::from_f32(sample(distribution, key, i))
    }
}

/// Fills `out` (elements `first..first + out.len()` of the tensor `key`).
fn fill_range<E: Element>(out: &mut [E], distribution: Distribution, key: u64, first: u64) {
    for (v, i) in out.iter_mut().zip(first..) {
        *v = E::draw(distribution, key, i);
    }
}

/// Fills `out` in parallel chunks; the values depend only on `key` and the index.
fn fill_typed<E: Element>(out: &mut [E], distribution: Distribution, key: u64) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if out.len() < PARALLEL_MIN_ELEMENTS || threads == 1 {
        fill_range(out, distribution, key, 0);
        return;
    }
    let chunk = out.len().div_ceil(threads);
    std::thread::scope(|scope| {
        for (n, part) in out.chunks_mut(chunk).enumerate() {
            scope.spawn(move || fill_range(part, distribution, key, (n * chunk) as u64));
        }
    });
}

/// Fills `bytes` (a whole contiguous tensor of `dtype`) with values drawn from `distribution`,
/// as the next random tensor of the seeded sequence.
///
/// Every Burn float dtype is covered; `Flex32` is stored as `f32`.
///
/// # Panics
/// If `bytes` is not a whole number of aligned elements (the caller's invariant).
pub(crate) fn fill(bytes: &mut [u8], dtype: FloatDType, distribution: Distribution) {
    fill_with_key(bytes, dtype, distribution, next_key());
}

fn fill_with_key(bytes: &mut [u8], dtype: FloatDType, distribution: Distribution, key: u64) {
    use bytemuck::cast_slice_mut as elements;
    match dtype {
        FloatDType::F64 => fill_typed::<f64>(elements(bytes), distribution, key),
        FloatDType::F32 | FloatDType::Flex32 => {
            fill_typed::<f32>(elements(bytes), distribution, key)
        }
        FloatDType::F16 => fill_typed::<f16>(elements(bytes), distribution, key),
        FloatDType::BF16 => fill_typed::<bf16>(elements(bytes), distribution, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(n: usize, distribution: Distribution, key: u64) -> Vec<f32> {
        let mut out = vec![0f32; n];
        fill_with_key(
            bytemuck::cast_slice_mut(&mut out),
            FloatDType::F32,
            distribution,
            key,
        );
        out
    }

    fn mean_var(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var)
    }

    #[test]
    fn values_depend_on_the_index_only() {
        // Large enough to be filled by several threads, compared with one sequential fill.
        let n = PARALLEL_MIN_ELEMENTS + 12_345;
        let parallel = draw(n, Distribution::Normal(0.0, 1.0), 7);
        let mut sequential = vec![0f32; n];
        fill_range(&mut sequential, Distribution::Normal(0.0, 1.0), 7, 0);
        assert_eq!(parallel, sequential);
        assert_ne!(
            draw(64, Distribution::Default, 8),
            draw(64, Distribution::Default, 7)
        );
    }

    #[test]
    fn distributions_have_their_moments() {
        let n = 1 << 18;
        let (m, v) = mean_var(&draw(n, Distribution::Uniform(-2.0, 4.0), 1));
        assert!(
            (m - 1.0).abs() < 0.03 && (v - 3.0).abs() < 0.05,
            "uniform {m} {v}"
        );
        let u = draw(n, Distribution::Uniform(-2.0, 4.0), 1);
        assert!(u.iter().all(|&x| (-2.0..4.0).contains(&x)));
        let (m, v) = mean_var(&draw(n, Distribution::Normal(0.5, 2.0), 2));
        assert!(
            (m - 0.5).abs() < 0.02 && (v - 4.0).abs() < 0.06,
            "normal {m} {v}"
        );
        let (m, _) = mean_var(&draw(n, Distribution::Bernoulli(0.25), 3));
        assert!((m - 0.25).abs() < 0.01, "bernoulli {m}");
        let (m, v) = mean_var(&draw(n, Distribution::Default, 4));
        assert!(
            (m - 0.5).abs() < 0.01 && (v - 1.0 / 12.0).abs() < 0.005,
            "default {m} {v}"
        );
    }

    #[test]
    fn half_types_round_the_same_values() {
        let n = 1000;
        let wide = draw(n, Distribution::Normal(0.0, 1.0), 9);
        let mut half = vec![bf16::ZERO; n];
        fill_with_key(
            bytemuck::cast_slice_mut(&mut half),
            FloatDType::BF16,
            Distribution::Normal(0.0, 1.0),
            9,
        );
        for (w, h) in wide.iter().zip(&half) {
            assert!(
                (w - h.to_f32()).abs() <= w.abs() / 128.0 + 1e-6,
                "{w} vs {h}"
            );
        }
    }
}
